"""`flagscale infer`: offline batch generation, a prompts file in and a JSONL of completions out.

The engine runs in a worker process (`python -m flagscale.infer.batch`), recorded in the run folder like
every FlagScale job; `action=dryrun` prints that command, its environment and the resolved settings.
"""

from __future__ import annotations

from flagscale.infer.settings import from_config
from flagscale.infer.validate import check_engine_args
from flagscale.runner.config import action_of
from flagscale.runner.task import WorkerTask, run_action


def validate(settings) -> None:
    """Refuse engine arguments the engine does not take, before any process starts."""
    check_engine_args(settings.engine, settings.engine_args)


class InferTask(WorkerTask):
    """One batch generation: the worker `python -m flagscale.infer.batch <run_dir>/infer.json`."""

    name = "infer"
    worker = "flagscale.infer.batch"


def make_task(cfg) -> InferTask:
    """The config's task, its engine arguments checked (for every action, as before anything starts)."""
    settings = from_config(cfg)
    validate(settings)
    return InferTask(settings)


def main(cfg) -> int:
    action = action_of(cfg)
    return run_action(make_task(cfg), action)
