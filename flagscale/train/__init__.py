"""`flagscale train`: launch, dry-run, stop and query Megatron training jobs from a Hydra config.

`main(cfg)` is what `flagscale train` and `run.py` call with the composed config. Nothing heavy is
imported here: torch and megatron load only in the training driver, on the nodes.
"""

from __future__ import annotations

from flagscale.runner.config import action_of
from flagscale.runner.task import run_action
from flagscale.train import launcher
from flagscale.train.settings import to_plain


class TrainTask:
    """A training job (flagscale.runner.task.Task) from the config as plain data (settings.to_plain)."""

    def __init__(self, plain: dict):
        self.plain = plain

    def plan(self) -> launcher.LaunchPlan:
        return self._launcher().plan(self.plain)

    def _job(self) -> launcher.Job:
        """What stop and status act on: no task section needed, nothing beyond the experiment checked."""
        return launcher.job(self.plain)

    def _launcher(self):
        """The module that launches this job (plan, dryrun, run, stop, status): Slurm's, or local and ssh."""
        if self._job().exp.runner.launcher == "slurm":
            from flagscale.train import slurm

            return slurm
        return launcher

    def dryrun(self) -> int:
        return self._launcher().dryrun(self.plan())

    def run(self) -> int:
        return self._launcher().run(self.plan())

    def stop(self) -> int:
        return self._launcher().stop(self._job())

    def status(self) -> int:
        return self._launcher().status(self._job())

    def auto_tune(self) -> int:
        """Search experiment.auto_tuner's space with real trials (flagscale.tune.train, docs/auto_tune.md)."""
        from flagscale.tune.train import auto_tune

        return auto_tune(self.plain)


def make_task(cfg) -> TrainTask:
    return TrainTask(to_plain(cfg))


def main(cfg) -> int:
    action = action_of(cfg)
    return run_action(make_task(cfg), action)
