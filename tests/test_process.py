"""Recorded processes: real subprocesses, real signals, real pid files."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flagscale.errors import LaunchError
from flagscale.runner import process


def wait_for(predicate, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def py(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def test_start_records_logs_and_exit_status(tmp_path):
    rec = process.start(py("import sys; print('hello'); sys.exit(0)"), name="ok", run_dir=tmp_path)
    bad = process.start(py("import sys; print('oops', file=sys.stderr); sys.exit(3)"), name="bad", run_dir=tmp_path)
    wait_for(lambda: process.state(tmp_path, "ok") != "running" and process.state(tmp_path, "bad") != "running")
    assert process.states(tmp_path) == {"bad": "failed", "ok": "finished"}
    assert process.exit_status(tmp_path, "bad") == 3
    assert Path(rec.log).read_text() == "hello\n"
    assert "oops" in Path(bad.log).read_text()
    data = json.loads((tmp_path / "pids" / "ok.json").read_text())
    assert data["pid"] == rec.pid and data["cmd"][-1].startswith("import sys") and data["start_ticks"] > 0
    assert process.state(tmp_path, "never") == "unknown"


def test_a_running_name_cannot_start_twice_and_stop_ends_the_whole_group(tmp_path):
    # the child ignores SIGTERM and has a grandchild: stop must still end both, by group
    code = (
        "import signal, subprocess, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)']); print('up', flush=True); "
        "time.sleep(600)"
    )
    rec = process.start(py(code), name="job", run_dir=tmp_path)
    wait_for(lambda: "up" in Path(rec.log).read_text())
    assert process.state(tmp_path, "job") == "running"
    with pytest.raises(LaunchError, match="job is already running.*action=stop"):
        process.start(py("pass"), name="job", run_dir=tmp_path)
    members = [int(p) for p in os.listdir("/proc") if p.isdigit() and _pgid(int(p)) == rec.pid]
    assert len(members) >= 3  # supervisor, child, grandchild
    started = time.monotonic()
    assert process.stop(tmp_path, timeout=1.0) == ["job"]
    assert time.monotonic() - started < 10
    assert all(process.start_ticks(pid) is None for pid in members)
    assert process.state(tmp_path, "job") == "stopped"
    assert process.stop(tmp_path) == []  # nothing left to stop
    with pytest.raises(LaunchError, match="no process named other"):
        process.stop(tmp_path, ["other"])


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None


def test_stop_spares_a_decoy_and_a_reused_pid(tmp_path):
    decoy = subprocess.Popen(py("import time; time.sleep(600)  # flagscale.runner.supervise job"))
    try:
        time.sleep(0.05)  # start times have a 10 ms granularity: the decoy is older than our job
        rec = process.start(py("import time; time.sleep(600)"), name="job", run_dir=tmp_path)
        assert process.stop(tmp_path, timeout=5) == ["job"]
        assert decoy.poll() is None
        # a record whose pid now belongs to somebody else (the decoy) is not ours: not alive, not signalled
        forged = {**json.loads((tmp_path / "pids" / "job.json").read_text()), "pid": decoy.pid}
        (tmp_path / "pids" / "job.json").write_text(json.dumps(forged))
        assert process.state(tmp_path, "job") == "stopped"
        assert process.stop(tmp_path) == []
        assert decoy.poll() is None
        assert rec.pid != decoy.pid
    finally:
        decoy.kill()
        decoy.wait()


# A command that, on SIGTERM, notes it and shuts its child down itself; the child notes a SIGTERM it gets.
ORDERLY = """
import os, signal, subprocess, sys, time
out = sys.argv[1]
child = subprocess.Popen([sys.executable, "-c", (
    "import signal, sys, time\\n"
    "signal.signal(signal.SIGTERM, lambda *_: (open(sys.argv[1] + '/child', 'w').close(), sys.exit(0)))\\n"
    "open(sys.argv[1] + '/child-up', 'w').close()\\n"
    "time.sleep(300)"), out])
def on_term(*_):
    open(out + "/command", "w").close()
    time.sleep(0.3)  # time for a group-wide SIGTERM to reach the child too
    child.kill()
    child.wait()
    sys.exit(0)
signal.signal(signal.SIGTERM, on_term)
time.sleep(300)
"""


@pytest.mark.parametrize("command_only", [False, True])
def test_stop_command_only_leaves_the_children_to_the_command(tmp_path, command_only):
    run_dir, out = tmp_path / "run", tmp_path / "out"
    out.mkdir()
    process.start([sys.executable, "-c", ORDERLY, str(out)], name="orderly", run_dir=run_dir)
    wait_for(lambda: (out / "child-up").exists())
    assert process.stop(run_dir, ["orderly"], timeout=10, command_only=command_only) == ["orderly"]
    assert (out / "command").exists()  # the command got the SIGTERM either way
    assert (out / "child").exists() is not command_only  # its child only when the whole group is signalled
    assert process.state(run_dir, "orderly") == "stopped"


def test_sigkill_without_exit_status_is_failed(tmp_path):
    rec = process.start(py("import time; time.sleep(600)"), name="job", run_dir=tmp_path)
    os.killpg(rec.pid, signal.SIGKILL)
    wait_for(lambda: process.state(tmp_path, "job") != "running")
    assert process.state(tmp_path, "job") == "failed"


def test_sigterm_is_recorded_as_the_shell_would(tmp_path):
    rec = process.start(py("import time; print('up', flush=True); time.sleep(600)"), name="job", run_dir=tmp_path)
    wait_for(lambda: "up" in Path(rec.log).read_text())
    os.killpg(rec.pid, signal.SIGTERM)
    wait_for(lambda: process.state(tmp_path, "job") != "running")
    assert process.exit_status(tmp_path, "job") == 143
    assert process.state(tmp_path, "job") == "failed"


def test_foreground_returns_the_exit_status(tmp_path, capfd):
    assert process.run_foreground(py("print('attached'); raise SystemExit(5)"), name="fg", run_dir=tmp_path) == 5
    assert "attached" in capfd.readouterr().out
    assert process.state(tmp_path, "fg") == "failed"


def test_bad_input(tmp_path):
    with pytest.raises(LaunchError, match="not a plain file name"):
        process.start(py("pass"), name="../x", run_dir=tmp_path)
    with pytest.raises(LaunchError, match="empty command"):
        process.start([], name="x", run_dir=tmp_path)
    rec = process.start(["/nonexistent/binary"], name="missing", run_dir=tmp_path)
    wait_for(lambda: process.state(tmp_path, "missing") != "running")
    assert process.exit_status(tmp_path, "missing") == 127
    assert "could not start /nonexistent/binary" in Path(rec.log).read_text()
    (tmp_path / "pids" / "broken.json").write_text("{not json")
    with pytest.raises(LaunchError, match="broken.json is damaged"):
        process.states(tmp_path)
