"""flagscale.runner.monitor's policy on real processes (`python -m flagscale.runner.monitor -- CMD`), no torch:
CMD stands in for one attempt of a job and writes the heartbeats a training rank would.

The whole job under torchrun and megatron (crash, hang, give up) is tests/test_fault_tolerance.py; here the two
rules that decide whether a fault is restarted at all and when start-up counts as a hang.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

RANK = """\
import sys, time
from flagscale.runner.heartbeat import Heartbeat
beat = Heartbeat(sys.argv[1], rank=0, node=0, interval=0)
beat.beat(0, phase="init", force=True)
mode = sys.argv[2]
if mode == "config":
    raise __import__("flagscale.errors").errors.ConfigError("checkpoint /c holds another model: hidden_size=64")
time.sleep(float(sys.argv[3]))  # a slow start-up: no heartbeat progress meanwhile
for i in range(1, 4):
    beat.beat(i, force=True)
beat.beat(3, phase="done", force=True)
"""


def monitor(exp: Path, mode: str, ft: dict, startup_s: float = 0.0) -> tuple[subprocess.CompletedProcess, dict]:
    (exp / "config").mkdir(parents=True)
    config = {"exp_name": "toy", "world_size": 1, "experiment": {"runner": {"fault_tolerance": ft}}}
    (exp / "config" / "train.json").write_text(json.dumps(config))
    rank = exp / "rank.py"
    rank.write_text(textwrap.dedent(RANK))
    cmd = [sys.executable, "-m", "flagscale.runner.monitor", "--exp-dir", str(exp), "--foreground", "--"]
    result = subprocess.run(
        [*cmd, sys.executable, str(rank), str(exp), mode, str(startup_s)], capture_output=True, text=True, timeout=120
    )
    return result, json.loads((exp / "run" / "status.json").read_text())


def test_a_configuration_error_in_a_rank_is_not_restarted(tmp_path):
    start = time.monotonic()
    result, record = monitor(tmp_path, "config", {"max_restarts": 3, "restart_backoff": 30})
    assert result.returncode == 1, result.stdout + result.stderr
    assert "a restart would repeat this config error" in result.stdout and "restarting in" not in result.stdout
    assert record["state"] == "failed" and record["restarts"] == 0
    [diagnosis] = record["diagnoses"]
    assert diagnosis["kind"] == "config" and "holds another model: hidden_size=64" in diagnosis["message"], diagnosis
    assert time.monotonic() - start < 30  # no backoff waited


def test_start_up_is_bounded_by_start_timeout_not_hang_timeout(tmp_path):
    """A start-up of 4 s with hang_timeout 1 s: a hang without start_timeout, a healthy start with it."""
    hung, record = monitor(tmp_path / "short", "slow", {"max_restarts": 0, "hang_timeout": 1}, startup_s=4)
    assert hung.returncode == 1 and record["state"] == "failed", hung.stdout
    [diagnosis] = record["diagnoses"]
    assert diagnosis["event"] == "hang" and "(hang_timeout 1 s), phase init" in diagnosis["message"], diagnosis
    slow = {"max_restarts": 0, "hang_timeout": 1, "start_timeout": 30}
    fine, record = monitor(tmp_path / "startup", "slow", slow, startup_s=4)
    assert fine.returncode == 0 and record["state"] == "finished" and not record["diagnoses"], fine.stdout
    stalled, record = monitor(tmp_path / "stalled", "slow", {**slow, "start_timeout": 2}, startup_s=30)
    assert stalled.returncode == 1 and "(start_timeout 2 s), phase init" in record["diagnoses"][0]["message"]
