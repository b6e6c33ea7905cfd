#!/usr/bin/env python3
"""`python run.py --config-path DIR --config-name NAME [action=run|dryrun|stop|status] [overrides...]`

The same as `flagscale train|infer|serve|compress DIR --config-name NAME [overrides...]`: the experiment's
`experiment.task.type` picks which.
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config-path", "-cp", required=True, help="folder holding the experiment YAML")
    parser.add_argument("--config-name", "-cn", required=True, help="experiment YAML (without .yaml)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. action=dryrun train.model.num_layers=4")
    args = parser.parse_args(argv)

    from flagscale.errors import reported
    from flagscale.runner.config import compose, dispatch

    with reported():
        return dispatch(compose(args.config_path, args.config_name, args.overrides))


if __name__ == "__main__":
    sys.exit(main())
