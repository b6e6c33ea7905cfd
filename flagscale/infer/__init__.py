"""`flagscale infer`: offline batch generation, a prompts file in and a JSONL of completions out.

The engine runs in a worker process (`python -m flagscale.infer.batch`), recorded in the run folder like
every FlagScale job; `action=dryrun` prints that command, its environment and the resolved settings.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from flagscale.infer.settings import InferSettings, from_config
from flagscale.infer.validate import check_engine_args
from flagscale.runner import process
from flagscale.runner.config import action_of
from flagscale.runner.task import run_action


def command(settings) -> tuple[list[str], dict[str, str], Path]:
    run_dir = Path(settings.run_dir)
    spec = run_dir / "infer.json"
    return [sys.executable, "-m", "flagscale.infer.batch", str(spec)], dict(settings.envs), spec


def validate(settings) -> None:
    """Refuse engine arguments the engine does not take, before any process starts."""
    check_engine_args(settings.engine, settings.engine_args)


class InferTask:
    """One batch generation (flagscale.runner.task.Task): a worker process, run attached to this terminal."""

    def __init__(self, settings: InferSettings):
        self.settings = settings
        self.run_dir = Path(settings.run_dir)

    def plan(self) -> tuple[list[str], dict[str, str], Path]:
        return command(self.settings)

    def dryrun(self) -> int:
        cmd, env, _ = self.plan()
        print(json.dumps({"cmd": cmd, "env": env, "settings": self.settings.to_json()}, indent=2))
        return 0

    def run(self) -> int:
        cmd, env, spec = self.plan()
        spec.parent.mkdir(parents=True, exist_ok=True)
        spec.write_text(json.dumps(self.settings.to_json(), indent=2) + "\n")
        return process.run_foreground(cmd, name="infer", run_dir=self.run_dir, env={**os.environ, **env})

    def stop(self) -> int:
        print(", ".join(process.stop(self.run_dir, None)) or "nothing was running")
        return 0

    def status(self) -> int:
        states = process.states(self.run_dir) if (self.run_dir / "pids").is_dir() else {}
        print("\n".join(f"{k}: {v}" for k, v in states.items()) or f"nothing was started in {self.run_dir}")
        return 0 if states else 1


def make_task(cfg) -> InferTask:
    """The config's task, its engine arguments checked (for every action, as before anything starts)."""
    settings = from_config(cfg)
    validate(settings)
    return InferTask(settings)


def main(cfg) -> int:
    action = action_of(cfg)
    return run_action(make_task(cfg), action)
