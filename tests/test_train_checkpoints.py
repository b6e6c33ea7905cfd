"""Atomic checkpoints, keep_last and the metrics writers of `flagscale train`, for real: the tiny GPT example at
DP=2 under real torchrun, gloo and megatron.core (the session's megatron venv: tests/megatron_env.py).

* Uninterrupted, saving every 5 iterations with keep_last=2: only the last two complete checkpoints remain, and
  TensorBoard's own reader (EventAccumulator) finds exactly metrics.jsonl's losses (float32, as stored).
* Kill during save: the save of iteration 10 stalls its last rank before it writes (the test-only hook
  FLAGSCALE_TEST_STALL_SAVE; the other rank is inside the save, blocked in its collectives), the test waits for
  the stall and SIGKILLs every process of the job: the tracker still names 5 and iter_0000010/ is half-written.
  Run again, the job resumes from 5 (never from the folder the tracker does not vouch for), saves 10 again over
  the half-written one, and every loss from iteration 6 on equals the uninterrupted run's; TensorBoard shows
  each iteration once, as the resumed run logged it.
* Weights & Biases in offline mode when wandb is installed in the venv (else skipped with the reason): its
  transaction log holds the logged losses.
"""

from __future__ import annotations

import base64
import json
import math
import os
import signal
import struct
import subprocess
from pathlib import Path

import pytest
from conftest import REPO_ROOT, wait_until
from megatron_env import MegatronEnv, megatron_env, run_env

CONF = REPO_ROOT / "examples" / "tiny_gpt" / "conf"
ITERS, SAVE_EVERY, KEEP, KILL_AT = 15, 5, 2, 10
TRACKER = "latest_checkpointed_iteration.txt"


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> MegatronEnv:
    return megatron_env(tmp_path_factory)


def train(
    env: MegatronEnv, name: str, *overrides: str, foreground: bool = True, config: str = "dp2", iters: int = ITERS
):
    args = [env.flagscale, "train", CONF, "--config-name", config]
    if foreground:
        args.append("--foreground")
    args += [
        f"experiment.exp_dir={env.work / name}",
        f"train.data.data_path={env.corpus()}",
        f"train.model.train_iters={iters}",
        *overrides,
    ]
    return env.run(args, timeout=420, label=name)


def saving(keep_last: int | None = KEEP) -> tuple[str, ...]:
    keep = () if keep_last is None else (f"++train.system.checkpoint.keep_last={keep_last}",)
    return (f"train.system.checkpoint.save_interval={SAVE_EVERY}", *keep)


def losses(exp: Path) -> dict[int, float]:
    """iteration -> loss from metrics.jsonl; a resumed run's later lines replace the killed run's."""
    lines = (exp / "logs" / "metrics.jsonl").read_text().splitlines()
    return {r["iteration"]: r["loss"] for r in map(json.loads, lines)}


def tensorboard_scalars(env: MegatronEnv, exp: Path) -> dict[str, dict[int, float]]:
    """tag -> {step: value}, as TensorBoard's own reader (EventAccumulator, in the run's venv) loads the files."""
    reader = (
        "import json, sys\n"
        "from tensorboard.backend.event_processing.event_accumulator import EventAccumulator\n"
        "acc = EventAccumulator(sys.argv[1]); acc.Reload()\n"
        "print(json.dumps({t: [[e.step, e.value] for e in acc.Scalars(t)] for t in acc.Tags()['scalars']}))\n"
    )
    read = env.run([env.python, "-c", reader, exp / "logs" / "tensorboard"], timeout=120)
    assert read.returncode == 0, read.stderr[-3000:]
    return {tag: dict(events) for tag, events in json.loads(read.stdout).items()}


def f32(x: float) -> float:
    return struct.unpack("f", struct.pack("f", x))[0]


def folders(ckpt: Path) -> list[str]:
    return sorted(p.name for p in ckpt.iterdir())


@pytest.fixture(scope="module")
def uninterrupted(env) -> Path:
    result = train(env, "uninterrupted", *saving())
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return env.work / "uninterrupted"


@pytest.mark.integration
def test_keep_last_leaves_the_newest_complete_checkpoints(uninterrupted):
    ckpt = uninterrupted / "checkpoints"
    assert (ckpt / TRACKER).read_text() == f"{ITERS}\n"
    # iter_5 went once iter_15 was complete; nothing else (no temp tracker, nothing renamed aside) is left
    assert folders(ckpt) == [f"iter_{ITERS - SAVE_EVERY:07d}", f"iter_{ITERS:07d}", TRACKER]
    assert sorted(losses(uninterrupted)) == list(range(1, ITERS + 1))


@pytest.mark.integration
def test_tensorboard_event_files_hold_the_logged_losses(env, uninterrupted):
    scalars = tensorboard_scalars(env, uninterrupted)
    records = [json.loads(line) for line in (uninterrupted / "logs" / "metrics.jsonl").read_text().splitlines()]
    for tag in ("loss", "lr", "grad_norm", "tokens_per_sec", "step_time", "memory_gib"):
        assert scalars[f"train/{tag}"] == {r["iteration"]: f32(r[tag]) for r in records}, tag
    assert all(r["memory_gib"] > 0 for r in records)


def _job_processes(exp: Path) -> list[int]:
    """Every process of the job: the recorded ones (pids/*.json) and all their descendants (torchrun puts its
    ranks into sessions of their own, so a process group does not hold them)."""
    import psutil

    found: list[int] = []
    for record in (exp / "pids").glob("*.json"):
        try:
            top = psutil.Process(json.loads(record.read_text())["pid"])
            found += [top.pid, *(p.pid for p in top.children(recursive=True))]
        except psutil.NoSuchProcess:
            pass
    return found


@pytest.mark.integration
def test_kill_during_save_resumes_from_the_previous_checkpoint(env, uninterrupted):
    name = "killed-in-save"
    exp, ckpt = env.work / name, env.work / name / "checkpoints"
    started = train(env, name, *saving(), f"++experiment.envs.FLAGSCALE_TEST_STALL_SAVE={KILL_AT}", foreground=False)
    assert started.returncode == 0, started.stdout + started.stderr
    assert wait_until((ckpt / ".stalled").exists, 300, interval=0.2), (exp / "logs" / "node0.log").read_text()[-3000:]
    pids = _job_processes(exp)
    assert len(pids) >= 4, pids  # supervisor, torchrun, two ranks
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert wait_until(lambda: not _job_processes(exp), 30)

    # the state the kill left: the tracker still names the previous checkpoint, iter_10 is half-written
    assert (ckpt / TRACKER).read_text() == f"{KILL_AT - SAVE_EVERY}\n"
    half = ckpt / f"iter_{KILL_AT:07d}"
    assert half.is_dir() and not (half / "metadata.json").exists(), sorted(p.name for p in half.iterdir())
    assert max(losses(exp)) == KILL_AT  # the killed run logged iteration 10 before it saved
    (ckpt / ".stalled").unlink()

    resumed = train(env, name, *saving())
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    previous = ckpt / f"iter_{KILL_AT - SAVE_EVERY:07d}"
    assert f"resumed from {previous} (iteration {KILL_AT - SAVE_EVERY}) with its RNG state" in resumed.stdout
    assert (ckpt / TRACKER).read_text() == f"{ITERS}\n"
    assert folders(ckpt) == [f"iter_{KILL_AT:07d}", f"iter_{ITERS:07d}", TRACKER]
    assert (half / "metadata.json").is_file()  # saved again, completely, over the half-written folder

    curve, reference = losses(exp), losses(uninterrupted)
    assert sorted(curve) == list(range(1, ITERS + 1))
    after = range(KILL_AT - SAVE_EVERY + 1, ITERS + 1)
    worst = max(abs(curve[i] - reference[i]) for i in after)
    print(f"\nkill during save: resumed from {KILL_AT - SAVE_EVERY}; max |loss - uninterrupted| = {worst:.3g}")
    assert all(math.isclose(curve[i], reference[i], rel_tol=1e-6, abs_tol=1e-6) for i in after), (curve, reference)
    # the resumed run's event file purged the killed run's 6..10: each iteration once, as last logged
    assert tensorboard_scalars(env, exp)["train/loss"] == {i: f32(v) for i, v in curve.items()}


# --------------------------------------------------------------------------------------- Weights & Biases
def _wandb_records(path: Path) -> list[bytes]:
    """The records of a W&B transaction log (run-*.wandb): a 7-byte header, then LevelDB-log-style chunks
    (crc32 4, length 2, type 1) in 32 KiB blocks; type 1 a whole record, 2/3/4 its first/middle/last part."""
    data, block, pos = path.read_bytes(), 32768, 7
    records, part = [], b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        length, kind = struct.unpack("<HB", data[pos + 4 : pos + 7])
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind in (1, 2):
            part = chunk
        elif kind in (3, 4):
            part += chunk
        if kind in (1, 4):
            records.append(part)
    return records


@pytest.mark.integration
def test_wandb_offline_run_holds_the_logged_losses(env):
    probe = env.run([env.python, "-c", "import wandb"])
    if probe.returncode != 0:
        pytest.skip("wandb is not installed in the megatron venv (pip install wandb): W&B logging untested")
    name = "wandb"
    result = train(
        env,
        name,
        "train.system.checkpoint.save=null",
        "++train.system.logging.wandb.project=flagscale-test",
        "++train.system.logging.wandb.mode=offline",
        config="train",
        iters=3,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    exp = env.work / name
    (log,) = (exp / "logs" / "wandb").glob("offline-run-*/run-*.wandb")
    reader = (
        "import base64, json, sys\n"
        "from wandb.proto import wandb_internal_pb2 as pb\n"
        "for line in sys.stdin.read().split():\n"
        "    r = pb.Record(); r.ParseFromString(base64.b64decode(line))\n"
        "    if r.WhichOneof('record_type') == 'history':\n"
        "        items = r.history.item\n"
        "        print(json.dumps({'/'.join(i.nested_key) or i.key: json.loads(i.value_json) for i in items}))\n"
    )
    read = subprocess.run(
        [str(env.python), "-c", reader],
        input="\n".join(base64.b64encode(r).decode() for r in _wandb_records(log)),
        capture_output=True,
        text=True,
        env=run_env(),
        timeout=120,
    )
    assert read.returncode == 0, read.stderr[-3000:]
    history = [json.loads(line) for line in read.stdout.splitlines()]
    logged = {h["_step"]: h["train/loss"] for h in history if "train/loss" in h}
    assert logged == losses(exp) and sorted(logged) == [1, 2, 3], (logged, losses(exp))


# ------------------------------------------------------------------------------- settings (fast, no torch)
@pytest.mark.parametrize(
    "system, message",
    [
        ({"checkpoint": {"keep_last": 0}}, "train.system.checkpoint.keep_last=0: must be at least 1"),
        ({"checkpoint": {"keep_lats": 2}}, r"unknown key \(did you mean 'keep_last'\?\)"),
        ({"logging": {"tensorboard": "yes"}}, "train.system.logging.tensorboard"),
        ({"logging": {"wandb": {"name": "x"}}}, "train.system.logging.wandb: missing required field 'project'"),
        ({"logging": {"wandb": {"project": "p", "mode": "local"}}}, "use one of online, offline, disabled"),
    ],
)
def test_bad_checkpoint_and_logging_settings(system, message):
    from flagscale.errors import ConfigError
    from flagscale.train.settings import train_settings

    with pytest.raises(ConfigError, match=message) as err:
        train_settings({"system": system, "data": {"data_path": "/data/corpus"}})
    assert "\n" not in str(err.value)


def test_checkpoint_and_logging_defaults():
    from flagscale.train.settings import train_settings

    t = train_settings({"system": {"logging": {"wandb": {"project": "p"}}}, "data": {"data_path": "/d"}})
    assert t.system.checkpoint.keep_last is None and t.system.logging.tensorboard is None
    assert (t.system.logging.wandb.project, t.system.logging.wandb.name, t.system.logging.wandb.mode) == (
        "p",
        None,
        "online",
    )


# ------------------------------------------------- what a save removes and keeps (fast: the folder logic alone)
def _layout(root: Path, iterations: list[int], tracked: int | str | None) -> None:
    for i in iterations:
        (root / f"iter_{i:07d}").mkdir(parents=True)
        (root / f"iter_{i:07d}" / "shard").write_text(str(i))
    if tracked is not None:
        (root / TRACKER).write_text(f"{tracked}\n")


def _left(root: Path) -> tuple[list[str], str | None]:
    tracker = root / TRACKER
    return sorted(p.name for p in root.iterdir() if p.name != TRACKER), (
        tracker.read_text().strip() if tracker.exists() else None
    )


@pytest.mark.parametrize(
    "iterations, tracked, saving_at, left, tracker",
    [
        # a killed save's folders (beyond the tracker's) go; the complete ones stay
        ([5, 10, 15], 5, 10, [5], "5"),
        ([5, 15], 5, 10, [5], "5"),
        # no tracker: nothing is vouched for (a first save that was killed)
        ([5], None, 5, [], None),
        # saving the tracked iteration again: the tracker first moves back to the previous complete checkpoint
        ([5, 10], 10, 10, [5], "5"),
        ([10], 10, 10, [], None),
        # a tracker that is not ours to read (Megatron-LM's "release"): only the target folder is replaced
        ([5, 10], "release", 10, [5], "release"),
    ],
)
def test_a_save_first_clears_what_no_tracker_vouches_for(tmp_path, iterations, tracked, saving_at, left, tracker):
    from flagscale.train import checkpoint

    (tmp_path / ".iter_0000003.discarded").mkdir()  # a removal killed half-way
    _layout(tmp_path, iterations, tracked)
    checkpoint._clear_for(tmp_path, saving_at)
    assert _left(tmp_path) == ([f"iter_{i:07d}" for i in left], tracker)


def test_keep_last_prunes_complete_checkpoints_only(tmp_path):
    from flagscale.train import checkpoint

    _layout(tmp_path, [5, 10, 15, 20], 15)  # 20: beyond the tracker, not a complete checkpoint
    assert checkpoint.complete_iterations(tmp_path) == [5, 10, 15]
    checkpoint._prune(tmp_path, 2)
    assert _left(tmp_path) == (["iter_0000010", "iter_0000015", "iter_0000020"], "15")


def test_tracker_is_replaced_atomically_and_resume_needs_its_folder(tmp_path):
    from flagscale.errors import ConfigError
    from flagscale.train import checkpoint

    _layout(tmp_path, [5], 5)
    checkpoint._write_tracker(tmp_path, 10)
    assert _left(tmp_path) == (["iter_0000005"], "10")  # no temp file left beside it
    with pytest.raises(ConfigError, match=r"names iteration 10 but iter_0000010/ is missing; restore it"):
        checkpoint.latest_dir(tmp_path)
    checkpoint._write_tracker(tmp_path, 5)
    assert checkpoint.latest_dir(tmp_path) == tmp_path / "iter_0000005"


@pytest.mark.parametrize(
    "logging, package, message",
    [
        ({"tensorboard": True}, "tensorboard", "train.system.logging.tensorboard=true needs the tensorboard package"),
        ({"wandb": {"project": "p"}}, "wandb", "train.system.logging.wandb is set but wandb is not installed"),
    ],
)
def test_a_logger_asked_for_but_not_installed_fails_at_launch(logging, package, message):
    """The launcher's check (when the nodes run its interpreter), in this venv where the package is missing."""
    from importlib.util import find_spec

    from flagscale.errors import ConfigError
    from flagscale.train.metrics import check_installed
    from flagscale.train.settings import train_settings

    if find_spec(package) is not None:
        pytest.skip(f"{package} is installed here: nothing to refuse")
    settings = train_settings({"system": {"logging": logging}, "data": {"data_path": "/d"}}).system.logging
    with pytest.raises(ConfigError, match=message):
        check_installed(settings)
    check_installed(train_settings({"data": {"data_path": "/d"}}).system.logging)  # defaults ask for nothing
