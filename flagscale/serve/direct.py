"""Direct mode: each model's engine server on a private loopback port, the front door on host:port.

The engines and the front door (python -m flagscale.serve.frontdoor) are processes of the run folder
(flagscale.runner.process), each reported ready only once its /health answers 200. `action=stop` stops the
front door first (it drains: experiment.runner.drain_timeout), then the engines.
"""

from __future__ import annotations

import json
import logging
import os
import sys

from flagscale.errors import LaunchError
from flagscale.runner import process
from flagscale.serve.engines import EngineCommand, command_for, full_env
from flagscale.serve.frontdoor import exposed_without_keys
from flagscale.serve.health import free_port, port_free, wait_ready
from flagscale.serve.settings import ServeSettings

log = logging.getLogger(__name__)
FRONT = "frontdoor"  # the front door's process name in the run folder
ENGINE_HOST = "127.0.0.1"  # engines listen on loopback only: every client goes through the front door


def commands(settings: ServeSettings, check: bool = True) -> list[EngineCommand]:
    """Each model's engine on loopback: its configured port, else a free one (chosen now)."""
    return [
        command_for(spec, settings, ENGINE_HOST, spec.port if spec.port is not None else free_port(), check)
        for spec in settings.models
    ]


def front_url(settings: ServeSettings) -> str:
    return settings.front_url


def front_command(settings: ServeSettings) -> list[str]:
    return [sys.executable, "-m", "flagscale.serve.frontdoor", str(settings.run_dir / "frontdoor.json")]


def plan(settings: ServeSettings) -> list[dict]:
    engines = [{"name": c.name, "cmd": list(c.cmd), "env": dict(c.env), "url": c.base_url} for c in commands(settings)]
    front = {"name": FRONT, "cmd": front_command(settings), "env": {}, "url": front_url(settings)}
    return [*engines, front]


def _check_free(settings: ServeSettings, planned: list[EngineCommand]) -> None:
    for name in (*(c.name for c in planned), FRONT):
        if process.state(settings.run_dir, name) == "running":
            raise LaunchError(
                f"{name} is already running from {settings.run_dir}: action=status to see it, action=stop to stop it"
            )
    if not port_free(settings.host, settings.port):
        raise LaunchError(
            f"port {settings.port} on {settings.host} is in use: stop what holds it or set experiment.runner.port"
        )
    for command in planned:
        port = int(command.base_url.rsplit(":", 1)[1])
        if not port_free(ENGINE_HOST, port):
            raise LaunchError(f"port {port} on {ENGINE_HOST} ({command.name}'s engine) is in use: set serve[].port")


def _wait(settings: ServeSettings, name: str, url: str, what: str, log_path: str) -> float:
    def alive() -> bool:
        return process.state(settings.run_dir, name) == "running"

    return wait_ready(url, settings.ready_timeout, alive, what, log_path)


def start(settings: ServeSettings) -> dict[str, str]:
    """Start every model's engine and the front door, wait until each is healthy; {model: front door URL}."""
    planned = commands(settings)
    _check_free(settings, planned)
    warning = exposed_without_keys(settings.host, settings.api_keys)
    if warning:
        print(warning, file=sys.stderr, flush=True)
    started: list[str] = []
    try:
        records = {}
        for command in planned:  # all load at once; then each is waited for
            records[command.name] = process.start(
                command.cmd, name=command.name, run_dir=settings.run_dir, env=full_env(command)
            )
            started.append(command.name)
            log.info("started %s (pid %d), log %s", command.name, records[command.name].pid, records[command.name].log)
        for command in planned:
            what = f"{command.name} ({command.cmd[0]})"
            seconds = _wait(settings, command.name, command.health_url, what, records[command.name].log)
            log.info("%s ready at %s in %.1f s", command.name, command.base_url, seconds)
        spec_path = settings.run_dir / "frontdoor.json"
        upstreams = {c.name: [c.base_url] for c in planned}
        spec_path.unlink(missing_ok=True)
        fd = os.open(spec_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # the config holds the API keys
        with os.fdopen(fd, "w") as out:
            out.write(json.dumps({"config": settings.extra.get("config"), "upstreams": upstreams}) + "\n")
        record = process.start(front_command(settings), name=FRONT, run_dir=settings.run_dir, env=dict(os.environ))
        started.append(FRONT)
        _wait(settings, FRONT, front_url(settings) + "/health", "the front door", record.log)
    except BaseException:
        if started:
            process.stop(settings.run_dir, started)
        raise
    url = front_url(settings)
    return {c.name.split("/")[-1]: url for c in planned}
