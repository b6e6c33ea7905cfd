#!/usr/bin/env python3
"""The tuners against the alternatives, same run: `flagscale train|serve ... action=auto_tune`.

    /work/mcvenv/bin/python benchmarks/bench_tune.py [--train] [--serve] [--work DIR]

Training (needs megatron): the tiny Llama-3 recipe (examples/llama3/conf tiny) at world size 4 on the CPU. An
exhaustive sweep (strategy exhaustive: every valid candidate of the space) and the tuner (strategy tuned, at
most half as many trials) search the same space one after the other; reported: the sweep's best tokens/s, the
tuner's pick, its tokens/s (as the tuner measured it and as the sweep measured the same candidate), and the
trials each ran. Serving: the serving tuner on the tiny GGUF (tests/llama_cpp_support.py makes it) with
llama-server's default arguments as the baseline, measured in the same run under the same load.
Results print as Markdown tables (benchmarks/README.md, "Auto-tuner").
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LLAMA3 = REPO / "examples" / "llama3" / "conf"
TRAIN_SPACE = "{tp: [1, 2], pp: [1, 2], micro_batch_size: [1, 2, 4], recompute_granularity: [null, selective]}"
SERVE_SPACE = "{threads: [1, 2], parallel: [1, 2, 4, 8], ubatch_size: [128, 512]}"
SERVE_LOAD = "{concurrency: 8, prompt_tokens: 16, output_tokens: 32, requests: 64}"
RAN = ("ok", "oom", "failed", "timeout")


def history(folder: Path) -> dict:
    return json.loads((folder / "auto_tune" / "history.json").read_text())


def flagscale(*args: str, env: dict[str, str], cwd: Path) -> float:
    start = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "flagscale.cli", *args], cwd=cwd, env=env, text=True)
    if result.returncode != 0:
        raise SystemExit(f"flagscale {' '.join(args[:2])} failed ({result.returncode})")
    return time.monotonic() - start


def train_bench(work: Path, iterations: int, warmup: int) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    data = work / "data"
    if not (data / "corpus_text_document.idx").exists():
        make = [sys.executable, str(REPO / "examples/tiny_gpt/make_corpus.py"), "--out", str(data), "--docs", "200"]
        subprocess.run(make, check=True, env=env, capture_output=True)
    common = [
        "train",
        str(LLAMA3),
        "--config-name",
        "tiny",
        "experiment.runner.nproc_per_node=4",
        f"train.data.data_path={data / 'corpus_text_document'}",
        "action=auto_tune",
    ]
    limits = f"iterations: {iterations}, warmup_iterations: {warmup}, trial_timeout: 300"
    sweep_s = flagscale(
        *common,
        f"experiment.exp_dir={work / 'sweep'}",
        f"+experiment.auto_tuner={{space: {TRAIN_SPACE}, strategy: exhaustive, {limits}}}",
        env=env,
        cwd=work,
    )
    sweep = history(work / "sweep")
    valid = [r for r in sweep["candidates"] if r["status"] not in ("invalid", "pruned")]
    half = len(valid) // 2
    tuned_s = flagscale(
        *common,
        f"experiment.exp_dir={work / 'tuned'}",
        f"+experiment.auto_tuner={{space: {TRAIN_SPACE}, strategy: tuned, max_trials: {half}, patience: 3, {limits}}}",
        env=env,
        cwd=work,
    )
    tuned = history(work / "tuned")
    report_train(sweep, tuned, sweep_s, tuned_s)
    if tuned["best"] != sweep["best"]:
        side_by_side(work, iterations, warmup, env)


def side_by_side(work: Path, iterations: int, warmup: int, env: dict[str, str], rounds: int = 3) -> None:
    """The two best.yaml files (the sweep's and the tuner's), each run as written by `flagscale train`,
    alternately, `rounds` times: single measurements on a shared machine are noisy, and the sweep's best is the
    luckiest of many."""
    import statistics

    results: dict[str, list[float]] = {"sweep": [], "tuned": []}
    for i in range(rounds):
        for name in results:
            folder = work / f"ab-{name}-{i}"
            overrides = [
                f"experiment.exp_dir={folder}",
                "train.system.checkpoint.save=null",
                f"train.model.train_iters={iterations}",
                "action=run",
            ]
            flagscale(
                "train",
                str(work / name / "auto_tune"),
                "--config-name",
                "best",
                "--foreground",
                *overrides,
                env=env,
                cwd=work,
            )
            lines = (folder / "logs" / "metrics.jsonl").read_text().splitlines()
            speeds = [r["tokens_per_sec"] for r in map(json.loads, lines) if r["iteration"] > warmup]
            results[name].append(statistics.median(speeds))
    sweep, tuned = statistics.median(results["sweep"]), statistics.median(results["tuned"])
    print(
        f"\nside by side, best.yaml run {rounds}x each, alternately (median tokens/s): sweep's best {sweep:.0f} "
        f"{[round(v) for v in results['sweep']]}, tuner's pick {tuned:.0f} {[round(v) for v in results['tuned']]}: "
        f"pick / sweep's best = {tuned / sweep:.3f}"
    )


def report_train(sweep: dict, tuned: dict, sweep_s: float, tuned_s: float) -> None:
    s_rows = {r["key"]: r for r in sweep["candidates"]}
    t_rows = {r["key"]: r for r in tuned["candidates"]}
    s_ran = [r for r in s_rows.values() if r["status"] in RAN]
    t_ran = [r for r in t_rows.values() if r["status"] in RAN]
    best = max((r for r in s_ran if r["status"] == "ok"), key=lambda r: r["metric"])
    pick = t_rows[tuned["best"]]
    same = s_rows[pick["key"]]
    print(f"\nload average before/after: {os.getloadavg()}")
    print("\n| | sweep (exhaustive) | tuner |\n|---|---|---|")
    print(
        f"| valid candidates | {len(s_ran)} | {len(t_ran)} run, "
        f"{sum(r['status'] == 'dominated' for r in t_rows.values())} dominated, "
        f"{sum(r['status'] == 'skipped' for r in t_rows.values())} skipped |"
    )
    print(f"| trials run | {len(s_ran)} | {len(t_ran)} ({len(t_ran) / len(s_ran):.0%}) |")
    print(f"| wall time | {sweep_s:.0f} s | {tuned_s:.0f} s |")
    print(f"| best | `{best['key']}` {best['metric']:.0f} tokens/s | `{pick['key']}` {pick['metric']:.0f} tokens/s |")
    print(f"| pick / sweep's best (tuner's measurement) | | {pick['metric'] / best['metric']:.3f} |")
    print(f"| pick / sweep's best (both from the sweep) | | {same['metric'] / best['metric']:.3f} |")
    print("\n| candidate | predicted GiB | sweep tokens/s | tuner |\n|---|---|---|---|")
    for r in sorted(s_ran, key=lambda r: -(r.get("metric") or 0)):
        t = t_rows.get(r["key"], {})
        shown = f"{t['metric']:.0f}" if t.get("status") == "ok" else f"{t.get('status')}"
        if t.get("status") in ("dominated", "skipped"):
            shown += f" ({t.get('reason', '')[:60]})"
        print(f"| `{r['key']}` | {r.get('predicted_gib') or 0:.4f} | {r.get('metric') or 0:.0f} | {shown} |")


def serve_bench(work: Path, slo_ms: float) -> None:
    cache = Path(os.environ.get("FLAGSCALE_TEST_CACHE", Path.home() / ".cache" / "flagscale-tests"))
    root = cache / "llama-cpp-tests"
    sites = sorted((root / "site").glob("*"))
    model = root / "tiny.gguf"
    if not sites or not model.is_file():
        raise SystemExit(f"no llama.cpp build or tiny.gguf under {root}: run tests/test_tune_serve.py once first")
    env = {**os.environ, "FLAGSCALE_LLAMA_CPP_BIN": str(sites[-1] / "bin"), "OMP_NUM_THREADS": "1"}
    # the baseline: llama-server's own defaults (threads, parallel slots, batch sizes, the model's context)
    conf = work / "serve.yaml"
    conf.write_text(
        "experiment:\n  exp_name: bench_tune_serve\n"
        f"  exp_dir: {work / 'serve'}\n  task: {{type: serve, backend: llama.cpp}}\n"
        "  runner: {host: 127.0.0.1, port: 8000, deploy: direct}\n"
        f"  auto_tuner: {{space: {SERVE_SPACE}, load: {SERVE_LOAD}, slo_p99_ms: {slo_ms}}}\n"
        f"serve:\n  - serve_id: tiny\n    engine_args: {{model: {model}}}\naction: auto_tune\n"
    )
    seconds = flagscale("serve", str(conf), env=env, cwd=work)
    h = history(work / "serve")
    rows = {r["key"]: r for r in h["candidates"]}
    base, best = rows["baseline"], rows[h["best"]]
    print(f"\nload average: {os.getloadavg()}; {seconds:.0f} s; load {SERVE_LOAD}; SLO p99 <= {slo_ms:g} ms")
    print(
        f"\nbaseline (llama-server defaults): {base['metric']:.0f} tokens/s, p99 {base['p99_ms']:.0f} ms, "
        f"{base['status']}; pick `{best['key']}`: {best['metric']:.0f} tokens/s, p99 {best['p99_ms']:.0f} ms "
        f"({best['metric'] / base['metric']:.2f}x)"
    )
    print("\n| candidate | status | tokens/s | p50 ms | p99 ms |\n|---|---|---|---|---|")
    for r in sorted(rows.values(), key=lambda r: -(r.get("metric") or 0)):
        metric = f"{r['metric']:.0f}" if r.get("metric") is not None else "-"
        p50 = f"{r['p50_ms']:.0f}" if r.get("p50_ms") is not None else "-"
        p99 = f"{r['p99_ms']:.0f}" if r.get("p99_ms") is not None else "-"
        status = r["status"] + (f" ({r['reason'][:70]})" if r["status"] == "invalid" else "")
        print(f"| `{r['key']}` | {status} | {metric} | {p50} | {p99} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", action="store_true", help="the training tuner vs the exhaustive sweep")
    parser.add_argument("--serve", action="store_true", help="the serving tuner vs llama-server's defaults")
    parser.add_argument("--work", type=Path, default=None, help="folder for the runs (default: a temporary one)")
    parser.add_argument("--iterations", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--slo-ms", type=float, default=1000.0)
    parser.add_argument("--side-by-side", action="store_true", help="only rerun the two best.yaml of --work")
    args = parser.parse_args(argv)
    if args.side_by_side:
        side_by_side(args.work, args.iterations, args.warmup, {**os.environ, "OMP_NUM_THREADS": "1"})
        return 0
    both = not (args.train or args.serve)
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-tune-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"work folder {work}; load average {os.getloadavg()}")
    if args.serve or both:
        serve_bench(work, args.slo_ms)
    if args.train or both:
        train_bench(work, args.iterations, args.warmup)
    return 0


if __name__ == "__main__":
    sys.exit(main())
