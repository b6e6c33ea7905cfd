"""`flagscale serve`: OpenAI-compatible endpoints from llama.cpp, vLLM or SGLang, direct or behind Ray Serve.

`main(cfg)` takes the composed Hydra config (see flagscale.serve.settings for its schema) and does
`action=run|dryrun|stop|status`. Heavy modules (ray, httpx) load only in the paths that need them.
"""

from __future__ import annotations

import json
import time


def _state_file(settings):
    return settings.run_dir / "serve.json"


def main(cfg) -> int:
    from flagscale.runner.config import action_of
    from flagscale.serve.settings import from_config

    action = action_of(cfg)
    settings = from_config(cfg)
    if action == "dryrun":
        return dryrun(settings)
    if action == "stop":
        return stop(settings)
    if action == "status":
        return status(settings)
    return run(settings)


def plan(settings) -> list[dict]:
    """What `run` would start: name, command, environment (validated against the installed engines)."""
    if settings.deploy == "direct":
        from flagscale.serve.direct import commands

        return [{"name": c.name, "cmd": list(c.cmd), "env": dict(c.env), "url": c.base_url}
                for c in commands(settings)]
    from flagscale.serve.ray_cluster import plan as ray_plan

    return ray_plan(settings)


def dryrun(settings) -> int:
    print(json.dumps({"deploy": settings.deploy, "run_dir": str(settings.run_dir), "processes": plan(settings)},
                     indent=2))
    return 0


def run(settings) -> int:
    settings.run_dir.mkdir(parents=True, exist_ok=True)
    if settings.deploy == "direct":
        from flagscale.serve.direct import start

        endpoints = start(settings)
    else:
        from flagscale.serve.ray_cluster import start

        endpoints = start(settings)
    state = {"deploy": settings.deploy, "endpoints": endpoints, "started_at": time.time()}
    _state_file(settings).write_text(json.dumps(state, indent=2, sort_keys=True) + "\n")
    for name, url in endpoints.items():
        print(f"serving {name} at {url}/v1 (OpenAI API); stop with action=stop")
    return 0


def stop(settings) -> int:
    from flagscale.runner import process

    if not (settings.run_dir / "pids").is_dir():
        print(f"nothing was started in {settings.run_dir}")
        return 0
    from flagscale.serve.ray_cluster import HEAD

    # the app first (it holds the Serve deployments), then the worker nodes, the head last
    names = [r.name for r in process.records(settings.run_dir)]
    ordered = sorted(names, key=lambda n: (n == HEAD, n.startswith("ray-"), n))
    stopped = []
    for name in ordered:
        # `ray start --block` stops its Ray processes in order when it alone gets the SIGTERM
        stopped += process.stop(settings.run_dir, [name], command_only=name == HEAD)
    _state_file(settings).unlink(missing_ok=True)
    print(f"stopped {', '.join(stopped)}" if stopped else "nothing was running")
    return 0


def status(settings) -> int:
    from flagscale.runner import process
    from flagscale.serve.health import probe

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
