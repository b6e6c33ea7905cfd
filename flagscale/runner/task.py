"""What `flagscale train | serve | infer | compress` each are: a task with one method per `action=`.

    def main(cfg) -> int:
        action = action_of(cfg)
        return run_action(make_task(cfg), action)

`plan()` works out what `run` would start and validates it, writing and starting nothing; `dryrun()`
prints that plan; `run()` starts it; `stop()` and `status()` act on what an earlier run started. A task with a
tuner also has `auto_tune()` (flagscale.tune). Each returns the command's exit status.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from flagscale.errors import ConfigError
from flagscale.runner.config import ACTIONS


@runtime_checkable
class Task(Protocol):
    def plan(self) -> Any: ...

    def dryrun(self) -> int: ...

    def run(self) -> int: ...

    def stop(self) -> int: ...

    def status(self) -> int: ...


def run_action(task: Task, action: str) -> int:
    """Do `action` (one of ACTIONS, as `flagscale.runner.config.action_of` returns it) with `task`."""
    if action not in ACTIONS:  # action_of already refused it with a hint; this guards other callers
        raise ValueError(f"unknown action {action!r}: expected one of {', '.join(ACTIONS)}")
    if not hasattr(task, action):  # auto_tune: flagscale train and serve have tuners, infer has none
        raise ConfigError(f"action={action}: this task has none; {action} runs with flagscale train or serve")
    return int(getattr(task, action)() or 0)
