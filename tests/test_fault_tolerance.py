"""Fault tolerance for real: the tiny GPT on DP=2 (real torchrun, gloo, megatron.core) under the job monitor.

* crash: rank 1 is SIGKILLed (its pid from its heartbeat) once its heartbeat says iteration 12; the monitor
  diagnoses it (killed by SIGKILL, rank 1, iteration 12), restarts the job by itself from the checkpoint of
  iteration 10, and every loss logged after the restart equals the uninterrupted run's exactly (dropout on:
  the checkpoint's RNG state matters);
* hang: rank 1 is SIGSTOPped; the hang is found within hang_timeout + 10 s and diagnosed (rank 1, its
  iteration), the job restarts (its start-up bounded by start_timeout, not the short hang_timeout) and ends with
  the uninterrupted run's final loss;
* give up: a job that fails every time (its entrypoint is missing) ends `failed` after max_restarts, each
  diagnosis (a missing file) in the status record;
* the status record matches the run (state, iteration, loss, restarts) and `action=status --json` prints it;
* bad input: hang_timeout <= 0 fails with one line before anything is written.

Each run is 20 iterations of the tiny model with small micro-batches; margins are generous (2 busy cores).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import REPO_ROOT, wait_until
from megatron_env import MegatronEnv, free_port, megatron_env, run_env

pytestmark = pytest.mark.integration

CONF = REPO_ROOT / "examples" / "tiny_gpt" / "conf"
ITERS = 20
SAVE_EVERY = 5
HANG_TIMEOUT = 12  # in training (an iteration takes ~0.1 s); start-up has START_TIMEOUT
START_TIMEOUT = 180  # imports, rendezvous and the checkpoint load on 2 busy cores
# Dropout on: an exact resume needs the checkpoint's RNG state. Micro-batches of 1 make an iteration long
# enough (~0.1 s here) that a kill seen at iteration 12 lands before the save of iteration 15.
COMMON = (
    f"train.model.train_iters={ITERS}",
    f"train.system.checkpoint.save_interval={SAVE_EVERY}",
    "train.model.micro_batch_size=1",
    "train.model.global_batch_size=16",
    "++train.model.hidden_dropout=0.1",
    "++train.model.attention_dropout=0.1",
    "experiment.runner.fault_tolerance.heartbeat_interval=0",
    "experiment.runner.fault_tolerance.restart_backoff=1",
)


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> MegatronEnv:
    return megatron_env(tmp_path_factory)


def train(env: MegatronEnv, name: str, *overrides: str, flags: tuple[str, ...] = (), timeout: float = 400):
    args = [env.flagscale, "train", CONF, "--config-name", "dp2", *flags]
    args += [f"experiment.exp_dir={env.work / name}", f"train.data.data_path={env.corpus()}", *COMMON, *overrides]
    return env.run(args, timeout=timeout)


def metrics(exp: Path) -> list[dict]:
    path = exp / "logs" / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def status(env: MegatronEnv, name: str, *overrides: str) -> dict:
    result = train(env, name, "action=status", *overrides, flags=("--json",))
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def heartbeat(exp: Path, rank: int, node: int = 0) -> dict | None:
    try:
        return json.loads((exp / "run" / "heartbeats" / f"node{node}-rank{rank}.json").read_text())
    except (OSError, ValueError):
        return None


def logs(exp: Path) -> str:
    return "\n".join(f"--- {p}\n{p.read_text()[-3000:]}" for p in sorted((exp / "logs").rglob("*.log")))


@pytest.fixture(scope="module")
def reference(env) -> dict[int, float]:
    """The uninterrupted run (foreground: the progress line)."""
    result = train(env, "reference", flags=("--foreground",))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"[flagscale] tiny_gpt_dp2: finished | iteration {ITERS}/{ITERS} | loss" in result.stdout
    curve = {m["iteration"]: m["loss"] for m in metrics(env.work / "reference")}
    assert sorted(curve) == list(range(1, ITERS + 1))
    return curve


def _signal_when(
    exp: Path, rank: int, iteration: int, sig: int, timeout: float = 240, node: int = 0
) -> tuple[int, float]:
    """Send `sig` to the rank's process as soon as its heartbeat reaches `iteration`: (the pid, when)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        beat = heartbeat(exp, rank, node)
        if beat and beat["phase"] == "train" and beat["iteration"] >= iteration:
            os.kill(beat["pid"], sig)
            return beat["pid"], time.time()
        time.sleep(0.005)
    raise AssertionError(f"rank {rank} never reached iteration {iteration}:\n{logs(exp)}")


def _wait_ended(env: MegatronEnv, name: str, timeout: float = 300, *overrides: str) -> dict:
    final: dict = {}

    def ended() -> bool:
        final.update(status(env, name, *overrides))
        return final["state"] in ("finished", "failed", "stopped")

    assert wait_until(ended, timeout, interval=2), f"{final}\n{logs(env.work / name)}"
    return final


def test_crash_restarts_from_the_last_checkpoint_with_the_same_losses(env, reference):
    name, exp = "crash", env.work / "crash"
    started = train(env, name, "experiment.runner.fault_tolerance.hang_timeout=120")
    assert started.returncode == 0 and "started node0 under the job monitor" in started.stdout, started.stderr
    pid, killed_at = _signal_when(exp, 1, 12, signal.SIGKILL)
    iteration_at_kill = heartbeat(exp, 1)["iteration"]

    running: dict = {}
    assert wait_until(lambda: running.update(status(env, name)) or running["restarts"] == 1, 120, 0.5), running
    final = _wait_ended(env, name)
    assert final["state"] == "finished", f"{final}\n{logs(exp)}"

    # the diagnosis: rank 1 killed by SIGKILL at the iteration its heartbeat last said
    [diagnosis] = final["diagnoses"]
    assert diagnosis["event"] == "crash" and diagnosis["kind"] == "signal", diagnosis
    assert diagnosis["rank"] == 1 and diagnosis["iteration"] == iteration_at_kill, diagnosis
    assert "SIGKILL" in diagnosis["message"] and diagnosis["node"] == "node0", diagnosis
    assert Path(diagnosis["log"]).is_file()

    # restarted by itself from iteration 10, and on the uninterrupted run's losses exactly
    node_log = (exp / "logs" / "node0.log").read_text()
    assert "(iteration 10) with its RNG state" in node_log, node_log[-3000:]
    lines = metrics(exp)
    restart = next(i for i in range(1, len(lines)) if lines[i]["iteration"] <= lines[i - 1]["iteration"])
    before, after = lines[:restart], lines[restart:]
    assert after[0]["iteration"] == 11 and after[-1]["iteration"] == ITERS
    assert before[-1]["iteration"] >= 11  # past the checkpoint it resumed from
    assert all(m["loss"] == reference[m["iteration"]] for m in lines), [
        (m["iteration"], m["loss"], reference[m["iteration"]]) for m in lines if m["loss"] != reference[m["iteration"]]
    ]

    # the status record matches the run
    assert final["iteration"] == ITERS and final["restarts"] == 1 and final["max_restarts"] == 3
    assert final["loss"] == lines[-1]["loss"] == reference[ITERS]
    assert final["nodes"] == [{"name": "node0", "host": "localhost", "state": "finished"}]
    assert sorted(r["rank"] for r in final["ranks"]) == [0, 1] and all(r["pid"] != pid for r in final["ranks"])
    table = train(env, name, "action=status").stdout
    assert f"finished, iteration {ITERS}/{ITERS}, loss {reference[ITERS]:.6f}" in table and "restarts 1/3" in table
    restart_s = final["attempt_started"] - diagnosis["time"]
    print(
        f"\ncrash at iteration {iteration_at_kill}: detected {diagnosis['time'] - killed_at:.1f} s after the kill, "
        f"restarted {restart_s:.1f} s later (backoff 1 s); losses after the restart: "
        f"{[(m['iteration'], m['loss']) for m in after]} == reference"
    )


def test_hang_is_detected_diagnosed_and_restarted(env, reference):
    name, exp = "hang", env.work / "hang"
    started = train(
        env,
        name,
        f"experiment.runner.fault_tolerance.hang_timeout={HANG_TIMEOUT}",
        f"experiment.runner.fault_tolerance.start_timeout={START_TIMEOUT}",
    )
    assert started.returncode == 0, started.stderr
    pid, stopped_at = _signal_when(exp, 1, 7, signal.SIGSTOP)
    try:
        time.sleep(0.5)
        stuck_at = heartbeat(exp, 1)["iteration"]  # what the rank had written when the signal landed
        seen: dict = {}
        assert wait_until(lambda: seen.update(status(env, name)) or bool(seen["diagnoses"]), HANG_TIMEOUT + 60, 1)
    finally:
        try:  # the monitor has killed it by now; never leave a stopped process behind
            os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:
            pass
    [diagnosis] = seen["diagnoses"]
    latency = diagnosis["time"] - stopped_at
    assert diagnosis["event"] == "hang" and diagnosis["rank"] == 1 and diagnosis["iteration"] == stuck_at, diagnosis
    assert "stopped by a signal" in diagnosis["message"], diagnosis
    assert latency <= HANG_TIMEOUT + 10, f"hang found {latency:.1f} s after the SIGSTOP"
    final = _wait_ended(env, name)
    assert final["state"] == "finished" and final["restarts"] == 1, f"{final}\n{logs(exp)}"
    curve = {m["iteration"]: m["loss"] for m in metrics(exp)}
    assert curve[ITERS] == reference[ITERS] == final["loss"]
    print(
        f"\nhang at iteration {stuck_at}: detected {latency:.1f} s after the SIGSTOP (hang_timeout {HANG_TIMEOUT} s), "
        f"restarted {final['attempt_started'] - diagnosis['time']:.1f} s later (stopping the job, backoff 1 s); "
        f"final loss {final['loss']} == {reference[ITERS]}"
    )


def test_a_job_that_always_fails_ends_failed_with_its_diagnoses(env):
    name = "gives-up"
    missing = env.work / "no-such-entrypoint.py"
    result = train(
        env,
        name,
        f"++experiment.task.entrypoint={missing}",
        "experiment.runner.fault_tolerance.max_restarts=1",
        "experiment.runner.fault_tolerance.restart_backoff=0",
        flags=("--foreground",),
    )
    assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-3000:]
    assert "[flagscale] failed after 1 restart(s)" in result.stdout
    record = status(env, name)
    assert record["state"] == "failed" and record["restarts"] == 1
    assert len(record["diagnoses"]) == 2, record["diagnoses"]
    for d in record["diagnoses"]:
        assert d["event"] == "crash" and d["kind"] == "missing_file" and str(missing) in d["message"], d
    assert "missing_file" in train(env, name, "action=status").stdout


def test_two_nodes_over_ssh_crash_and_restart(env, reference, sshd):
    """The same crash on a 2-node job (one rank per node, 127.0.0.1 and 127.0.0.2 over ssh, node agents):
    rank 1 on node1 SIGKILLed at iteration 12, restarted on both nodes from 10, the same losses."""
    port, options = sshd
    hostfile = env.work / "hostfile"
    hostfile.write_text("127.0.0.1 slots=1\n127.0.0.2 slots=1\n")
    nodes = (
        "experiment.runner.nnodes=2",
        "experiment.runner.nproc_per_node=1",
        f"experiment.runner.hostfile={hostfile}",
        f"experiment.runner.ssh_port={port}",
        "experiment.runner.master_addr=127.0.0.1",
        f"experiment.runner.master_port={free_port()}",
        "experiment.runner.ssh_options=[" + ",".join(f"'{o}'" for o in options) + "]",
    )
    name, exp = "two-nodes", env.work / "two-nodes"
    started = train(env, name, *nodes, "experiment.runner.fault_tolerance.hang_timeout=120")
    assert started.returncode == 0, started.stdout + started.stderr
    assert "started node1 on 127.0.0.2 under the job monitor" in started.stdout, started.stdout
    _, killed_at = _signal_when(exp, 1, 12, signal.SIGKILL, node=1)
    final = _wait_ended(env, name, 300, *nodes)
    assert final["state"] == "finished" and final["restarts"] == 1, f"{final}\n{logs(exp)}"
    [diagnosis] = final["diagnoses"]
    assert diagnosis["rank"] == 1 and diagnosis["node"] == "node1" and "SIGKILL" in diagnosis["message"], diagnosis
    assert final["nodes"] == [
        {"name": "node0", "host": "127.0.0.1", "state": "finished"},
        {"name": "node1", "host": "127.0.0.2", "state": "finished"},
    ]
    assert "(iteration 10) with its RNG state" in (exp / "logs" / "node0.log").read_text()
    lines = metrics(exp)
    assert lines[-1]["iteration"] == ITERS
    assert all(m["loss"] == reference[m["iteration"]] for m in lines), [
        (m["iteration"], m["loss"], reference[m["iteration"]]) for m in lines
    ]
    print(f"\ntwo nodes: crash detected {diagnosis['time'] - killed_at:.1f} s after the kill (ssh polls every 2 s)")


def test_hang_timeout_must_be_positive(env):
    exp = env.work / "bad-timeout"
    for value in ("0", "-5"):
        result = train(env, "bad-timeout", f"experiment.runner.fault_tolerance.hang_timeout={value}")
        assert result.returncode == 2, result.stdout + result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and "experiment.runner.fault_tolerance.hang_timeout" in lines[0], result.stderr
        assert "must be > 0" in lines[0]
    assert not exp.exists()


def test_status_before_any_run(env):
    result = subprocess.run(
        [str(env.flagscale), "train", str(CONF), f"experiment.exp_dir={env.work / 'never'}", "action=status", "--json"],
        env=run_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["state"] == "unknown"
