"""`flagscale train`: launch, dry-run, stop and query Megatron training jobs from a Hydra config.

`main(cfg)` is what `flagscale train` and `run.py` call with the composed config. Nothing heavy is
imported here: torch and megatron load only in the training driver, on the nodes.
"""

from __future__ import annotations


def main(cfg) -> int:
    from flagscale.runner.config import action_of
    from flagscale.train import launcher
    from flagscale.train.settings import to_plain

    action = action_of(cfg)
    plain = to_plain(cfg)
    if action in ("stop", "status"):
        plan = launcher.plan(plain, for_launch=False)
        return launcher.stop(plan) if action == "stop" else launcher.status(plan)
    plan = launcher.plan(plain)
    return launcher.dryrun(plan) if action == "dryrun" else launcher.run(plan)
