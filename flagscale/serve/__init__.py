"""`flagscale serve`: OpenAI-compatible endpoints from llama.cpp, vLLM, SGLang or FlagScale's own transformers and
diffusers engines (flagscale.serve.hf_engine: chat with images, text-to-image), direct or on Ray replicas.

`main(cfg)` takes the composed Hydra config (see flagscale.serve.settings for its schema) and does
`action=run|dryrun|stop|status|auto_tune`. Heavy modules (ray, httpx) load only in the paths that need them.
"""

from __future__ import annotations

import json
import time

from flagscale.runner import process
from flagscale.runner.config import action_of
from flagscale.runner.task import run_action
from flagscale.serve import direct, ray_cluster
from flagscale.serve.health import probe
from flagscale.serve.settings import ServeSettings, from_config


def _state_file(settings):
    return settings.run_dir / "serve.json"


class ServeTask:
    """The models of one serve config (flagscale.runner.task.Task) behind their endpoints."""

    def __init__(self, settings: ServeSettings):
        self.settings = settings

    def plan(self) -> list[dict]:
        return plan(self.settings)

    def dryrun(self) -> int:
        return dryrun(self.settings)

    def run(self) -> int:
        return run(self.settings)

    def stop(self) -> int:
        return stop(self.settings)

    def status(self) -> int:
        return status(self.settings)

    def auto_tune(self) -> int:
        """Search experiment.auto_tuner's engine arguments under a load (flagscale.tune.serve, docs/auto_tune.md)."""
        from flagscale.tune.serve import auto_tune

        return auto_tune(self.settings)


def make_task(cfg) -> ServeTask:
    return ServeTask(from_config(cfg))


def main(cfg) -> int:
    action = action_of(cfg)
    return run_action(make_task(cfg), action)


def plan(settings) -> list[dict]:
    """What `run` would start: name, command, environment (validated against the installed engines)."""
    if settings.deploy == "direct":
        return direct.plan(settings)
    return ray_cluster.plan(settings)


def dryrun(settings) -> int:
    print(
        json.dumps({"deploy": settings.deploy, "run_dir": str(settings.run_dir), "processes": plan(settings)}, indent=2)
    )
    return 0


def run(settings) -> int:
    from flagscale.serve import gguf

    settings = gguf.prepare(settings)  # HF folders for llama.cpp: their GGUF, converted (or cached) before any start
    settings.run_dir.mkdir(parents=True, exist_ok=True)
    endpoints = (direct if settings.deploy == "direct" else ray_cluster).start(settings)
    state = {"deploy": settings.deploy, "endpoints": endpoints, "started_at": time.time()}
    _state_file(settings).write_text(json.dumps(state, indent=2, sort_keys=True) + "\n")
    for name, url in endpoints.items():
        print(f"serving {name} at {url}/v1 (OpenAI API); stop with action=stop")
    return 0


def stop(settings) -> int:
    if not (settings.run_dir / "pids").is_dir():
        print(f"nothing was started in {settings.run_dir}")
        return 0
    # the front door first (it drains in-flight requests) or the Ray app (its front door drains, then it stops
    # its replicas), then the engines, then the worker nodes, the head last
    names = [r.name for r in process.records(settings.run_dir)]
    ordered = sorted(names, key=lambda n: (n != direct.FRONT, n == ray_cluster.HEAD, n.startswith("ray-"), n))
    stopped = []
    for name in ordered:
        # the front door gets its drain timeout before the SIGKILL; `ray start --block` stops its Ray
        # processes in order when it alone gets the SIGTERM
        timeout = settings.drain_timeout + 15 if name in (direct.FRONT, ray_cluster.APP) else 15.0
        stopped += process.stop(settings.run_dir, [name], timeout=timeout, command_only=name == ray_cluster.HEAD)
    _state_file(settings).unlink(missing_ok=True)
    print(f"stopped {', '.join(stopped)}" if stopped else "nothing was running")
    return 0


def status(settings) -> int:
    states = process.states(settings.run_dir) if (settings.run_dir / "pids").is_dir() else {}
    try:
        endpoints = json.loads(_state_file(settings).read_text())["endpoints"]
    except (OSError, ValueError, KeyError):
        endpoints = {}
    for name, state in sorted(states.items()):
        print(f"{name}: {state}")
    healthy = True
    for name, url in sorted(endpoints.items()):
        code = probe(f"{url}/health")
        healthy &= code == 200
        print(f"{name}: {url} health {code if code is not None else 'no answer'}")
    if not states:
        print(f"nothing was started in {settings.run_dir}")
        return 1
    return 0 if healthy and all(s == "running" for s in states.values()) else 1
