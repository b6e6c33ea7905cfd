"""Processes a job started, recorded in its run folder, so status and stop touch exactly those.

Each process runs under a small supervisor (`python -m flagscale.runner.supervise`) that leads its own
session: the process group is the job's, and the supervisor writes the exit status when the command ends.
A record (`pids/<name>.json`) keeps the pid and the kernel's start time of that pid, so a pid reused by
an unrelated process after ours ended is never signalled. Nothing here matches processes by name.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from flagscale.errors import LaunchError
from flagscale.runner.wait import wait_until

STATES = ("running", "finished", "failed", "stopped", "unknown")


@dataclass(frozen=True)
class ProcessRecord:
    name: str
    pid: int  # the supervisor: leader of its own session and process group
    start_ticks: int  # /proc/<pid>/stat field 22, to tell our pid from a later reuse of the number
    host: str
    cmd: tuple[str, ...]
    log: str  # combined stdout and stderr ("" when attached to the terminal)
    started_at: float


def _paths(run_dir: Path, name: str) -> tuple[Path, Path, Path]:
    pids = Path(run_dir) / "pids"
    return pids / f"{name}.json", pids / f"{name}.exit", pids / f"{name}.stopped"


def _check_name(name: str) -> None:
    if not name or "/" in name or name.startswith("."):
        raise LaunchError(f"process name {name!r} is not a plain file name")


def start_ticks(pid: int) -> int | None:
    """The pid's start time in clock ticks since boot, or None when no such (living) process exists."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()  # the command name may hold spaces and parentheses
    if fields[0] in ("Z", "X"):  # exited, not yet reaped
        return None
    return int(fields[19])


def _reap(pid: int) -> None:
    """Collect our own exited child (a test or a foreground CLI started it), so it is not a zombie."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def is_alive(record: ProcessRecord) -> bool:
    if record.host != socket.gethostname():
        raise LaunchError(f"{record.name} runs on {record.host}, not here: ask that host")
    _reap(record.pid)
    return start_ticks(record.pid) == record.start_ticks


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def read_record(run_dir: Path, name: str) -> ProcessRecord | None:
    path = _paths(run_dir, name)[0]
    try:
        data = json.loads(path.read_text())
        return ProcessRecord(**{**data, "cmd": tuple(data["cmd"])})
    except FileNotFoundError:
        return None
    except (ValueError, TypeError, KeyError) as exc:
        raise LaunchError(f"{path} is damaged ({exc}); the process it recorded must be stopped by hand") from None


def records(run_dir: Path) -> list[ProcessRecord]:
    folder = Path(run_dir) / "pids"
    found = (read_record(run_dir, p.stem) for p in sorted(folder.glob("*.json")) if not p.name.startswith("."))
    return [r for r in found if r is not None]


def _prepare(run_dir: Path, name: str) -> tuple[Path, Path]:
    _check_name(name)
    record_path, exit_path, stopped_path = _paths(run_dir, name)
    old = read_record(run_dir, name)
    if old is not None and old.host == socket.gethostname() and is_alive(old):
        raise LaunchError(
            f"{name} is already running (pid {old.pid}, log {old.log or '-'}): stop it first with action=stop"
        )
    record_path.parent.mkdir(parents=True, exist_ok=True)
    for stale in (exit_path, stopped_path):
        stale.unlink(missing_ok=True)
    return record_path, exit_path


def _spawn(
    cmd: Sequence[str], name: str, run_dir: Path, env: Mapping[str, str] | None, cwd, detached: bool
) -> tuple[subprocess.Popen, ProcessRecord]:
    if not cmd:
        raise LaunchError(f"{name}: empty command")
    record_path, exit_path = _prepare(run_dir, name)
    log = ""
    out = None
    if detached:
        log_path = Path(run_dir) / "logs" / f"{name}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        log = str(log_path)
        out = open(log_path, "ab")
    supervisor = [sys.executable, "-m", "flagscale.runner.supervise", str(exit_path), "--", *map(str, cmd)]
    try:
        proc = subprocess.Popen(
            supervisor,
            env=None if env is None else dict(env),
            cwd=cwd,
            stdin=subprocess.DEVNULL if detached else None,
            stdout=out,
            stderr=subprocess.STDOUT if detached else None,
            start_new_session=detached,
        )
    except OSError as exc:
        raise LaunchError(f"{name}: could not start {cmd[0]}: {exc}") from None
    finally:
        if out is not None:
            out.close()
    ticks = start_ticks(proc.pid)
    record = ProcessRecord(
        name, proc.pid, ticks if ticks is not None else -1, socket.gethostname(), tuple(map(str, cmd)), log, time.time()
    )
    _write_json(record_path, asdict(record))
    return proc, record


def start(
    cmd: Sequence[str], *, name: str, run_dir: Path, env: Mapping[str, str] | None = None, cwd: str | Path | None = None
) -> ProcessRecord:
    """Start `cmd` detached (own session), logging to run_dir/logs/<name>.log, and record it."""
    return _spawn(cmd, name, run_dir, env, cwd, detached=True)[1]


def run_foreground(
    cmd: Sequence[str], *, name: str, run_dir: Path, env: Mapping[str, str] | None = None, cwd: str | Path | None = None
) -> int:
    """Run `cmd` attached to this terminal (for schedulers and containers), recorded like `start`."""
    proc, _ = _spawn(cmd, name, run_dir, env, cwd, detached=False)
    try:
        return proc.wait()
    except KeyboardInterrupt:  # the terminal sent SIGINT to the whole foreground group; let it finish
        return proc.wait()


def state(run_dir: Path, name: str) -> str:
    """running | finished | failed | stopped | unknown (never started here)."""
    record = read_record(run_dir, name)
    if record is None:
        return "unknown"
    if is_alive(record):
        return "running"
    _, exit_path, stopped_path = _paths(run_dir, name)
    if stopped_path.exists():
        return "stopped"
    try:
        return "finished" if int(exit_path.read_text().strip()) == 0 else "failed"
    except (FileNotFoundError, ValueError):
        return "failed"  # gone without an exit status: killed (SIGKILL, OOM) or the machine restarted


def states(run_dir: Path) -> dict[str, str]:
    return {r.name: state(run_dir, r.name) for r in records(run_dir)}


def exit_status(run_dir: Path, name: str) -> int | None:
    try:
        return int(_paths(run_dir, name)[1].read_text().strip())
    except (FileNotFoundError, ValueError):
        return None


def _wait_gone(records_: list[ProcessRecord], groups: dict[str, bool], timeout: float) -> list[ProcessRecord]:
    """Wait up to `timeout` for the processes (their whole groups) to end; returns those still there."""
    pending = list(records_)

    def all_gone() -> bool:
        for r in pending:
            _reap(r.pid)
        # a group outlives its leader while a child ignores SIGTERM: wait for every member
        pending[:] = [r for r in pending if (_group_alive(r.pid) if groups[r.name] else is_alive(r))]
        return not pending

    wait_until(all_gone, timeout, 0.05)
    return pending


def _leads_group(record: ProcessRecord) -> bool:
    try:
        return os.getpgid(record.pid) == record.pid
    except ProcessLookupError:
        return False


def _signal(record: ProcessRecord, sig: int, group: bool) -> None:
    try:
        if group:
            os.killpg(record.pid, sig)
        elif start_ticks(record.pid) == record.start_ticks:  # not a leader (should not happen): only itself
            os.kill(record.pid, sig)
    except ProcessLookupError:
        pass


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def _supervised(record: ProcessRecord) -> list[int]:
    """The command(s) the supervisor runs: its children."""
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        if int(text[text.rindex(")") + 2 :].split()[1]) == record.pid:  # field 4: the parent's pid
            children.append(int(stat.parent.name))
    return children


def stop(
    run_dir: Path, names: Sequence[str] | None = None, timeout: float = 15.0, command_only: bool = False
) -> list[str]:
    """SIGTERM the recorded process groups that are still ours, SIGKILL what is left after `timeout`.

    `command_only`: the SIGTERM goes to the supervised command alone, for a command that shuts its own
    children down in order and stalls when they get the signal at the same time (`ray start --block`: ~2 s
    alone, over 30 s as a group). The SIGKILL after `timeout` still goes to the whole group.
    Returns the names that were running and are now stopped.
    """
    chosen = [r for r in records(run_dir) if names is None or r.name in names]
    if names is not None:
        unknown = sorted(set(names) - {r.name for r in chosen})
        if unknown:
            raise LaunchError(f"no process named {', '.join(unknown)} was started in {run_dir}")
    live = [r for r in chosen if is_alive(r)]
    groups = {r.name: _leads_group(r) for r in live}  # asked before signalling: a dead leader has no pgid
    for record in live:
        _paths(run_dir, record.name)[2].touch()
        if command_only and groups[record.name]:
            for pid in _supervised(record):
                try:
                    os.kill(pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        else:
            _signal(record, signal.SIGTERM, groups[record.name])
    pending = _wait_gone(live, groups, timeout)
    for record in pending:
        _signal(record, signal.SIGKILL, groups[record.name])
    _wait_gone(pending, groups, 10)  # SIGKILL is delivered asynchronously: return once they are gone
    for record in live:
        _reap(record.pid)
    return [r.name for r in live]


def mark_stopping(run_dir: Path, names: Sequence[str] | None = None) -> list[str]:
    """Record that the named live processes are being stopped, without signalling them yet.

    A multi-node job's other nodes fail on their own as soon as one node is stopped: marked first, they
    read as stopped (not failed) whichever of them exits first. Returns the names that were live.
    """
    live = [r for r in records(run_dir) if (names is None or r.name in names) and is_alive(r)]
    for record in live:
        _paths(run_dir, record.name)[2].touch()
    return [r.name for r in live]
