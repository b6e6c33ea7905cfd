"""`flagscale train` with `experiment.runner.launcher: slurm`, on a real Slurm.

tests/slurm_support.py starts a one-node Slurm of the test's own (munged, slurmctld, slurmd from Debian's
packages, a private slurm.conf); the tiny GPT (examples/tiny_gpt) runs in the session's megatron venv
(tests/megatron_env.py), through `sbatch`, `srun` and torchrun, with real gloo and megatron.core:

* it trains through sbatch; `action=status` reports it while it runs and after; the script Slurm stored for
  the job (`scontrol write batch_script`) is byte for byte the one `action=dryrun` printed;
* `action=stop` cancels it, and only it: another job of the test (`sbatch --wrap 'sleep 300'`) keeps running;
* a rank SIGKILLed after a checkpoint is restarted by the job monitor inside the allocation, resumes from the
  checkpoint and finishes on the uninterrupted run's loss curve; so does a SIGSTOPped (hung) rank.

Without Slurm (fast, no torch): bad input fails with one line before anything is written or submitted: an
unknown launcher or a mistyped Slurm setting (the nearest name), a missing `sbatch`; and the dry run's script
quotes every config value; flagscale.runner.reap ends what a command leaves behind.
"""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO_ROOT, pid_alive, wait_until
from megatron_env import megatron_env, run_env
from slurm_support import PARTITION, slurm  # noqa: F401  (the session fixture)

CONF = REPO_ROOT / "examples" / "tiny_gpt" / "conf"
ITERS = 30
SAVE_EVERY = 5
# fp32 on one machine; a resumed run replays the same batches and RNG states (tests/test_train.py: ~1e-6)
RTOL, ATOL = 1e-4, 1e-5
HOSTILE = "$(touch PWNED) `touch PWNED2`; touch PWNED3 'x\" &"


# ------------------------------------------------------------------------------ helpers
class Trainer:
    """`flagscale train` of the session's megatron venv against the local Slurm."""

    def __init__(self, menv, cluster) -> None:
        self.menv, self.slurm = menv, cluster
        self.data = menv.corpus()
        self.timings: dict[str, float] = {}

    def exp(self, name: str) -> Path:
        return self.menv.work / "slurm" / name

    def __call__(self, name: str, *overrides: str, timeout: float = 300) -> subprocess.CompletedProcess:
        args = [
            str(self.menv.flagscale),
            "train",
            str(CONF),
            f"experiment.exp_dir={self.exp(name)}",
            f"train.data.data_path={self.data}",
            f"train.model.train_iters={ITERS}",
            "experiment.runner.launcher=slurm",
            f"experiment.runner.slurm.partition={PARTITION}",
            "experiment.runner.slurm.time=10",
            *overrides,
        ]
        env = {**run_env(), **self.slurm.env}
        return subprocess.run(args, cwd=self.menv.work, env=env, capture_output=True, text=True, timeout=timeout)

    def submit(self, name: str, *overrides: str) -> str:
        result = self(name, *overrides)
        assert result.returncode == 0, result.stdout + result.stderr
        match = re.search(r"submitted slurm job (\d+)", result.stdout)
        assert match, result.stdout
        return match.group(1)

    def wait_ended(self, job_id: str, timeout: float = 300) -> str:
        active = ("PENDING", "CONFIGURING", "RUNNING", "COMPLETING")
        assert wait_until(lambda: self.slurm.job_state(job_id) not in active, timeout, interval=1), (
            f"slurm job {job_id} still {self.slurm.job_state(job_id)} after {timeout} s"
        )
        return self.slurm.job_state(job_id) or "?"


def losses(exp_dir: Path) -> dict[int, float]:
    path = exp_dir / "logs" / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return {m["iteration"]: m["loss"] for m in map(json.loads, lines)}


def heartbeats(exp_dir: Path) -> list[dict]:
    beats = []
    for path in (exp_dir / "run" / "heartbeats").glob("*.json"):
        try:
            beats.append(json.loads(path.read_text()))
        except (OSError, ValueError):  # replaced while read
            continue
    return beats


def logs(exp_dir: Path) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted((exp_dir / "logs").glob("*.*")))


@pytest.fixture(scope="module")
def trainer(tmp_path_factory, slurm):  # noqa: F811
    return Trainer(megatron_env(tmp_path_factory), slurm)


# ------------------------------------------------------------------------------ real Slurm
@pytest.fixture(scope="module")
def trained(trainer) -> tuple[Path, str, list[str]]:
    """The tiny GPT through sbatch, followed with action=status: (folder, job id, status lines seen)."""
    name = "trained"
    start = time.perf_counter()
    job_id = trainer.submit(name, f"train.system.checkpoint.save_interval={SAVE_EVERY}")
    seen: list[str] = []

    def ended() -> bool:
        status = trainer(name, "action=status")
        assert status.returncode == 0, status.stderr
        seen.append(status.stdout)
        return trainer.slurm.job_state(job_id) not in ("PENDING", "RUNNING", "COMPLETING")

    assert wait_until(ended, 300, interval=1), logs(trainer.exp(name))
    trainer.timings["train through sbatch"] = round(time.perf_counter() - start, 1)
    return trainer.exp(name), job_id, seen


@pytest.mark.integration
def test_tiny_gpt_trains_through_sbatch_and_status_reports_it(trainer, trained):
    exp, job_id, seen = trained
    assert trainer.slurm.job_state(job_id) == "COMPLETED", logs(exp)
    assert json.loads((exp / "run" / "slurm.json").read_text())["job_id"] == job_id
    curve = losses(exp)
    assert sorted(curve) == list(range(1, ITERS + 1)), logs(exp)
    assert curve[ITERS] < 0.7 * curve[1], curve
    running = [s for s in seen if f"slurm job {job_id}: RUNNING" in s]
    assert running, seen[:3]
    assert any("experiment tiny_gpt: running" in s for s in running), running[-1]
    final = trainer("trained", "action=status")
    assert f"slurm job {job_id}: COMPLETED" in final.stdout and "exit 0:0" in final.stdout, final.stdout
    assert "experiment tiny_gpt: finished" in final.stdout, final.stdout
    as_json = json.loads(trainer("trained", "action=status", "++experiment.runner.json=true").stdout)
    assert as_json["slurm"]["job_id"] == job_id and as_json["slurm"]["state"] == "COMPLETED"
    assert as_json["state"] == "finished" and as_json["iteration"] == ITERS, as_json


@pytest.mark.integration
def test_dryrun_prints_the_script_slurm_runs(trainer, trained):
    exp, job_id, _ = trained
    dry = trainer("trained", "action=dryrun", f"train.system.checkpoint.save_interval={SAVE_EVERY}")
    assert dry.returncode == 0, dry.stderr
    script = dry.stdout.split("(submitted as is):\n", 1)[1].rsplit("$ sbatch", 1)[0]
    assert script.startswith("#!/usr/bin/env bash\n#SBATCH")
    stored = trainer.slurm.run("scontrol", "write", "batch_script", job_id, "-")
    assert stored.returncode == 0, stored.stderr
    assert stored.stdout == script
    assert (exp / "scripts" / "slurm.sbatch").read_text() == script
    assert f"$ sbatch --parsable {exp / 'scripts' / 'slurm.sbatch'}" in dry.stdout


@pytest.mark.integration
def test_stop_cancels_this_job_and_only_it(trainer, trained):
    slurm_ = trainer.slurm
    other = slurm_.run("sbatch", "--parsable", "--output=/dev/null", f"--partition={PARTITION}", "--wrap", "sleep 300")
    assert other.returncode == 0, other.stderr
    other_id = other.stdout.strip().split(";")[0]
    name = "stopped"
    exp = trainer.exp(name)
    try:
        job_id = trainer.submit(name, "train.model.train_iters=100000")  # runs until stopped
        assert wait_until(lambda: any(h.get("iteration", 0) >= 2 for h in heartbeats(exp)), 240, interval=1), logs(exp)
        assert slurm_.job_state(other_id) == "RUNNING"
        pids = [h["pid"] for h in heartbeats(exp)]
        assert pids and all(pid_alive(p) for p in pids)
        stop = trainer(name, "action=stop")
        assert stop.returncode == 0 and stop.stdout.strip() == f"stopped: slurm job {job_id}", stop.stdout + stop.stderr
        assert slurm_.job_state(job_id) == "CANCELLED"
        assert wait_until(lambda: not any(pid_alive(p) for p in pids), 30), "a rank outlived its cancelled job"
        assert slurm_.job_state(other_id) == "RUNNING", "action=stop touched another Slurm job"
        status = trainer(name, "action=status")
        assert f"slurm job {job_id}: CANCELLED" in status.stdout, status.stdout
        assert "experiment tiny_gpt: stopped" in status.stdout, status.stdout  # the monitor's record
        again = trainer(name, "action=stop")
        assert again.stdout.strip() == "stopped: nothing was running", again.stdout
    finally:
        slurm_.run("scancel", other_id)


@pytest.mark.integration
def test_a_crash_under_slurm_is_restarted_on_the_same_loss_curve(trainer, trained):
    reference = losses(trained[0])
    name = "crashed"
    exp = trainer.exp(name)
    ft = [
        "++experiment.runner.fault_tolerance.max_restarts=2",
        "++experiment.runner.fault_tolerance.restart_backoff=1",
        "++experiment.runner.fault_tolerance.heartbeat_interval=0",  # every iteration: the kill lands in time
    ]
    job_id = trainer.submit(name, f"train.system.checkpoint.save_interval={SAVE_EVERY}", *ft)
    tracker = exp / "checkpoints" / "latest_checkpointed_iteration.txt"

    victims: list[dict] = []

    def after_first_checkpoint() -> bool:
        saved = tracker.exists() and tracker.read_text().strip() == str(SAVE_EVERY)
        victims[:] = [h for h in heartbeats(exp) if saved and h.get("iteration", 0) > SAVE_EVERY]
        return bool(victims)

    assert wait_until(after_first_checkpoint, 240, interval=0.1), logs(exp)
    killed_at = victims[0]["iteration"]
    os.kill(victims[0]["pid"], signal.SIGKILL)
    assert trainer.wait_ended(job_id) == "COMPLETED", logs(exp)
    record = json.loads((exp / "run" / "status.json").read_text())
    assert record["state"] == "finished" and record["restarts"] == 1, record
    [diagnosis] = record["diagnoses"]
    assert diagnosis["event"] == "crash", diagnosis
    assert killed_at < ITERS, "the job finished before the kill"
    rank_log = "".join(p.read_text() for p in (exp / "logs").glob("node*/rank*.log"))
    assert "(iteration 5)" in rank_log or "iteration 5" in rank_log, rank_log[-2000:]
    curve = losses(exp)  # a resumed run's entries replace the killed attempt's
    assert sorted(curve) == list(range(1, ITERS + 1))
    assert all(math.isclose(curve[i], reference[i], rel_tol=RTOL, abs_tol=ATOL) for i in curve), (curve, reference)


@pytest.mark.integration
def test_a_hang_under_slurm_is_restarted_on_the_same_loss_curve(trainer, trained):
    """A SIGSTOPped rank: the monitor finds the hang, stops the srun (the stopped rank is continued so that it
    ends, and nothing of the attempt is left to hold the allocation) and runs it again."""
    reference = losses(trained[0])
    name = "hung"
    exp = trainer.exp(name)
    ft = [
        "++experiment.runner.fault_tolerance.max_restarts=1",
        "++experiment.runner.fault_tolerance.restart_backoff=1",
        "++experiment.runner.fault_tolerance.hang_timeout=10",
        "++experiment.runner.fault_tolerance.heartbeat_interval=0",
    ]
    job_id = trainer.submit(name, f"train.system.checkpoint.save_interval={SAVE_EVERY}", *ft)
    tracker = exp / "checkpoints" / "latest_checkpointed_iteration.txt"
    victims: list[dict] = []

    def after_first_checkpoint() -> bool:
        saved = tracker.exists() and tracker.read_text().strip() == str(SAVE_EVERY)
        victims[:] = [h for h in heartbeats(exp) if saved and h.get("iteration", 0) > SAVE_EVERY]
        return bool(victims)

    assert wait_until(after_first_checkpoint, 240, interval=0.1), logs(exp)
    os.kill(victims[0]["pid"], signal.SIGSTOP)
    stopped_at = time.monotonic()
    assert trainer.wait_ended(job_id) == "COMPLETED", logs(exp)
    record = json.loads((exp / "run" / "status.json").read_text())
    assert record["state"] == "finished" and record["restarts"] == 1, record
    [diagnosis] = record["diagnoses"]
    assert diagnosis["event"] == "hang" and "stopped by a signal" in diagnosis["message"], diagnosis
    assert not pid_alive(victims[0]["pid"]), "the stopped rank outlived its attempt"
    curve = losses(exp)
    assert sorted(curve) == list(range(1, ITERS + 1))
    assert all(math.isclose(curve[i], reference[i], rel_tol=RTOL, abs_tol=ATOL) for i in curve), (curve, reference)
    trainer.timings["hang to finish"] = round(time.monotonic() - stopped_at, 1)


@pytest.mark.integration
def test_report_timings(trainer):
    print(f"\ntimings (s): {trainer.timings}")


# ------------------------------------------------------------------------------ without Slurm (fast)
FAKE_PYTHON = "#!/bin/sh\nexit 0\n"  # the nodes' interpreter: never run by these tests


@pytest.fixture
def fast(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for suffix in (".bin", ".idx"):
        (data / f"corpus{suffix}").write_bytes(b"")
    fake = tmp_path / "python"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    exp_dir = tmp_path / "exp dir"

    def train(
        *overrides: str, path: str | None = None, config: str = "train", conf: Path = CONF
    ) -> subprocess.CompletedProcess:
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        if path is not None:
            env["PATH"] = path
        args = [f"experiment.exp_dir='{exp_dir}'", f"train.data.data_path={data / 'corpus'}"]
        args += [f"experiment.runner.python={fake}", *overrides]
        return subprocess.run(
            [sys.executable, "-m", "flagscale.cli", "train", str(conf), "--config-name", config, *args],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )

    train.exp_dir = exp_dir  # type: ignore[attr-defined]
    train.root = tmp_path  # type: ignore[attr-defined]
    return train


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["experiment.runner.launcher=slrum"], r"experiment.runner.launcher=slrum: use one of .*did you mean 'slurm'"),
        (
            ["experiment.runner.launcher=slurm", "++experiment.runner.slurm.partiton=gpu"],
            r"experiment.runner.slurm.partiton: unknown key \(did you mean 'partition'\?\)",
        ),
        (["experiment.runner.launcher=slurm", "experiment.runner.slurm.time=2days"], "a Slurm time limit"),
        (
            ["experiment.runner.launcher=slurm", "experiment.runner.slurm.extra_sbatch=['qos=high']"],
            "is not an sbatch option",
        ),
        (["experiment.runner.launcher=slurm", "experiment.runner.hostfile=hosts"], "Slurm picks the nodes"),
        (["experiment.runner.launcher=ssh"], "needs experiment.runner.hostfile"),
    ],
)
def test_bad_slurm_input_fails_in_one_line_before_anything_is_written(fast, overrides, message):
    result = fast(*overrides)
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert re.search(message, lines[0]), lines[0]
    assert not fast.exp_dir.exists(), "something was written"


def test_missing_sbatch_fails_in_one_line_before_anything_is_written(fast, tmp_path):
    empty = tmp_path / "bin"
    empty.mkdir()
    for action in ("action=run", "action=status", "action=stop"):
        result = fast("experiment.runner.launcher=slurm", action, path=str(empty))
        assert result.returncode == 2, result.stdout + result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and "not found on PATH" in lines[0] and "Slurm's client commands" in lines[0], lines
        assert not fast.exp_dir.exists(), "something was written"
    assert "sbatch" in fast("experiment.runner.launcher=slurm", path=str(empty)).stderr


def test_dryrun_script_quotes_config_values_and_writes_nothing(fast):
    result = fast(
        "experiment.runner.launcher=slurm",
        "action=dryrun",
        "experiment.runner.nproc_per_node=2",
        "experiment.runner.slurm.nodes=2",
        "experiment.runner.slurm.account=proj1",
        "experiment.runner.slurm.gpus_per_node=2",
        "experiment.runner.slurm.extra_sbatch=['--qos=high','--comment=two words']",
        "+experiment.envs.EVIL='" + HOSTILE.replace("'", "\\'") + "'",  # Hydra's quoting
        "+experiment.node_envs.node-b.ONLY_B=1",
        "+experiment.device_type_envs.cpu.ONLY_CPU=1",
        "experiment.cmds.before_start='echo before'",
        config="dp2",
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "on Slurm, 2 node(s) x 2 process(es), world size 4" in out
    script = out.split("(submitted as is):\n", 1)[1].rsplit("$ sbatch", 1)[0]
    header = [line for line in script.splitlines() if line.startswith("#SBATCH")]
    assert header == [
        "#SBATCH --job-name=tiny_gpt_dp2",
        "#SBATCH --nodes=2",
        "#SBATCH --ntasks-per-node=1",
        "#SBATCH --account=proj1",
        "#SBATCH --gpus-per-node=2",
        f"#SBATCH {shlex.quote('--output=' + str(fast.exp_dir / 'logs' / 'slurm-%j.out'))}",
        "#SBATCH --open-mode=append",
        f"#SBATCH {shlex.quote('--chdir=' + str(fast.exp_dir))}",
        "#SBATCH --qos=high",
        "#SBATCH '--comment=two words'",
    ], header
    assert f"export EVIL={shlex.quote(HOSTILE)}" in script
    assert "export ONLY_CPU=1" in script  # the job's device (cpu) picks its device_type_envs
    assert 'case "${SLURMD_NODENAME}" in\n  node-b)\n    export ONLY_B=1\n    ;;\nesac' in script
    srun = shlex.split(next(line for line in script.splitlines() if "srun" in line and "exec" in line))
    assert srun[1:6] == [str(fast.root / "python"), "-m", "flagscale.runner.monitor", "--exp-dir", str(fast.exp_dir)]
    assert srun[srun.index("srun") :] == [
        "srun", "--nodes=2", "--ntasks-per-node=1", "--kill-on-bad-exit=1",
        "bash", str(fast.exp_dir / "scripts" / "slurm.sbatch"), "node",
    ]  # fmt: skip
    torchrun = next(line for line in script.splitlines() if "torch.distributed.run" in line)
    assert '"--nnodes=${SLURM_JOB_NUM_NODES}"' in torchrun and "--nproc-per-node=2" in torchrun
    assert '"--rdzv-endpoint=${FLAGSCALE_MASTER_ADDR}:${FLAGSCALE_MASTER_PORT}"' in torchrun
    assert script.index("echo before") < script.index("torch.distributed.run")
    assert not fast.exp_dir.exists(), "a dry run wrote files"
    assert not list(fast.root.glob("PWNED*"))


def test_reap_ends_what_the_command_left_behind(tmp_path):
    """The node part runs torchrun under flagscale.runner.reap: an orphan (here a backgrounded sleep in a
    session of its own, as a killed rank's helpers are) is ended when the command exits, and its exit
    status is passed on."""
    pid_file = tmp_path / "orphan.pid"
    cmd = f"setsid sleep 300 & echo $! > {pid_file}; exit 3"
    start = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "flagscale.runner.reap", "--", "sh", "-c", cmd],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 3, result.stderr
    assert "ended 1 process(es) the job left behind" in result.stderr
    orphan = int(pid_file.read_text())
    assert not pid_alive(orphan)
    assert time.monotonic() - start < 30


def test_a_line_break_never_reaches_the_script(fast, tmp_path):
    """An #SBATCH line or a comment with a line break would run the rest as a command: refused, one line."""
    from flagscale.errors import ConfigError
    from flagscale.runner.slurm import SlurmSettings, header

    conf = tmp_path / "conf"
    shutil.copytree(CONF, conf)
    (conf / "evil.yaml").write_text('defaults:\n  - train\n  - _self_\nexperiment:\n  exp_name: "x\\ntouch PWNED"\n')
    result = fast("experiment.runner.launcher=slurm", "action=dryrun", config="evil", conf=conf)
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "experiment.exp_name=" in lines[0] and "control characters" in lines[0], lines
    with pytest.raises(ConfigError, match="cannot hold a line break"):  # a folder's name, say
        header(SlurmSettings(), job_name="x", nodes=1, output="out\ntouch PWNED/slurm-%j.out", chdir="/tmp")
