"""`flagscale serve CONF action=auto_tune`: the serving tuner.

Every combination of `experiment.auto_tuner.space` (engine arguments, plus `replicas`) is checked against the
engine's own flags (flagscale.serve.engines: llama-server's --help, vLLM's/SGLang's argument classes) and
against the load (llama.cpp splits ctx_size over its parallel slots: each slot must hold a prompt and its
output), then served for real through the serve task's own run/stop, one candidate at a time, and measured with
a closed-loop load (`load`): completion tokens/s and p99 request latency. The config's own engine arguments run
first, in the same run, as the baseline. The best is the highest throughput whose p99 meets `slo_p99_ms`,
written as a runnable serve config (`best.yaml`).
"""

from __future__ import annotations

import contextlib
import copy
import http.client
import io
import itertools
import json
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flagscale.errors import ConfigError, FlagScaleError
from flagscale.tune.history import History
from flagscale.tune.settings import WHERE, LoadProfile, ServeTunerSettings, serve_tuner_settings

BASELINE = "baseline"
COLUMNS = ("key", "status", "metric", "p50_ms", "p99_ms", "requests", "errors", "seconds", "reason")


@dataclass(frozen=True)
class LoadResult:
    requests: int
    errors: int
    tokens_per_sec: float
    p50_ms: float
    p99_ms: float
    first_error: str | None = None


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def load(url: str, model: str, profile: LoadProfile, timeout: float = 120.0) -> LoadResult:
    """Closed loop: `concurrency` clients (keep-alive HTTP/1.1) each post /v1/completions when answered, until
    `requests` measured ones are done (the first `warmup_requests` are not measured); EOS is ignored, so every
    answer has `output_tokens` tokens."""
    host, port = url.split("//", 1)[1].rstrip("/").rsplit(":", 1)
    prompt = " ".join(["hello"] * profile.prompt_tokens)
    body = json.dumps(
        {"model": model, "prompt": prompt, "max_tokens": profile.output_tokens, "temperature": 0, "ignore_eos": True}
    ).encode()
    total = profile.warmup_requests + profile.requests
    lock = threading.Lock()
    issued = [0]
    latencies: list[float] = []
    tokens = [0]
    errors: list[str] = []
    started = [0.0]

    def take() -> int | None:
        with lock:
            if issued[0] >= total:
                return None
            issued[0] += 1
            if issued[0] == profile.warmup_requests + 1:
                started[0] = time.perf_counter()  # the measured phase starts with its first request
            return issued[0]

    def client() -> None:
        conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
        while (n := take()) is not None:
            begin = time.perf_counter()
            try:
                conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
                response = conn.getresponse()
                data = response.read()
                if response.status != 200:
                    raise RuntimeError(f"HTTP {response.status}: {data[:200]!r}")
                used = json.loads(data).get("usage", {}).get("completion_tokens", 0)
            except Exception as exc:  # one failed request is a result, not the end of the load
                with lock:
                    errors.append(str(exc)[:200])
                conn.close()
                conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
                continue
            if n > profile.warmup_requests:
                with lock:
                    latencies.append(time.perf_counter() - begin)
                    tokens[0] += int(used)
        conn.close()

    threads = [threading.Thread(target=client, daemon=True) for _ in range(profile.concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started[0] if started[0] else float("nan")
    return LoadResult(
        requests=len(latencies),
        errors=len(errors),
        tokens_per_sec=tokens[0] / wall if latencies and wall > 0 else 0.0,
        p50_ms=percentile(latencies, 0.5) * 1000,
        p99_ms=percentile(latencies, 0.99) * 1000,
        first_error=errors[0] if errors else None,
    )


# ------------------------------------------------------------------------------------ candidates
@dataclass(frozen=True)
class ServeCandidate:
    engine_args: tuple[tuple[str, Any], ...]  # the model's engine_args with the space's values
    replicas: int
    baseline: bool = False

    @property
    def key(self) -> str:
        if self.baseline:
            return BASELINE
        return "-".join([f"{k}{v}" for k, v in self.engine_args if k != "model"] + [f"replicas{self.replicas}"])

    def settings(self) -> dict[str, Any]:
        return {**{k: v for k, v in self.engine_args if k != "model"}, "replicas": self.replicas}


def candidates(spec, space: dict) -> list[ServeCandidate]:
    """The baseline (the config's own arguments) first, then every combination of the space, each once."""
    base_args = dict(spec.engine_args)
    keys = sorted(space)
    out = [ServeCandidate(tuple(sorted(base_args.items())), spec.replicas, baseline=True)]
    seen = {_identity(out[0])}
    for combo in itertools.product(*(space[k] for k in keys)):
        values = dict(zip(keys, combo, strict=True))
        replicas = int(values.pop("replicas", spec.replicas))
        c = ServeCandidate(tuple(sorted({**base_args, **values}.items())), replicas)
        if _identity(c) not in seen:
            seen.add(_identity(c))
            out.append(c)
    return out


def _identity(c: ServeCandidate) -> tuple:
    return (c.engine_args, c.replicas)


def invalid_reason(c: ServeCandidate, engine: str, profile: LoadProfile) -> str | None:
    """What the engine would refuse or what cannot serve the load, found before anything starts."""
    args = dict(c.engine_args)
    if engine == "llama.cpp":
        batch, ubatch = args.get("batch_size"), args.get("ubatch_size")
        if batch is not None and ubatch is not None and ubatch > batch:
            return f"ubatch_size={ubatch} exceeds batch_size={batch} (llama.cpp's physical batch is within the logical)"
        ctx, slots = args.get("ctx_size"), args.get("parallel") or 1
        need = profile.prompt_tokens + profile.output_tokens
        if ctx and ctx // slots < need:
            return f"ctx_size={ctx} over parallel={slots} slots leaves {ctx // slots} tokens a slot, below {need}"
        threads = args.get("threads")
        cores = os.cpu_count() or 1
        if threads and threads * c.replicas > cores:
            return f"threads={threads} x replicas={c.replicas} exceeds the {cores} cores (spinning threads starve)"
    return None


def check_space(settings, spec, space: dict) -> None:
    """Every dimension is an argument of the engine (its own flags), named in one line with the nearest one."""
    from flagscale.serve.engines import command_for

    args = {k: v[0] for k, v in space.items() if k != "replicas"}
    where = f"{WHERE}.space"
    probe = _with(spec, ServeCandidate(tuple(sorted({**spec.args, **args}.items())), 1))
    try:
        command_for(probe, settings, settings.host, settings.port_of(spec), check=True)
    except ConfigError as exc:
        text = str(exc)
        for key in args:
            if f".{key}: " in text:
                raise ConfigError(f"{where}.{key}: " + text.split(f".{key}: ", 1)[1]) from None
        raise


def _with(spec, c: ServeCandidate):
    from dataclasses import replace

    return replace(spec, engine_args=c.engine_args, replicas=c.replicas, min_replicas=None, max_replicas=None)


# ------------------------------------------------------------------------------------------ trials
def trial_config(raw: dict, model: str, c: ServeCandidate, exp_dir: Path, port: int) -> dict:
    """The serve config of one trial: the candidate's engine arguments and replicas, its own folder and port."""
    exp = copy.deepcopy(raw["experiment"])
    exp.pop("auto_tuner", None)
    exp["exp_dir"] = str(exp_dir)
    runner = dict(exp.get("runner") or {})
    runner["port"] = port
    if c.replicas > 1 and runner.get("deploy") == "direct":
        runner["deploy"] = "auto"
    exp["runner"] = runner
    models = copy.deepcopy(raw["serve"])
    for m in models:
        if m.get("serve_id") == model:
            m["engine_args"] = dict(c.engine_args)
            m["replicas"] = c.replicas
            m.pop("autoscaling", None)
    return {"experiment": exp, "serve": models, "action": "run"}


def run_trial(config: dict, model: str, tuner: ServeTunerSettings) -> dict[str, Any]:
    from omegaconf import OmegaConf

    from flagscale.serve import ServeTask
    from flagscale.serve.settings import from_config

    settings = from_config(OmegaConf.create(config))
    task = ServeTask(settings)
    begin = time.monotonic()
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            task.run()
        endpoints = json.loads((settings.run_dir / "serve.json").read_text())["endpoints"]
        url = endpoints.get(model) or next(iter(endpoints.values()))
        result = _load_within(url, model, tuner)
    except (FlagScaleError, OSError, ValueError, KeyError, TimeoutError) as exc:
        return {"status": "failed", "reason": str(exc).splitlines()[0][:300], "seconds": time.monotonic() - begin}
    finally:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(FlagScaleError, OSError):
            task.stop()
    record: dict[str, Any] = {
        "metric": result.tokens_per_sec,
        "p50_ms": result.p50_ms,
        "p99_ms": result.p99_ms,
        "requests": result.requests,
        "errors": result.errors,
        "seconds": round(time.monotonic() - begin, 1),
    }
    if result.errors:
        return {**record, "status": "failed", "reason": f"{result.errors} request(s) failed: {result.first_error}"}
    if result.p99_ms > tuner.slo_p99_ms:
        return {**record, "status": "slo_miss", "reason": f"p99 {result.p99_ms:.0f} ms > SLO {tuner.slo_p99_ms:g} ms"}
    return {**record, "status": "ok", "reason": None}


def _load_within(url: str, model: str, tuner: ServeTunerSettings) -> LoadResult:
    """The load, bounded by the trial's time limit (a hung server must not hang the search)."""
    from concurrent.futures import ThreadPoolExecutor
    from concurrent.futures import TimeoutError as FutureTimeout

    pool = ThreadPoolExecutor(1)
    future = pool.submit(load, url, model, tuner.load, min(120.0, tuner.trial_timeout))
    try:
        return future.result(timeout=tuner.trial_timeout)
    except FutureTimeout:
        raise TimeoutError(f"the load did not finish within trial_timeout={tuner.trial_timeout:g} s") from None
    finally:
        pool.shutdown(wait=False)


# ------------------------------------------------------------------------------------------ search
def auto_tune(settings, out=None) -> int:
    import sys

    from flagscale.serve import gguf
    from flagscale.serve.health import free_port
    from flagscale.tune.table import LiveTable

    out = out or sys.stdout
    raw = copy.deepcopy(settings.extra["config"])
    tuner = serve_tuner_settings(raw["experiment"].get("auto_tuner"))
    names = [m.name for m in settings.models]
    model = tuner.model or (names[0] if len(names) == 1 else None)
    if model is None or model not in names:
        raise ConfigError(f"{WHERE}.model={tuner.model}: name the model to tune, one of {', '.join(names)}")
    settings = gguf.prepare(settings)  # an HF folder's GGUF, made once, before any trial
    raw["serve"] = [
        {**m, "engine_args": dict(s.engine_args)} for m, s in zip(raw["serve"], settings.models, strict=True)
    ]
    spec = settings.model(model)
    check_space(settings, spec, tuner.space)
    folder = Path(tuner.dir or settings.run_dir / "auto_tune").expanduser().resolve()
    history = History(
        folder,
        {"task": "serve", "model": model, "slo_p99_ms": tuner.slo_p99_ms, "load": dict(tuner.load.__dict__)},
        COLUMNS,
    )
    previous = history.load()
    todo = []
    for c in candidates(spec, tuner.space):
        reason = invalid_reason(c, spec.engine, tuner.load)
        history.set(c.key, settings=c.settings(), status="invalid" if reason else "pending", reason=reason)
        if not reason:
            todo.append(c)
    history.save()
    started, launched = time.monotonic(), 0
    columns = ["#", "candidate", "status", "tokens/s", "p50 ms", "p99 ms", "s"]
    with LiveTable(f"serve auto_tune: {len(todo)} candidate(s), SLO p99 <= {tuner.slo_p99_ms:g} ms", columns, out) as t:
        for c in todo:
            limit = _limit(tuner, launched, started)
            if limit:
                history.set(c.key, status="skipped", reason=limit)
                continue
            before = previous.get(c.key)
            if before is not None and before.get("status") in ("ok", "slo_miss", "failed"):
                record = history.set(c.key, **{**before, "reused": True})
            else:
                config = trial_config(raw, model, c, folder / "trials" / c.key, free_port(settings.host))
                history.set(c.key, status="running", started_at=time.time())
                history.save()
                record = history.set(c.key, **run_trial(config, model, tuner), reused=False)
            launched += 1
            history.save()
            best = _best(history)
            caption = f"trial {launched} of {len(todo)}; best so far: " + (
                f"{best['key']} {best['metric']:.1f} tokens/s" if best else "none"
            )
            row = [
                str(launched),
                c.key,
                record["status"],
                _f(record.get("metric")),
                _f(record.get("p50_ms")),
                _f(record.get("p99_ms")),
                _f(record.get("seconds")),
            ]
            t.update(
                row,
                caption,
                f"trial {launched} of {len(todo)}: {c.key} {record['status']} "
                f"{_f(record.get('metric'))} tokens/s p99 {_f(record.get('p99_ms'))} ms | {caption}",
            )
    history.save()
    return _finish(history, raw, model, tuner, out)


def _f(value: Any) -> str:
    return "-" if value is None else f"{value:.1f}"


def _limit(tuner: ServeTunerSettings, launched: int, started: float) -> str | None:
    if tuner.max_trials is not None and launched >= tuner.max_trials:
        return f"max_trials={tuner.max_trials} reached"
    if tuner.total_timeout is not None and time.monotonic() - started >= tuner.total_timeout:
        return f"total_timeout={tuner.total_timeout:g} s reached"
    return None


def _best(history: History) -> dict | None:
    ok = [r for r in history.records.values() if r.get("status") == "ok" and r.get("metric") is not None]
    return max(ok, key=lambda r: r["metric"], default=None)


def _finish(history: History, raw: dict, model: str, tuner: ServeTunerSettings, out) -> int:
    import yaml

    best = _best(history)
    base = history.records.get(BASELINE, {})
    if best is None:
        print(
            f"serve auto_tune: no candidate met the SLO (p99 <= {tuner.slo_p99_ms:g} ms); see {history.json_path}",
            file=out,
        )
        return 1
    config = copy.deepcopy(raw)
    config["experiment"].pop("auto_tuner", None)
    config["action"] = "run"
    for m in config["serve"]:
        if m.get("serve_id") == model:
            m["engine_args"] = {
                **m.get("engine_args", {}),
                **{k: v for k, v in best["settings"].items() if k != "replicas"},
            }
            m["replicas"] = best["settings"]["replicas"]
    path = history.folder / "best.yaml"
    path.write_text(
        f"# flagscale serve {path}   (written by action=auto_tune: {best['key']})\n"
        + yaml.safe_dump(config, sort_keys=False)
    )
    history.meta.update(best=best["key"], baseline_tokens_per_sec=base.get("metric"))
    history.save()
    ratio = f" ({best['metric'] / base['metric']:.2f}x the baseline)" if base.get("metric") else ""
    print(
        f"serve auto_tune: best {best['key']}: {best['metric']:.1f} tokens/s, p99 {best['p99_ms']:.0f} ms"
        f"{ratio}; config {path}; history {history.json_path}",
        file=out,
    )
    if tuner.run_best:
        from omegaconf import OmegaConf

        from flagscale.serve import ServeTask
        from flagscale.serve.settings import from_config

        return ServeTask(from_config(OmegaConf.create(config))).run()
    return 0
