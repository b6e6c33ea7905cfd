"""Ray mode: a Ray head (plus worker nodes from the hostfile) and the app (flagscale.serve.ray_app), recorded processes.

Every process is started through flagscale.runner.process, so `action=stop` stops exactly these process
groups (never `ray stop`, which would take down every Ray cluster of the machine).

Worker nodes: each hostfile line (`host slots=N`, flagscale.runner.hostfile) is one `ssh -tt HOST` (the
runner's ssh_port and ssh_options, flagscale.runner.ssh) running `ray start --block --address=HEAD
--num-cpus=N` with the head's own `ray` (an absolute path: nodes share the install layout, as `flagscale
train` assumes for python) and `experiment.envs`. Stopping the ssh stops the node: its terminal hangs up,
SIGHUP ends `ray start`, Ray's fate sharing takes its raylet (and the raylet its agents, workers and their
engines) down with it; nothing on the node outlives it, and nothing else there (another Ray cluster) is
touched. Without a terminal all of it would outlive the ssh, so the node refuses to start Ray without one.
A node that cannot join (ssh fails, `ray` missing there, no terminal) fails the start with its log.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import sys
import time
from pathlib import Path

from flagscale.errors import LaunchError
from flagscale.runner import process
from flagscale.runner.hostfile import Node, read_hostfile
from flagscale.runner.ssh import ssh_command
from flagscale.runner.wait import wait_until
from flagscale.serve.health import log_tail, port_free, wait_ready
from flagscale.serve.settings import ServeSettings

HEAD, APP = "ray-head", "serve-app"
WORKER = "ray-worker-"  # + host
JOINED = "Ray runtime started"  # what `ray start` prints once its node has joined the cluster
# Run on the node before `ray start` (exec'd: same process): without a terminal (an sshd with PermitTTY no
# ignores -tt) nothing would take the node down when its ssh ends, so it does not start at all.
NEEDS_TERMINAL = (
    '[ -t 0 ] || { echo "flagscale: ssh gave this node no terminal (sshd PermitTTY?); a Ray node '
    'started without one would outlive action=stop" >&2; exit 1; }; exec "$@"'
)


def _ray_cli() -> str:
    """This installation's `ray`, as an absolute path: the head runs it, and so does every worker node."""
    beside = Path(sys.executable).parent / "ray"
    if beside.exists():
        return str(beside)
    found = shutil.which("ray")
    if found:
        return os.path.abspath(found)
    raise LaunchError(
        f"Ray is not installed for {sys.executable} (no `ray` beside it or on PATH): pip install 'flagscale[serve]'"
    )


def worker_nodes(settings: ServeSettings) -> list[Node]:
    """The hostfile's nodes; each joins the head as a Ray worker node (the head is this machine)."""
    return read_hostfile(settings.hostfile) if settings.hostfile is not None else []


def worker_command(settings: ServeSettings, node: Node, ray: str, address: str) -> list[str]:
    """ssh argv of one worker node: `ray start --block` joining `address` with the node's slots as CPUs."""
    env = [f"{k}={v}" for k, v in (("RAY_USAGE_STATS_ENABLED", "0"), *settings.envs)]
    remote = [
        "env",
        "--",
        *env,
        "sh",
        "-c",
        NEEDS_TERMINAL,
        "flagscale-ray-node",
        ray,
        "start",
        "--block",
        f"--address={address}",
        f"--num-cpus={node.slots}",
        "--disable-usage-stats",
    ]
    # -tt: the node's terminal hangs up when this ssh is stopped, and `ray start` with its raylet goes down
    return ssh_command(node.host, remote, port=settings.ssh_port, options=settings.ssh_options, tty=True)


def head_address(settings: ServeSettings) -> str:
    """host:port the head listens on and the worker nodes join."""
    nodes = worker_nodes(settings)
    return f"{_route_source(nodes[0].host) if nodes else '127.0.0.1'}:{settings.ray_port}"


def _route_source(host: str) -> str:
    """This machine's address on its route to `host`: one that host can reach back. (The hostname's address
    is no good: Debian and Ubuntu map it to 127.0.1.1.) A UDP connect picks the route and sends nothing."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect((socket.gethostbyname(host), 9))
            return probe.getsockname()[0]
    except OSError as exc:
        raise LaunchError(
            f"worker node {host} (experiment.runner.hostfile): no route to it from here ({exc})"
        ) from None


def commands(settings: ServeSettings) -> list[tuple[str, list[str]]]:
    ray = _ray_cli()
    ip, port = head_address(settings).split(":")
    replicas = sum(max(m.replicas, m.max_replicas or 0) for m in settings.models)
    cpus = max(os.cpu_count() or 1, replicas)  # logical: each replica reserves one, its engine sets threads
    head = [
        ray,
        "start",
        "--head",
        "--block",
        f"--node-ip-address={ip}",
        f"--port={port}",
        f"--num-cpus={cpus}",
        "--include-dashboard=false",
        "--disable-usage-stats",
    ]
    out = [(HEAD, head)]
    for node in worker_nodes(settings):
        out.append((WORKER + node.host, worker_command(settings, node, ray, f"{ip}:{port}")))
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
    for host, port, what in (
        (settings.host, settings.port, "experiment.runner.port"),
        ("127.0.0.1", settings.ray_port, "experiment.runner.ray_port"),
    ):
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
        joining: dict[str, int] = {}  # worker node -> where this run's part of its log starts
        for item in planned:
            name = item["name"]
            if name == APP:  # every node is in the cluster before Ray places replicas
                _wait_joined(settings, joining, settings.ready_timeout)
            log = settings.run_dir / "logs" / f"{name}.log"
            log_start = log.stat().st_size if log.exists() else 0
            process.start(item["cmd"], name=name, run_dir=settings.run_dir, env=env)
            started.append(name)
            if name == HEAD:
                _wait_for_head(settings)  # the worker nodes join a head that listens
            elif name.startswith(WORKER):
                joining[name] = log_start
        record = process.read_record(settings.run_dir, APP)
        url = f"http://{'127.0.0.1' if settings.host in ('0.0.0.0', '::') else settings.host}:{settings.port}"
        wait_ready(
            f"{url}/health",
            settings.ready_timeout + 60,
            lambda: (
                process.state(settings.run_dir, APP) == "running" and process.state(settings.run_dir, HEAD) == "running"
            ),
            "the Ray app (front door and replicas)",
            record.log if record else None,
            interval=0.5,
        )
        # The app says `deployed` once every model's initial replicas serve, then its front door listens;
        # both are waited for (the log line is the one to trust should another server answer the port).
        _wait_deployed(settings, app_log, app_log_start, settings.ready_timeout + 60)
    except BaseException:
        for name in reversed(started):
            process.stop(settings.run_dir, [name])
        raise
    return {m.name: url for m in settings.models}


def _wait_joined(settings: ServeSettings, joining: dict[str, int], timeout: float) -> None:
    """Until every worker node's `ray start` says its node joined; a node whose ssh ended fails the start."""

    def text(name: str, start: int) -> str:
        with open(settings.run_dir / "logs" / f"{name}.log", "rb") as f:
            f.seek(start)
            raw = f.read().decode(errors="replace")
        return re.sub(r"\x1b\[[0-9;]*[A-Za-z]|\r", "", raw)  # its terminal's colours and line ends

    def tail(name: str, start: int) -> str:
        return "\n".join(text(name, start).strip().splitlines()[-8:])

    pending = dict(joining)

    def all_joined() -> bool:
        for name, start in list(pending.items()):
            # asked before the log is read: a node that had exited by then has its whole log there
            running = process.state(settings.run_dir, name) == "running"
            if JOINED in text(name, start):
                del pending[name]
            elif not running:
                code = process.exit_status(settings.run_dir, name)
                raise LaunchError(
                    f"Ray worker node {name[len(WORKER) :]} did not join the head: its ssh exited"
                    f"{f' ({code})' if code is not None else ''}; last lines of its log:\n"
                    f"{tail(name, start)}"
                )
        return not pending

    def too_slow() -> LaunchError:
        name, start = next(iter(pending.items()))
        return LaunchError(
            f"Ray worker node(s) {', '.join(n[len(WORKER) :] for n in pending)} did not join the "
            f"head within {timeout:.0f} s (experiment.runner.ready_timeout); last lines of "
            f"{name}'s log:\n{tail(name, start)}"
        )

    wait_until(all_joined, timeout, 0.3, too_slow)


def _wait_deployed(settings: ServeSettings, log: Path, start: int, timeout: float) -> None:
    """Until the app says `deployed` (serve.run returned: every replica is healthy) in this run's part of its log."""

    def failed() -> LaunchError:
        return LaunchError(
            f"the Ray app did not start its models' replicas within {timeout:.0f} s; last "
            f"lines of its log:\n{log_tail(str(log))}"
        )

    def deployed() -> bool:
        with open(log, "rb") as f:
            f.seek(start)
            if b"\ndeployed " in b"\n" + f.read():
                return True
        if process.state(settings.run_dir, APP) != "running":
            raise failed()
        return False

    wait_until(deployed, timeout, 0.3, failed)


def _wait_for_head(settings: ServeSettings, timeout: float = 90.0) -> None:
    """The head's GCS port answers once `ray start` has it up."""
    ip, port = head_address(settings).split(":")

    def listening() -> bool:
        if process.state(settings.run_dir, HEAD) != "running":
            record = process.read_record(settings.run_dir, HEAD)
            tail = log_tail(record.log if record else None)
            raise LaunchError(f"the Ray head exited; last lines of its log:\n{tail}")
        with socket.socket() as sock:
            sock.settimeout(1.0)
            return sock.connect_ex((ip, int(port))) == 0

    wait_until(
        listening,
        timeout,
        0.3,
        lambda: LaunchError(f"the Ray head did not listen on {ip}:{port} within {timeout:.0f} s"),
    )
    time.sleep(1.0)  # the GCS listens a moment before the raylet registers
