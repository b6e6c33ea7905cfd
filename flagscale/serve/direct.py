"""Direct mode: one engine server process per model, clients talk to it with nothing in between."""

from __future__ import annotations

import logging

from flagscale.errors import LaunchError
from flagscale.runner import process
from flagscale.serve.engines import EngineCommand, command_for, full_env
from flagscale.serve.health import port_free, wait_ready
from flagscale.serve.settings import ServeSettings

log = logging.getLogger(__name__)


def commands(settings: ServeSettings, check: bool = True) -> list[EngineCommand]:
    return [command_for(spec, settings, settings.host, settings.port_of(spec), check) for spec in settings.models]


def start(settings: ServeSettings) -> dict[str, str]:
    """Start every model's server, wait until each answers its health URL; {model: base URL}."""
    planned = commands(settings)
    for command in planned:
        if process.state(settings.run_dir, command.name) == "running":
            raise LaunchError(
                f"{command.name} is already running from {settings.run_dir}: action=status to see it, "
                "action=stop to stop it"
            )
        port = int(command.base_url.rsplit(":", 1)[1])
        if not port_free(settings.host, port):
            raise LaunchError(
                f"port {port} on {settings.host} is in use: stop what holds it or set experiment.runner.port"
            )
    started = []
    try:
        for command in planned:
            record = process.start(command.cmd, name=command.name, run_dir=settings.run_dir, env=full_env(command))
            started.append(command.name)
            log.info("started %s (pid %d), log %s", command.name, record.pid, record.log)
            name = command.name

            def alive(name: str = name) -> bool:
                return process.state(settings.run_dir, name) == "running"

            seconds = wait_ready(
                command.health_url,
                settings.ready_timeout,
                alive,
                f"{command.name} ({command.cmd[0]})",
                record.log,
            )
            log.info("%s ready at %s in %.1f s", command.name, command.base_url, seconds)
    except BaseException:
        if started:
            process.stop(settings.run_dir, started)
        raise
    return {c.name.split("/")[-1]: c.base_url for c in planned}
