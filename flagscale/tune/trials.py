"""One training trial: a real `flagscale train` job of the candidate, through the task's own plan/run/stop
(local, ssh or Slurm alike), watched through the job monitor's status record, stopped at its time limit, and
measured from what the run itself wrote (its metrics.jsonl and per-rank memory files), never from log text.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import shutil
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flagscale.errors import FlagScaleError
from flagscale.tune.settings import TrainTunerSettings
from flagscale.tune.space import Candidate

ENDED = ("finished", "failed", "stopped")


@dataclass(frozen=True)
class TrialResult:
    status: str  # ok | oom | failed | timeout
    metric: float | None  # median tokens/s of the measured iterations
    peak_memory_gib: float | None  # the largest rank's, as the run measured it
    seconds: float
    reason: str | None = None


def trial_config(base: dict, candidate: Candidate, tuner: TrainTunerSettings, exp_dir: Path, name: str) -> dict:
    """The experiment config of one trial: the candidate's layout, `tuner.iterations` iterations, its own folder,
    no checkpoints saved, no restarts (a crash is a result), metrics in the folder's logs/metrics.jsonl."""
    exp = copy.deepcopy(base["experiment"])
    exp.pop("auto_tuner", None)
    exp["exp_name"], exp["exp_dir"] = name, str(exp_dir)
    runner = exp.setdefault("runner", {}) or {}
    exp["runner"] = runner
    # a trial saves nothing: no graceful shutdown to wait for when it is stopped
    runner.update(
        foreground=False, json=False, rdzv_id=None, stop_timeout=min(float(runner.get("stop_timeout") or 5), 5)
    )
    ft = dict(runner.get("fault_tolerance") or {})
    ft["max_restarts"] = 0
    ft["hang_timeout"] = min(float(ft.get("hang_timeout") or tuner.trial_timeout), tuner.trial_timeout)
    runner["fault_tolerance"] = ft
    train = candidate.apply_plain(copy.deepcopy(base["train"]))
    train["model"]["train_iters"] = tuner.iterations
    system = train["system"]
    ckpt = dict(system.get("checkpoint") or {})
    ckpt.update(save=None, save_interval=0, keep_last=None)
    if ckpt.get("load") and not ckpt.get("finetune"):  # the weights only: a trial counts its iterations from 0
        ckpt["finetune"] = True
    system["checkpoint"] = ckpt
    logging = dict(system.get("logging") or {})
    logging.update(log_interval=1, metrics_file=None, tensorboard=False, wandb=None)
    system["logging"] = logging
    out = {k: v for k, v in base.items() if k not in ("experiment", "train", "hydra")}
    return {**out, "experiment": exp, "train": train, "action": "run"}


def _quiet(call) -> tuple[Any, str]:
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        return call(), buffer.getvalue()


def stop_leftover(config: dict) -> None:
    """A trial a killed tuner left running (its job monitor is detached): stop it before it is rerun."""
    from flagscale.train import TrainTask

    if Path(config["experiment"]["exp_dir"]).is_dir():
        with contextlib.suppress(FlagScaleError, OSError):
            _quiet(TrainTask(config).stop)


def run_trial(config: dict, tuner: TrainTunerSettings, poll: float = 0.5) -> TrialResult:
    from flagscale.train import TrainTask

    exp_dir = Path(config["experiment"]["exp_dir"])
    shutil.rmtree(exp_dir, ignore_errors=True)  # a rerun measures only itself
    task = TrainTask(config)
    start = time.monotonic()
    try:
        _quiet(task.run)
    except FlagScaleError as exc:
        return TrialResult("failed", None, None, time.monotonic() - start, str(exc))
    record = _wait(task, exp_dir, start + tuner.trial_timeout, poll)
    seconds = time.monotonic() - start
    metric = measure(exp_dir, tuner.warmup_iterations)
    peak = peak_memory_gib(exp_dir)
    if record is None or record.get("state") not in ENDED:
        with contextlib.suppress(FlagScaleError, OSError):
            _quiet(task.stop)
        return TrialResult(
            "timeout", metric, peak, seconds, f"stopped at the trial time limit ({tuner.trial_timeout:g} s)"
        )
    diagnoses = record.get("diagnoses") or []
    if record["state"] == "finished" and metric is not None:
        return TrialResult("ok", metric, peak, seconds)
    if any(d.get("kind") == "oom" for d in diagnoses):
        return TrialResult("oom", None, peak, seconds, "out of memory")
    why = diagnoses[-1].get("message") if diagnoses else f"the job ended {record['state']} with no measured iteration"
    return TrialResult("failed", None, peak, seconds, str(why)[:300])


def _wait(task, exp_dir: Path, deadline: float, poll: float) -> dict | None:
    """The job's status record once it has ended, or the last one seen at the deadline."""
    from flagscale.runner import monitor

    record = None
    while time.monotonic() < deadline:
        record = monitor.read_status(exp_dir)
        if record is not None and record.get("state") in ENDED:
            return record
        if record is None or record.get("state") in monitor.ACTIVE:
            record = _nodes_say(task, record)
            if record is not None and record.get("state") in ENDED:
                return record
        time.sleep(poll)
    return record


def _nodes_say(task, record: dict | None) -> dict | None:
    """Local and ssh jobs: the monitor's record merged with the nodes' own states (a monitor that died)."""
    from flagscale.train import launcher

    job = task._job()
    if job.exp.runner.launcher == "slurm":
        return record
    try:
        return launcher.status_record(job)
    except FlagScaleError:
        return record


def measure(exp_dir: Path, warmup: int) -> float | None:
    """Median tokens/s of the logged iterations after the first `warmup` (the run's own metrics.jsonl)."""
    values = [
        r["tokens_per_sec"] for r in _records(exp_dir) if r.get("iteration", 0) > warmup and "tokens_per_sec" in r
    ]
    return float(statistics.median(values)) if values else None


def _records(exp_dir: Path) -> list[dict]:
    path = exp_dir / "logs" / "metrics.jsonl"
    out = []
    with contextlib.suppress(OSError):
        for line in path.read_text().splitlines():
            with contextlib.suppress(ValueError):
                out.append(json.loads(line))
    return out


def peak_memory_gib(exp_dir: Path) -> float | None:
    """The largest rank's peak memory: the driver's per-rank files (logs/memory/rank<R>.json), else the
    reporting rank's memory_gib in metrics.jsonl."""
    peaks = [p for f in sorted((exp_dir / "logs" / "memory").glob("rank*.json")) if (p := _peak_of(f)) is not None]
    if peaks:
        return max(peaks)
    logged = [r["memory_gib"] for r in _records(exp_dir) if isinstance(r.get("memory_gib"), (int, float))]
    return max(logged) if logged else None


def _peak_of(path: Path) -> float | None:
    """A rank's `peak`: what building and training the model added at its high-water mark (bytes; the quantity
    the memory model predicts, see flagscale.train.metrics.MemoryRecord), in GiB."""
    try:
        peak = json.loads(path.read_text()).get("peak")
    except (OSError, ValueError, AttributeError):
        return None
    return float(peak) / 2**30 if isinstance(peak, (int, float)) and not isinstance(peak, bool) else None
