"""`python -m flagscale.serve.frontdoor CONFIG.json`: the front door of direct mode, as its own process.

CONFIG.json (written by flagscale.serve.direct): {"config": the validated serve config, "upstreams":
{model: [engine base URL, ...]}}. Serves on experiment.runner.host:port until SIGTERM, then drains.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from flagscale.serve.frontdoor import StaticUpstreams, build_app, exposed_without_keys
from flagscale.serve.settings import from_config


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m flagscale.serve.frontdoor CONFIG.json", file=sys.stderr)
        return 2
    spec = json.loads(Path(argv[0]).read_text())
    settings = from_config(spec["config"])
    upstreams = StaticUpstreams(spec["upstreams"])
    warning = exposed_without_keys(settings.host, settings.api_keys)
    if warning:
        print(warning, file=sys.stderr, flush=True)
    from flagscale.serve.frontdoor.server import run

    print(f"front door on {settings.host}:{settings.port} for {', '.join(upstreams.models())}", flush=True)
    run(build_app(upstreams, settings), settings.host, settings.port)
    print("front door stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
