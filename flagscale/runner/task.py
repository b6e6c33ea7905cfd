"""What `flagscale train | serve | infer | compress` each are: a task with one method per `action=`.

    def main(cfg) -> int:
        action = action_of(cfg)
        return run_action(make_task(cfg), action)

`plan()` works out what `run` would start and validates it, writing and starting nothing; `dryrun()`
prints that plan; `run()` starts it; `stop()` and `status()` act on what an earlier run started. A task with a
tuner also has `auto_tune()` (flagscale.tune). Each returns the command's exit status.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from flagscale.errors import ConfigError
from flagscale.runner import process
from flagscale.runner.config import ACTIONS


@runtime_checkable
class Task(Protocol):
    def plan(self) -> Any: ...

    def dryrun(self) -> int: ...

    def run(self) -> int: ...

    def stop(self) -> int: ...

    def status(self) -> int: ...


class WorkerTask:
    """A task that is one worker process run attached to this terminal (infer, compress): the resolved settings
    are written to `<run_dir>/<name>.json` and `python -m <worker> SPEC` runs on them, recorded in the run folder
    (pids, logs) like every FlagScale job, so stop and status work as for the others."""

    name = "worker"  # the process name in the run folder and the spec's file name
    worker = ""  # the module run with `python -m`

    def __init__(self, settings: Any):
        self.settings = settings
        self.run_dir = Path(settings.run_dir)

    def check(self) -> None:
        """What must hold before the worker starts (the plan of every action checks it)."""

    def plan(self) -> tuple[list[str], dict[str, str], Path]:
        self.check()
        spec = self.run_dir / f"{self.name}.json"
        return [sys.executable, "-m", self.worker, str(spec)], dict(self.settings.envs), spec

    def dryrun(self) -> int:
        cmd, env, _ = self.plan()
        print(json.dumps({"cmd": cmd, "env": env, "settings": self.settings.to_json()}, indent=2))
        return 0

    def run(self) -> int:
        cmd, env, spec = self.plan()
        spec.parent.mkdir(parents=True, exist_ok=True)
        spec.write_text(json.dumps(self.settings.to_json(), indent=2) + "\n")
        return process.run_foreground(cmd, name=self.name, run_dir=self.run_dir, env={**os.environ, **env})

    def stop(self) -> int:
        print(", ".join(process.stop(self.run_dir, None)) or "nothing was running")
        return 0

    def status(self) -> int:
        states = process.states(self.run_dir) if (self.run_dir / "pids").is_dir() else {}
        print("\n".join(f"{k}: {v}" for k, v in states.items()) or f"nothing was started in {self.run_dir}")
        return 0 if states else 1


def run_action(task: Task, action: str) -> int:
    """Do `action` (one of ACTIONS, as `flagscale.runner.config.action_of` returns it) with `task`."""
    if action not in ACTIONS:  # action_of already refused it with a hint; this guards other callers
        raise ValueError(f"unknown action {action!r}: expected one of {', '.join(ACTIONS)}")
    if not hasattr(task, action):  # auto_tune: flagscale train and serve have tuners, infer has none
        raise ConfigError(f"action={action}: this task has none; {action} runs with flagscale train or serve")
    return int(getattr(task, action)() or 0)
