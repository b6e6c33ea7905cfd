"""`flagscale infer`: offline batch generation, a prompts file in and a JSONL of completions out.

The engine runs in a worker process (`python -m flagscale.infer.batch`), recorded in the run folder like
every FlagScale job; `action=dryrun` prints that command, its environment and the resolved settings.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def command(settings) -> tuple[list[str], dict[str, str], Path]:
    run_dir = Path(settings.run_dir)
    spec = run_dir / "infer.json"
    return [sys.executable, "-m", "flagscale.infer.batch", str(spec)], dict(settings.envs), spec


def validate(settings) -> None:
    """Refuse engine arguments the engine does not take, before any process starts."""
    from flagscale.infer.validate import check_engine_args

    check_engine_args(settings.engine, settings.engine_args)


def main(cfg) -> int:
    from flagscale.infer.settings import from_config
    from flagscale.runner import process
    from flagscale.runner.config import action_of

    action = action_of(cfg)
    settings = from_config(cfg)
    validate(settings)
    cmd, env, spec = command(settings)
    if action == "dryrun":
        print(json.dumps({"cmd": cmd, "env": env, "settings": settings.to_json()}, indent=2))
        return 0
    if action in ("stop", "status"):
        run_dir = Path(settings.run_dir)
        if action == "stop":
            print(", ".join(process.stop(run_dir, None)) or "nothing was running")
            return 0
        states = process.states(run_dir) if (run_dir / "pids").is_dir() else {}
        print("\n".join(f"{k}: {v}" for k, v in states.items()) or f"nothing was started in {run_dir}")
        return 0 if states else 1
    spec.parent.mkdir(parents=True, exist_ok=True)
    spec.write_text(json.dumps(settings.to_json(), indent=2) + "\n")
    return process.run_foreground(cmd, name="infer", run_dir=Path(settings.run_dir), env={**os.environ, **env})
