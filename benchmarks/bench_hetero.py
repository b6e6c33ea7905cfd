#!/usr/bin/env python3
"""Step time of a heterogeneous job vs the homogeneous job of the same math (issue #17; no target).

    .venv/bin/python benchmarks/bench_hetero.py --python /path/to/venv/bin/python [--runs 3] [--iters 30]

`--python` is an environment with the patched wheel (`pip install ".[train]" -C device=cpu -C backend=megatron`).
Both sides are `flagscale train` of the tiny llama of tests/test_hetero.py (4 layers, hidden 64, GQA, vocabulary
384, global batch 12), world size 4 on this machine over gloo, as a user runs it:

- homogeneous: TP=2 PP=2 (megatron's own process groups and p2p); for context also TP=1 PP=2 DP=2 (micro-batch 1);
- hetero: mesh A (TP=2, DP=1, micro-batch 2) with layers 0-1, mesh B (TP=1, DP=2, micro-batch 1) with layers 2-3
  (the same losses within 1e-6: tests/test_hetero.py), borders through flagscale's gloo communicator.

Per-step wall time is read from each run's metrics.jsonl; the first `--warmup` steps are dropped; runs alternate
between the sides; the figure is the median over runs of (median hetero step / median homogeneous step). Where the
time goes: every hetero rank logs the seconds it spent waiting at its pipeline borders (sends and receives,
including the wait for the neighbour stage); their share of the rank's training time is reported per mesh.
Raw samples: benchmarks/results/hetero.raw.json (git-ignored).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONF = ROOT / "examples" / "tiny_gpt" / "conf"
MODEL = {
    "family": "llama",
    "num_layers": 4,
    "hidden_size": 64,
    "num_attention_heads": 4,
    "num_query_groups": 2,
    "ffn_hidden_size": 128,
    "seq_length": 32,
    "vocab_size": 384,
    "micro_batch_size": 2,
    "global_batch_size": 12,
    "optimizer": {"lr": 0.003, "min_lr": 0.0003, "warmup_iters": 2},
}
SIDES = {
    "homogeneous": {"tensor_model_parallel_size": 2, "pipeline_model_parallel_size": 2},
    # context: the other homogeneous PP=2 layout of world size 4 (mesh B's TP=1 DP=2 on both stages)
    "homogeneous TP=1 DP=2": {"tensor_model_parallel_size": 1, "pipeline_model_parallel_size": 2},
    "hetero": {
        "hetero": {
            "meshes": [
                {"tensor_model_parallel_size": 2, "data_parallel_size": 1, "micro_batch_size": 2},
                {"tensor_model_parallel_size": 1, "data_parallel_size": 2, "micro_batch_size": 1},
            ]
        }
    },
}
BORDERS = re.compile(r"\[.* rank(\d+)\] hetero borders: (\d+) exchanges, ([\d.]+) s")


def hydra(value) -> str:
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{hydra(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(hydra(v) for v in value) + "]"
    return "null" if value is None else str(value)


def run(python: Path, work: Path, corpus: Path, side: str, index: int, iters: int) -> dict:
    exp = work / f"{side.replace(' ', '-').replace('=', '')}-{index}"
    flagscale = python.parent / "flagscale"
    cmd = [
        str(flagscale),
        "train",
        str(CONF),
        "--foreground",
        f"experiment.exp_dir={exp}",
        "experiment.runner.nproc_per_node=4",
        f"train.data.data_path={corpus}",
        "train.system.checkpoint.save=null",
        *(f"++train.model.{k}={hydra(v)}" for k, v in {**MODEL, "train_iters": iters}.items()),
        *(f"++train.system.{k}={hydra(v)}" for k, v in SIDES[side].items()),
        *(["++train.model.micro_batch_size=1"] if SIDES[side].get("tensor_model_parallel_size") == 1 else []),
    ]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    result = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=900)
    if result.returncode != 0:
        raise SystemExit(f"{side} run failed:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}")
    records = [json.loads(line) for line in (exp / "logs" / "metrics.jsonl").read_text().splitlines()]
    borders = {}
    for log in (exp / "logs").glob("node*/rank*.log"):
        for match in BORDERS.finditer(log.read_text()):
            borders[int(match[1])] = {"exchanges": int(match[2]), "seconds": float(match[3])}
    return {"steps": [r["step_time"] for r in records], "loss": [r["loss"] for r in records], "borders": borders}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--python", type=Path, required=True, help="interpreter of the environment with megatron")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-hetero-"))
    corpus = work / "data"
    made = subprocess.run(
        [str(args.python), str(ROOT / "examples/tiny_gpt/make_corpus.py"), "--out", str(corpus), "--docs", "200"],
        capture_output=True,
        text=True,
    )
    if made.returncode != 0:
        raise SystemExit(made.stderr[-2000:])
    samples: dict[str, list[dict]] = {side: [] for side in SIDES}
    for index in range(args.runs):
        for side in SIDES:  # alternating: a neighbour's load hits both sides alike
            samples[side].append(run(args.python, work, corpus / "corpus_text_document", side, index, args.iters))
    ratios, medians = [], {side: [] for side in SIDES}
    for index in range(args.runs):
        for side in SIDES:
            medians[side].append(statistics.median(samples[side][index]["steps"][args.warmup :]))
        ratios.append(medians["hetero"][-1] / medians["homogeneous"][-1])
    worst = max(
        abs(a - b)
        for h, r in zip(samples["hetero"], samples["homogeneous"], strict=True)
        for a, b in zip(h["loss"], r["loss"], strict=True)
    )
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs; {args.runs} runs x {args.iters} iterations")
    print("| side | median step (ms) | runs' medians (ms) |")
    print("|---|---:|---|")
    for side in SIDES:
        values = ", ".join(f"{m * 1000:.1f}" for m in medians[side])
        print(f"| {side} | {statistics.median(medians[side]) * 1000:.1f} | {values} |")
    each = ", ".join(f"{r:.3f}" for r in ratios)
    print(f"| **hetero / homogeneous** | **{statistics.median(ratios):.3f}x** | {each} |")
    other = [h / o for h, o in zip(medians["hetero"], medians["homogeneous TP=1 DP=2"], strict=True)]
    each = ", ".join(f"{r:.3f}" for r in other)
    print(f"| hetero / homogeneous TP=1 DP=2 | {statistics.median(other):.3f}x | {each} |")
    print(f"max |loss difference| between the sides over all runs and iterations: {worst:.1e}")
    train_seconds = [sum(s["steps"]) for s in samples["hetero"]]
    for rank in sorted(samples["hetero"][0]["borders"]):
        shares = [s["borders"][rank]["seconds"] / t for s, t in zip(samples["hetero"], train_seconds, strict=True)]
        exchanges = samples["hetero"][0]["borders"][rank]["exchanges"]
        print(f"rank {rank}: {exchanges} border exchanges, {statistics.median(shares) * 100:.1f}% of training time")
    out = ROOT / "benchmarks" / "results" / "hetero.raw.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"args": vars(args) | {"python": str(args.python)}, "samples": samples}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
