"""Ray mode: a Ray head (plus worker nodes from the hostfile) and the Serve application, as recorded processes.

Every process is started through flagscale.runner.process, so `action=stop` stops exactly these process
groups (never `ray stop`, which would take down every Ray cluster of the machine).
"""

from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path

from flagscale.errors import ConfigError, LaunchError
from flagscale.runner import process
from flagscale.serve.health import port_free, wait_ready
from flagscale.serve.settings import ServeSettings

HEAD, APP = "ray-head", "serve-app"


def _ray_cli() -> str:
    beside = Path(sys.executable).parent / "ray"
    return str(beside) if beside.exists() else "ray"


def hosts(hostfile: Path | None) -> list[tuple[str, int]]:
    """`host slots=N` lines (the FlagScale/DeepSpeed hostfile form); `#` comments."""
    if hostfile is None:
        return []
    out = []
    for number, line in enumerate(hostfile.read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        slots = 0
        for part in parts[1:]:
            key, _, value = part.partition("=")
            if key != "slots" or not value.isdigit():
                raise ConfigError(f"{hostfile}:{number}: expected `host slots=N`, got {line!r}")
            slots = int(value)
        out.append((parts[0], slots))
    return out


def head_address(settings: ServeSettings) -> str:
    ip = "127.0.0.1" if settings.hostfile is None else socket.gethostbyname(socket.gethostname())
    return f"{ip}:{settings.ray_port}"


def commands(settings: ServeSettings) -> list[tuple[str, list[str]]]:
    ray = _ray_cli()
    ip, port = head_address(settings).split(":")
    replicas = sum(max(m.replicas, m.max_replicas or 0) for m in settings.models)
    cpus = max(os.cpu_count() or 1, replicas)  # logical: each replica reserves one, its engine sets threads
    head = [ray, "start", "--head", "--block", f"--node-ip-address={ip}", f"--port={port}", f"--num-cpus={cpus}",
            "--include-dashboard=false", "--disable-usage-stats"]
    out = [(HEAD, head)]
    for host, slots in hosts(settings.hostfile):
        join = [ray, "start", "--block", f"--address={ip}:{port}", "--disable-usage-stats"]
        if slots:
            join.append(f"--num-cpus={slots}")
        # -tt: the remote command dies with the ssh session when stop signals the ssh process group
        out.append((f"ray-worker-{host}", ["ssh", "-tt", "-o", "BatchMode=yes", host, " ".join(join)]))
    out.append((APP, [sys.executable, "-m", "flagscale.serve.ray_app", str(settings.run_dir / "serve-app.json")]))
    return out


def plan(settings: ServeSettings) -> list[dict]:
    from flagscale.serve.engines import command_for

    for spec in settings.models:  # validate every model's engine arguments now, not inside a replica
        command_for(spec, settings, "127.0.0.1", settings.port)
    env = {k: v for k, v in settings.envs}
    return [{"name": name, "cmd": cmd, "env": env} for name, cmd in commands(settings)]


def _env(settings: ServeSettings) -> dict[str, str]:
    return {**os.environ, **dict(settings.envs), "RAY_USAGE_STATS_ENABLED": "0"}


def start(settings: ServeSettings) -> dict[str, str]:
    planned = plan(settings)
    if process.state(settings.run_dir, APP) == "running":
        raise LaunchError(f"{settings.exp_name} is already running from {settings.run_dir}: action=stop first")
    for host, port, what in ((settings.host, settings.port, "experiment.runner.port"),
                             ("127.0.0.1", settings.ray_port, "experiment.runner.ray_port")):
        if not port_free(host, port):
            raise LaunchError(f"port {port} on {host} is in use: stop what holds it or set {what}")
    config = dict(settings.extra.get("config") or {})
    config["_ray_address"] = head_address(settings)
    settings.run_dir.mkdir(parents=True, exist_ok=True)
    (settings.run_dir / "serve-app.json").write_text(json.dumps(config, indent=2) + "\n")
    env = _env(settings)
    started: list[str] = []
    try:
        app_log = settings.run_dir / "logs" / f"{APP}.log"
        app_log_start = app_log.stat().st_size if app_log.exists() else 0  # the log is appended to, run after run
        for item in planned:
            if item["name"] == APP:
                _wait_for_head(settings)
            record = process.start(item["cmd"], name=item["name"], run_dir=settings.run_dir, env=env)
            started.append(item["name"])
        record = process.read_record(settings.run_dir, APP)
        url = f"http://{'127.0.0.1' if settings.host in ('0.0.0.0', '::') else settings.host}:{settings.port}"
        wait_ready(f"{url}/health", settings.ready_timeout + 60,
                   lambda: process.state(settings.run_dir, APP) == "running" and
                   process.state(settings.run_dir, HEAD) == "running",
                   "the Ray Serve application", record.log if record else None, interval=0.5)
        # The router answers /health as soon as it is up; serve.run returns (and the app says so) only once
        # every model's replicas are healthy too.
        _wait_deployed(settings, app_log, app_log_start, settings.ready_timeout + 60)
    except BaseException:
        for name in reversed(started):
            process.stop(settings.run_dir, [name])
        raise
    return {m.name: url for m in settings.models}


def _wait_deployed(settings: ServeSettings, log: Path, start: int, timeout: float) -> None:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open(log, "rb") as f:
            f.seek(start)
            if b"\ndeployed " in b"\n" + f.read():
                return
        if process.state(settings.run_dir, APP) != "running":
            break
        time.sleep(0.3)
    from flagscale.serve.health import log_tail

    raise LaunchError(f"the Ray Serve application did not deploy its models within {timeout:.0f} s; last lines "
                      f"of its log:\n{log_tail(str(log))}")


def _wait_for_head(settings: ServeSettings, timeout: float = 90.0) -> None:
    """The head's GCS port answers once `ray start` has it up."""
    import time

    ip, port = head_address(settings).split(":")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.state(settings.run_dir, HEAD) != "running":
            record = process.read_record(settings.run_dir, HEAD)
            from flagscale.serve.health import log_tail

            raise LaunchError(f"the Ray head exited; last lines of its log:\n{log_tail(record.log if record else None)}")
        with socket.socket() as sock:
            sock.settimeout(1.0)
            if sock.connect_ex((ip, int(port))) == 0:
                time.sleep(1.0)  # the GCS listens a moment before the raylet registers
                return
        time.sleep(0.3)
    raise LaunchError(f"the Ray head did not listen on {ip}:{port} within {timeout:.0f} s")
