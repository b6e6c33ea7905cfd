"""`flagscale train CONF action=auto_tune`: the training tuner.

1. The space (`experiment.auto_tuner.space`) is enumerated and every candidate checked by the train task's own
   rules (`TrainSettings.check`): what cannot divide is recorded as `invalid`, never launched.
2. The memory model (flagscale.train.memory) predicts each valid candidate's largest per-rank memory; what
   exceeds the budget is `pruned`.
3. The rest are tried in order: every layout's most promising candidate first (by `space.cost`), then the
   other candidates of the layouts that measured best. Dominance skips a candidate (`dominated`) that needs at
   least the memory of one that ran out of memory in the same layout, or that is a trial that ran plus more
   recomputation (never faster than it, so never better than the best). `strategy: exhaustive` tries every
   candidate, skipping nothing (the baseline to judge by).
4. Each trial is a real job (flagscale.tune.trials); history.json/.csv are rewritten after each, and a restarted
   tuner takes finished trials from there. The best is written as `best.yaml`, runnable as is.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flagscale.errors import ConfigError
from flagscale.tune import trials
from flagscale.tune.history import FINISHED, RUNNING, History
from flagscale.tune.settings import WHERE, TrainTunerSettings, train_tuner_settings
from flagscale.tune.space import (
    Candidate,
    cost,
    differs_only_in_recompute,
    enumerate_space,
    nothing_divides,
    predicted_bytes,
    vocab_size,
)

GIB = 2**30


@dataclass
class Search:
    """The state of one search: the candidates left, what ran, the best so far."""

    pending: list[Candidate]
    predicted: dict[str, int | None]
    tuned: bool
    results: dict[str, dict[str, Any]] = field(default_factory=dict)  # key -> history record of a trial
    by_key: dict[str, Candidate] = field(default_factory=dict)
    layouts: set[tuple] = field(default_factory=set)  # the layouts handed out so far

    def best(self) -> dict[str, Any] | None:
        ok = [r for r in self.results.values() if r["status"] == "ok" and r.get("metric") is not None]
        return max(ok, key=lambda r: r["metric"], default=None)

    def next(self) -> Candidate:
        """Exhaustive: the cost order. Tuned: a layout not tried yet (cheapest first), else the cheapest
        candidate of the layout that measured best."""
        if not self.tuned:
            return self.pending.pop(0)
        fresh = [c for c in self.pending if c.layout not in self.layouts]
        if fresh:
            choice = fresh[0]
        else:
            best: dict[tuple, float] = {}
            for key, r in self.results.items():
                layout = self.by_key[key].layout
                best[layout] = max(best.get(layout, 0.0), r.get("metric") or 0.0)
            choice = min(self.pending, key=lambda c: -best.get(c.layout, 0.0))  # stable: cost order within
        self.pending.remove(choice)
        self.layouts.add(choice.layout)
        return choice

    def dominated(self, c: Candidate) -> str | None:
        if not self.tuned:
            return None
        need = self.predicted.get(c.key)
        best = self.best()
        for key, r in self.results.items():
            other = self.by_key[key]
            had = self.predicted.get(key)
            if r["status"] == "oom" and other.layout == c.layout and need is not None and had is not None:
                if need >= had:
                    return (
                        f"needs {need / GIB:.3f} GiB, no less than trial {key} of the same layout, "
                        "which ran out of memory"
                    )
            # recomputation trades speed for memory: with the lighter variant running, it cannot beat the best
            if r["status"] == "ok" and best is not None and differs_only_in_recompute(c, other):
                return (
                    f"is trial {key} plus more recomputation (never faster), and that ran (at "
                    f"{r['metric']:.0f} tokens/s; the best is {best['metric']:.0f})"
                )
        return None


def auto_tune(plain: dict, out=None) -> int:
    """The whole search; returns 0 when a best configuration was found (and, with run_best, launched)."""
    from flagscale.train import TrainTask, hf_start, launcher
    from flagscale.train.settings import train_settings

    if not isinstance(plain.get("experiment"), dict):
        raise ConfigError("the config has no experiment section")
    tuner = train_tuner_settings(plain["experiment"].get("auto_tuner"))
    base = copy.deepcopy(plain)
    base["experiment"].pop("auto_tuner", None)
    job = launcher.job(base)
    if "train" not in base:
        raise ConfigError("the config has no train section: add a task YAML to the defaults list")
    r = job.exp.runner
    world_size = r.nproc_per_node * (len(job.nodes) or r.slurm.nodes or r.nnodes)
    train = train_settings(hf_start.merge(base["train"]))
    valid, rejected = enumerate_space(tuner.space, train, world_size, r.nproc_per_node)
    if not valid:
        raise nothing_divides(rejected, world_size)
    budget, source = memory_budget(tuner, job.exp)
    predicted = _predict(valid, train, world_size)
    limit = budget * tuner.memory_fraction
    fits = [c for c in valid if (predicted[c.key] or 0) <= limit]
    if not fits:
        smallest = min(valid, key=lambda c: predicted[c.key] or 0)
        need = (predicted[smallest.key] or 0) / tuner.memory_fraction / GIB
        raise ConfigError(
            f"{source}: {budget / GIB:.3f} GiB per rank is less than every candidate needs; the smallest "
            f"({smallest.key}) is predicted at {(predicted[smallest.key] or 0) / GIB:.3f} GiB per rank: "
            f"give at least {need:.3f} GiB"
        )
    folder = Path(tuner.dir or Path(job.exp.exp_dir) / "auto_tune").expanduser().resolve()
    configs = {c.key: trials.trial_config(base, c, tuner, folder / "trials" / c.key, _trial_name(job, c)) for c in fits}
    ordered = sorted(fits, key=lambda c: (cost(c, train), -c.micro_batch_size))
    TrainTask(configs[ordered[0].key]).plan()  # data, runtime, device: refused now, before any trial starts

    history = History(
        folder,
        {
            "task": "train",
            "world_size": world_size,
            "metric": tuner.metric,
            "budget_gib": budget / GIB,
            "budget_source": source,
            "strategy": tuner.strategy,
        },
    )
    previous = history.load()
    for rej in rejected:
        history.set(rej.candidate.key, status="invalid", reason=rej.reason, settings=rej.candidate.settings())
    for c in valid:
        history.set(c.key, settings=c.settings(), predicted_gib=_gib(predicted[c.key]), status="pending")
        if (predicted[c.key] or 0) > limit:
            history.set(
                c.key,
                status="pruned",
                reason=f"predicted {_gib(predicted[c.key]):.3f} GiB > budget {limit / GIB:.3f} GiB",
            )
    history.save()
    search = Search(ordered, predicted, tuner.strategy == "tuned", by_key={c.key: c for c in fits})
    best = _loop(search, tuner, history, previous, configs, len(fits), out)
    return _finish(best, search, base, history, tuner, out)


def memory_budget(tuner: TrainTunerSettings, exp) -> tuple[float, str]:
    """(bytes per rank, where that number came from)."""
    if tuner.memory_budget_gib is not None:
        return tuner.memory_budget_gib * GIB, f"{WHERE}.memory_budget_gib"
    from flagscale.runner.environment import job_device

    device = job_device(exp.runner.device)
    manifest = getattr(device, "memory_gib", None)
    if manifest:
        return float(manifest) * GIB, f"hardware/{device.name}/device.toml memory_gib"
    if device.torch_device == "cpu":
        import psutil

        return psutil.virtual_memory().total / exp.runner.nproc_per_node, "the host's memory / nproc_per_node"
    raise ConfigError(
        f"{WHERE}.memory_budget_gib: device {device.name}'s manifest names no memory; set the per-rank budget in GiB"
    )


def _predict(valid: list[Candidate], train, world_size: int) -> dict[str, int | None]:
    vocab = vocab_size(train)
    if vocab is None:
        raise ConfigError(
            "train.model.vocab_size: set it for action=auto_tune, so the memory model can size the embedding "
            "(the hf tokenizer loads only on the nodes)"
        )
    return {c.key: predicted_bytes(c, train, world_size, vocab) for c in valid}


def _trial_name(job, c: Candidate) -> str:
    return f"{job.exp.exp_name}-tune-{c.key}"


def _gib(value: int | None) -> float | None:
    return None if value is None else round(value / GIB, 4)


def _loop(search: Search, tuner, history: History, previous: dict, configs: dict, total: int, out) -> dict | None:
    from flagscale.tune.table import LiveTable

    started = time.monotonic()
    launched, since_best = 0, 0
    most = min(total, tuner.max_trials or total)
    columns = ["#", "candidate", "pred GiB", "status", "tokens/s", "peak GiB", "s"]
    with LiveTable(f"auto_tune: {total} candidate(s) fit the budget", columns, out) as table:
        while search.pending:
            c = search.next()
            reason = search.dominated(c)
            limit = _limit_reached(tuner, launched, started) or _patience(tuner, search, since_best)
            if reason or limit:
                history.set(c.key, status="dominated" if reason else "skipped", reason=reason or limit)
                history.save()
                continue
            best_before = search.best()
            record = _trial(c, tuner, history, previous.get(c.key), configs[c.key])
            launched += 1
            search.results[c.key] = record
            best = search.best()
            since_best = 0 if best is not best_before else since_best + 1
            _show(table, launched, most, c, record, best)
    return search.best()


def _patience(tuner: TrainTunerSettings, search: Search, since_best: int) -> str | None:
    """Once every layout has had a trial, `patience` trials in a row without a new best end the search."""
    if not search.tuned or tuner.patience is None or since_best < tuner.patience:
        return None
    if any(c.layout not in search.layouts for c in search.pending):
        return None
    return f"patience={tuner.patience}: no better result in the last {since_best} trials"


def _show(table, launched: int, most: int, c: Candidate, record: dict, best: dict | None) -> None:
    metric = f"{record['metric']:.0f}" if record.get("metric") is not None else "-"
    peak = f"{record['peak_memory_gib']:.3f}" if record.get("peak_memory_gib") is not None else "-"
    so_far = f"{best['key']} at {best['metric']:.0f} tokens/s" if best else "none"
    seconds = f"{record.get('seconds') or 0:.0f}"
    row = [str(launched), c.key, f"{record.get('predicted_gib') or 0:.3f}", record["status"], metric, peak, seconds]
    line = (
        f"trial {launched} of at most {most}: {c.key} {record['status']} {metric} tokens/s, peak {peak} GiB"
        + (" (from history)" if record.get("reused") else "")
        + f" | best so far: {so_far}"
    )
    table.update(row, f"trial {launched} of at most {most}; best so far: {so_far}", line)


def _limit_reached(tuner: TrainTunerSettings, launched: int, started: float) -> str | None:
    if tuner.max_trials is not None and launched >= tuner.max_trials:
        return f"max_trials={tuner.max_trials} reached"
    if tuner.total_timeout is not None and time.monotonic() - started >= tuner.total_timeout:
        return f"total_timeout={tuner.total_timeout:g} s reached"
    return None


def _trial(c: Candidate, tuner, history: History, before: dict | None, config: dict) -> dict:
    """A finished trial from the history as it is; anything else (new, or left running by a killed tuner) runs."""
    if before is not None and before.get("status") in FINISHED:
        return history.set(c.key, **{**before, "reused": True})
    if before is not None and before.get("status") == RUNNING:
        trials.stop_leftover(config)
    launches = int((before or {}).get("launches") or 0) + 1
    history.set(
        c.key,
        status=RUNNING,
        launches=launches,
        exp_dir=config["experiment"]["exp_dir"],
        started_at=time.time(),
        reason=None,
    )
    history.save()
    result = trials.run_trial(config, tuner)
    record = history.set(
        c.key,
        status=result.status,
        metric=result.metric,
        peak_memory_gib=result.peak_memory_gib,
        seconds=round(result.seconds, 1),
        reason=result.reason,
        ended_at=time.time(),
        reused=False,
    )
    history.save()
    return record


def best_config(base: dict, c: Candidate) -> dict:
    """The experiment config with the best candidate's values, runnable with `flagscale train`."""
    config = {k: copy.deepcopy(v) for k, v in base.items() if k != "hydra"}
    config["experiment"].pop("auto_tuner", None)
    config["train"] = c.apply_plain(config["train"])
    config["action"] = "run"
    return config


def _finish(best: dict | None, search: Search, base: dict, history: History, tuner, out) -> int:
    import sys

    import yaml

    out = out or sys.stdout
    ran = [r for r in search.results.values()]
    if best is None:
        print(f"auto_tune: no trial finished ({len(ran)} run); see {history.json_path}", file=out)
        return 1
    c = search.by_key[best["key"]]
    config = best_config(base, c)
    path = history.folder / "best.yaml"
    header = (
        f"# flagscale train {history.folder} --config-name best   (written by action=auto_tune)\n"
        f"# best of {len(ran)} trial(s): {c.key}, {best['metric']:.0f} tokens/s\n"
    )
    path.write_text(header + yaml.safe_dump(config, sort_keys=False))
    history.meta["best"] = best["key"]
    history.save()
    print(
        f"auto_tune: best {c.key} at {best['metric']:.0f} tokens/s of {len(ran)} trial(s); config {path}; "
        f"history {history.json_path}, {history.csv_path}",
        file=out,
    )
    if tuner.run_best:
        from flagscale.train import TrainTask

        return TrainTask(config).run()
    return 0
