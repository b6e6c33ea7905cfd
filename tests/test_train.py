"""`flagscale train` for real: the tiny GPT example through the installed, patched megatron-core wheel.

One fresh virtual environment gets `pip install ".[train]" -C device=cpu -C backend=megatron` (the
backend wheel is cached in $FLAGSCALE_TEST_CACHE/build-cache). Its own `flagscale` command then trains
examples/tiny_gpt with real torchrun, gloo and megatron.core, from a scratch folder:

* world size 1, detached, followed with action=status: the loss falls, logs per node and rank,
  metrics and distributed checkpoints appear;
* TP=2, PP=2 and DP=2 (2 processes, --foreground): the loss falls; TP and DP start from the same
  weights and see the same global batches as world size 1, so their losses match it;
* kill (action=stop) after the first checkpoint, run again: it resumes from the last complete
  checkpoint and continues on world size 1's loss curve; with dropout on too, against an uninterrupted
  dropout run (the checkpoint holds every rank's RNG state);
* TP=2 resumes from world size 1's checkpoint: weights and optimizer load, the RNG state does not (another
  layout), and the driver says so; so does a checkpoint in the older format, without RNG state;
* bf16 mixed precision on the CPU;
* two nodes over ssh: a local sshd on 127.0.0.1/127.0.0.2 (started by the test with its own keys), one
  2-node DP=2 job over gloo, stopped on both nodes after a checkpoint and resumed. Skipped, with the
  reason, where no sshd can run (CI: apt-get install openssh-server openssh-client).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest
from conftest import REPO_ROOT, wait_until
from megatron_env import install_cpu_megatron

pytestmark = pytest.mark.integration

CONF = REPO_ROOT / "examples" / "tiny_gpt" / "conf"
ITERS = 40
SAVE_EVERY = 10
# Runs that are stopped mid-way save more often: each save takes ~1 s here, which keeps the run going
# well past the moment `action=stop` lands (the losses do not depend on it).
SAVE_OFTEN = 5
# Stopping two nodes goes through ssh (mark, then stop, on each): slower still, so that run saves every 2.
SAVE_VERY_OFTEN = 2
# Megatron pads the vocabulary to a multiple of make_vocab_size_divisible_by x TP: with 130 the 257
# byte-level ids pad to 260 for TP=1 and TP=2 alike, so both layouts start from the same embedding.
VOCAB_DIVISIBLE_BY = 130
VOCAB = 260
# fp32 on one machine: TP/DP only reorder a few reductions (measured differences ~1e-6).
RTOL, ATOL = 1e-3, 1e-3
# Dropout on: the loss then depends on every random draw, so an exact resume needs the RNG state back.
# Not in the example's YAML (the settings default them to 0.0): `++` adds or overrides.
DROPOUT = ("++train.model.hidden_dropout=0.1", "++train.model.attention_dropout=0.1")


def _env() -> dict[str, str]:
    drop = (
        "PYTHONPATH",
        "VIRTUAL_ENV",
        "MEGATRON_DEVICE_TYPE",
        "MEGATRON_COLLECTIVE_BACKEND",
        "RANK",
        "WORLD_SIZE",
        "LOCAL_RANK",
        "FLAGSCALE_ROOT",
    )
    env = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith(("MASTER_", "TORCHELASTIC_"))}
    env.update(OMP_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1", PYTHONWARNINGS="ignore")
    return env


class Env:
    def __init__(self, root: Path, work: Path, data: Path) -> None:
        self.root, self.work, self.data = root, work, data
        self.flagscale = root / "bin" / "flagscale"
        self.python = root / "bin" / "python"
        self.timings: dict[str, float] = {}

    def train(
        self,
        name: str,
        *overrides: str,
        config: str = "train",
        foreground: bool = False,
        label: str | None = None,
        timeout: float = 300,
    ) -> subprocess.CompletedProcess:
        args = [
            str(self.flagscale),
            "train",
            str(CONF),
            "--config-name",
            config,
            f"experiment.exp_dir={self.work / name}",
            f"train.data.data_path={self.data}",
            f"train.model.train_iters={ITERS}",
            f"train.model.make_vocab_size_divisible_by={VOCAB_DIVISIBLE_BY}",
            *overrides,
        ]
        if foreground:
            args.insert(3, "--foreground")
        start = time.perf_counter()
        result = subprocess.run(args, cwd=self.work, env=_env(), capture_output=True, text=True, timeout=timeout)
        if label:
            self.timings[label] = round(time.perf_counter() - start, 1)
        return result

    def exp(self, name: str) -> Path:
        return self.work / name


@pytest.fixture(scope="module")
def venv(tmp_path_factory) -> Env:
    base = tmp_path_factory.mktemp("train")
    root = base / "venv"
    install_s = install_cpu_megatron(root, ".[train]")
    work = base / "work"
    work.mkdir()
    # The example's corpus, made by its own script with the installed megatron-core's dataset builder.
    corpus = subprocess.run(
        [
            str(root / "bin" / "python"),
            str(REPO_ROOT / "examples/tiny_gpt/make_corpus.py"),
            "--out",
            str(work / "data"),
            "--docs",
            "400",
        ],
        cwd=work,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert corpus.returncode == 0, corpus.stdout + corpus.stderr
    e = Env(root, work, work / "data" / "corpus_text_document")
    e.timings["install"] = install_s
    return e


def metrics(exp_dir: Path) -> list[dict]:
    path = exp_dir / "logs" / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def losses(exp_dir: Path) -> dict[int, float]:
    """iteration -> loss; a resumed run's later entries replace the killed run's."""
    return {m["iteration"]: m["loss"] for m in metrics(exp_dir)}


def _status(venv: Env, name: str, *overrides: str) -> list[str]:
    """The nodes' states, from action=status's JSON record (`--json`)."""
    result = venv.train(name, "action=status", "++experiment.runner.json=true", *overrides)
    assert result.returncode == 0, result.stderr
    return [node["state"] for node in json.loads(result.stdout)["nodes"]]


@pytest.fixture(scope="module")
def world1(venv) -> Path:
    """World size 1, detached like a user's run, followed with action=status until it ends."""
    start = time.perf_counter()
    result = venv.train("world1", f"train.system.checkpoint.save_interval={SAVE_EVERY}")
    assert result.returncode == 0 and "started node0" in result.stdout, result.stdout + result.stderr
    assert wait_until(lambda: _status(venv, "world1") != ["running"], 240)
    venv.timings["world1"] = round(time.perf_counter() - start, 1)
    exp = venv.exp("world1")
    log = (exp / "logs" / "node0.log").read_text()
    assert _status(venv, "world1") == ["finished"], log[-3000:]
    return exp


def test_world_size_1_trains_logs_and_checkpoints(venv, world1):
    curve = losses(world1)
    assert sorted(curve) == list(range(1, ITERS + 1))
    first, last = curve[1], curve[ITERS]
    print(f"\nworld1: loss {first:.3f} -> {last:.3f}")
    assert abs(first - math.log(VOCAB)) < 0.3, first  # a fresh model guesses uniformly
    assert last < 0.6 * first, curve
    node_log = (world1 / "logs" / "node0.log").read_text()
    assert "device cpu, backend gloo, world size 1" in node_log
    assert str(venv.root) in node_log  # megatron-core comes from the installed wheel
    assert "step time (ms)" in node_log and "tokens/s" in node_log
    assert (world1 / "logs" / "node0" / "rank0.log").stat().st_size > 0
    m = metrics(world1)[-1]
    assert m["step_time"] > 0 and m["tokens_per_sec"] > 0 and 0 < m["lr"] <= 0.01 and m["memory_gib"] > 0
    assert any((world1 / "logs" / "tensorboard").glob("events.out.tfevents.*"))  # the train extra has tensorboard
    ckpt = world1 / "checkpoints"
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text().strip() == str(ITERS)
    assert sorted(p.name for p in ckpt.glob("iter_*")) == [
        f"iter_{i:07d}" for i in range(SAVE_EVERY, ITERS + 1, SAVE_EVERY)
    ]
    assert (ckpt / f"iter_{ITERS:07d}" / "metadata.json").is_file()
    assert (world1 / "pids" / "node0.exit").read_text().strip() == "0"


@pytest.mark.parametrize("layout", ["tp2", "pp2", "dp2"])
def test_two_process_layouts(venv, world1, layout):
    result = venv.train(layout, "train.system.checkpoint.save=null", config=layout, foreground=True, label=layout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "world size 2" in result.stdout
    curve = losses(venv.exp(layout))
    assert sorted(curve) == list(range(1, ITERS + 1))
    print(f"\n{layout}: loss {curve[1]:.3f} -> {curve[ITERS]:.3f} ({venv.timings[layout]} s)")
    assert curve[ITERS] < 0.6 * curve[1]
    ranks = sorted(p.name for p in (venv.exp(layout) / "logs" / "node0").glob("rank*.log"))
    assert ranks == ["rank0.log", "rank1.log"]
    if layout in ("tp2", "dp2"):  # same initial weights and global batches as world size 1
        reference = losses(world1)
        assert all(math.isclose(curve[i], reference[i], rel_tol=RTOL, abs_tol=ATOL) for i in curve), (
            f"{layout} {curve} != world1 {reference}"
        )


@pytest.fixture(scope="module")
def world1_dropout(venv) -> Path:
    """World size 1 with dropout, uninterrupted and without checkpoints: the curve a resumed run must follow."""
    result = venv.train(
        "world1-dropout", *DROPOUT, "train.system.checkpoint.save=null", foreground=True, label="world1-dropout"
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return venv.exp("world1-dropout")


@pytest.mark.parametrize("dropout", [False, True], ids=["no-dropout", "dropout"])
def test_killed_run_resumes_on_the_same_loss_curve(venv, request, dropout):
    reference = losses(request.getfixturevalue("world1_dropout" if dropout else "world1"))
    extra = DROPOUT if dropout else ()
    name = "resume-dropout" if dropout else "resume"
    exp = venv.exp(name)
    started = venv.train(name, f"train.system.checkpoint.save_interval={SAVE_OFTEN}", *extra)
    assert started.returncode == 0, started.stderr
    tracker = exp / "checkpoints" / "latest_checkpointed_iteration.txt"
    assert wait_until(tracker.exists, 240), (exp / "logs" / "node0.log").read_text()[-3000:]
    stopped = venv.train(name, "action=stop")  # mid-run: ITERS - SAVE_OFTEN iterations are left
    assert stopped.returncode == 0 and "stopped: node0" in stopped.stdout, stopped.stdout + stopped.stderr
    assert _status(venv, name) == ["stopped"]
    killed_at = int(tracker.read_text())
    assert killed_at < ITERS
    before = losses(exp)
    assert max(before) < ITERS, "the run finished before it was stopped"

    resumed = venv.train(
        name, f"train.system.checkpoint.save_interval={SAVE_OFTEN}", *extra, foreground=True, label=name
    )
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert f"resumed from {exp / 'checkpoints' / f'iter_{killed_at:07d}'} (iteration {killed_at})" in resumed.stdout
    logged = [m["iteration"] for m in metrics(exp)]
    assert logged[len(before) :] == list(range(killed_at + 1, ITERS + 1))  # appended by the resumed run
    curve = losses(exp)
    assert sorted(curve) == list(range(1, ITERS + 1))
    # Weights, Adam moments, LR schedule, data position and RNG state all come back: the uninterrupted curve.
    off = {
        i: (curve[i], reference[i])
        for i in curve
        if not math.isclose(curve[i], reference[i], rel_tol=1e-4, abs_tol=1e-4)
    }
    after = range(killed_at + 1, ITERS + 1)
    print(
        f"\n{name}: killed at {killed_at}; resumed      {[round(curve[i], 6) for i in after]}"
        f"\n{name}: killed at {killed_at}; uninterrupted {[round(reference[i], 6) for i in after]}"
    )
    assert not off, f"resumed != uninterrupted at {len(off)} iterations (resumed, uninterrupted): {off}"
    assert "with its RNG state" in resumed.stdout
    assert _status(venv, name) == ["finished"]


def test_dropout_is_on_in_the_dropout_runs(world1, world1_dropout):
    """The dropout resume above is a real test only if dropout changes the curve."""
    plain, dropped = losses(world1), losses(world1_dropout)
    assert sorted(dropped) == list(range(1, ITERS + 1)) and dropped[ITERS] < 0.6 * dropped[1], dropped
    assert max(abs(plain[i] - dropped[i]) for i in plain) > 1e-2, (plain, dropped)


def test_resume_in_another_layout_loads_the_weights_but_not_the_rng(venv, world1):
    """TP=2 resumes from world size 1's checkpoint at iteration 20: weights, Adam state and LR schedule load
    (the loss continues on world size 1's curve), the RNG state does not (other ranks), and it says so once."""
    load = venv.work / "world1-iter20"
    shutil.copytree(world1 / "checkpoints" / f"iter_{20:07d}", load / f"iter_{20:07d}")
    (load / "latest_checkpointed_iteration.txt").write_text("20\n")
    result = venv.train(
        "tp2-from-world1",
        f"++train.system.checkpoint.load={load}",
        "train.system.checkpoint.save=null",
        config="tp2",
        foreground=True,
        label="tp2-from-world1",
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"resumed from {load / f'iter_{20:07d}'} (iteration 20)" in result.stdout
    notes = [line for line in result.stdout.splitlines() if "RNG state not restored" in line]
    assert len(notes) == 1 and "TP=1 PP=1 DP=1" in notes[0] and "TP=2 PP=1 DP=1" in notes[0], result.stdout[-3000:]
    curve, reference = losses(venv.exp("tp2-from-world1")), losses(world1)
    assert sorted(curve) == list(range(21, ITERS + 1))
    assert all(math.isclose(curve[i], reference[i], rel_tol=RTOL, abs_tol=ATOL) for i in curve), (
        f"tp2 from iteration 20 {curve} != world1 {reference}"
    )


def test_checkpoint_without_rng_state_still_loads(venv, world1):
    """A checkpoint from before the RNG state was kept: world size 1's at iteration 30 with its common state
    rewritten to what the older code wrote (optimizer, scheduler, iteration; no layout). It resumes on
    world size 1's curve (no dropout) and says the RNG state was not restored."""
    load = venv.work / "world1-iter30-old"
    shutil.copytree(world1 / "checkpoints" / f"iter_{30:07d}", load / f"iter_{30:07d}")
    (load / "latest_checkpointed_iteration.txt").write_text("30\n")
    common = load / f"iter_{30:07d}" / "common.pt"
    rewrite = (
        "import sys, torch; d = torch.load(sys.argv[1], weights_only=False); "
        "torch.save({k: d[k] for k in ('optimizer', 'scheduler', 'iteration')}, sys.argv[1])"
    )
    subprocess.run([str(venv.python), "-c", rewrite, str(common)], check=True, env=_env())
    result = venv.train(
        "old-ckpt",
        f"++train.system.checkpoint.load={load}",
        "train.system.checkpoint.save=null",
        foreground=True,
        label="old-ckpt",
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"resumed from {load / f'iter_{30:07d}'} (iteration 30)\n" in result.stdout
    assert "RNG state not restored: the checkpoint has none" in result.stdout
    curve, reference = losses(venv.exp("old-ckpt")), losses(world1)
    assert sorted(curve) == list(range(31, ITERS + 1))
    assert all(math.isclose(curve[i], reference[i], rel_tol=1e-4, abs_tol=1e-4) for i in curve), (curve, reference)


def test_bf16_mixed_precision_trains_on_the_cpu(venv):
    """bf16 as Megatron-LM does it (Float16Module + fp32 main weights in the optimizer): the cpu supports it."""
    result = venv.train(
        "bf16", "train.system.precision=bf16", "train.system.checkpoint.save=null", foreground=True, label="bf16"
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "precision bf16" in result.stdout
    curve = losses(venv.exp("bf16"))
    assert sorted(curve) == list(range(1, ITERS + 1)) and curve[ITERS] < 0.6 * curve[1], curve


# ------------------------------------------------------------ two nodes, ssh (`sshd`: tests/conftest.py)
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_over_ssh_stop_and_resume(venv, world1, sshd):
    """One DP=2 job on two "nodes" (127.0.0.1, 127.0.0.2) started over ssh: stopped on both nodes after
    its first checkpoint, then run again in the foreground, resuming on world size 1's loss curve."""
    port, options = sshd
    hostfile = venv.work / "hostfile"
    hostfile.write_text("127.0.0.1 slots=1 type=cpu\n127.0.0.2 slots=1\n")
    name = "two-nodes"
    exp = venv.exp(name)
    overrides = [
        "experiment.runner.nnodes=2",
        "experiment.runner.nproc_per_node=1",
        f"experiment.runner.hostfile={hostfile}",
        f"experiment.runner.ssh_port={port}",
        f"experiment.runner.master_port={_free_port()}",
        "experiment.runner.master_addr=127.0.0.1",
        "experiment.runner.ssh_options=[" + ",".join(f"'{o}'" for o in options) + "]",
        f"train.system.checkpoint.save_interval={SAVE_VERY_OFTEN}",
    ]
    start = time.perf_counter()
    started = venv.train(name, *overrides, config="dp2")
    assert started.returncode == 0, started.stdout + started.stderr
    assert "started node0 on 127.0.0.1" in started.stdout and "started node1 on 127.0.0.2" in started.stdout
    tracker = exp / "checkpoints" / "latest_checkpointed_iteration.txt"
    assert wait_until(tracker.exists, 240), {p.name: p.read_text()[-2000:] for p in (exp / "logs").glob("node*.log")}
    stopped = venv.train(name, "action=stop", *overrides)
    assert stopped.returncode == 0 and "stopped: node0, node1" in stopped.stdout, stopped.stdout + stopped.stderr
    assert _status(venv, name, *overrides) == ["stopped", "stopped"]
    killed_at = int(tracker.read_text())
    assert killed_at < ITERS and max(losses(exp)) < ITERS, "the job finished before it was stopped"

    resumed = venv.train(name, *overrides, config="dp2", foreground=True, timeout=400)
    venv.timings["two-nodes"] = round(time.perf_counter() - start, 1)
    logs = {p.name: p.read_text() for p in (exp / "logs").glob("node*.log")}
    assert resumed.returncode == 0, (
        resumed.stdout[-2000:] + resumed.stderr[-2000:] + str({k: v[-2000:] for k, v in logs.items()})
    )
    assert set(logs) == {"node0.log", "node1.log"}
    assert "world size 2" in "".join(logs.values())
    assert f"(iteration {killed_at})" in "".join(logs.values())  # "resumed from ..."
    rank_logs = sorted(p.relative_to(exp / "logs").as_posix() for p in (exp / "logs").glob("node*/rank*.log"))
    assert rank_logs == ["node0/rank0.log", "node1/rank1.log"], rank_logs
    curve, reference = losses(exp), losses(world1)  # DP=2 over two nodes: world size 1's global batches
    assert sorted(curve) == list(range(1, ITERS + 1)) and curve[ITERS] < 0.6 * curve[1]
    assert all(math.isclose(curve[i], reference[i], rel_tol=RTOL, abs_tol=ATOL) for i in curve), (
        f"two nodes {curve} != world1 {reference}"
    )
    assert _status(venv, name, *overrides) == ["finished", "finished"]


def test_report_timings(venv):
    print(f"\ntimings (s): {venv.timings}")
