#!/usr/bin/env python3
"""The memory model (flagscale/train/memory.py) against what `flagscale train` really allocates, per rank.

    .venv/bin/python benchmarks/bench_memory.py --python /path/to/venv/bin/python [--only NAME ...]

`--python` is an environment with the patched wheel (`pip install ".[train]" -C device=cpu -C backend=megatron`)
or the dev venv. A llama of 125M parameters (hidden 768, 12 layers, 12 heads, 4 key/value groups, ffn 2048,
vocabulary 32000, sequence 512) and a mixtral of the same shape with 4 experts of ffn 1024 (top-2, 181M) train
2 iterations (fp32, micro-batch 1, global batch 2) on the tiny example's byte-level corpus (the vocabulary is
padded up to 32000 with train.model.vocab_size) in each layout. The second iteration is the peak: Adam's states
exist and the activations of a step are live. Per rank the driver records (<exp_dir>/logs/memory/rank<R>.json)
the bytes of its parameters, gradient buffers and optimizer states, counted from the tensors, and its peak:
the resident high-water mark (VmHWM) less the resident memory just before the model was built. The table
puts the model's prediction beside them. Raw records: benchmarks/results/memory.raw.json (git-ignored).
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

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

LLAMA = {
    "family": "llama",
    "num_layers": 12,
    "hidden_size": 768,
    "num_attention_heads": 12,
    "num_query_groups": 4,
    "ffn_hidden_size": 2048,
    "seq_length": 512,
    "max_position_embeddings": 512,
    "vocab_size": 32000,
    "micro_batch_size": 1,
    "global_batch_size": 2,
    "train_iters": 2,
}
MIXTRAL = {**LLAMA, "family": "mixtral"}
MOE = {"num_experts": 4, "router_topk": 2, "ffn_hidden_size": 1024}
# name: (model, moe, world size, system settings)
LAYOUTS = {
    "tp2": (LLAMA, None, 2, {"tensor_model_parallel_size": 2}),
    "pp2": (LLAMA, None, 2, {"pipeline_model_parallel_size": 2}),
    "dp2": (LLAMA, None, 2, {}),
    "dp2-distopt": (LLAMA, None, 2, {"use_distributed_optimizer": True}),
    "tp2-sp": (LLAMA, None, 2, {"tensor_model_parallel_size": 2, "sequence_parallel": True}),
    "full-recompute": (LLAMA, None, 1, {"recompute_granularity": "full", "recompute_method": "uniform"}),
    "selective-recompute": (LLAMA, None, 1, {"recompute_granularity": "selective"}),
    "moe-ep2": (MIXTRAL, MOE, 2, {"expert_model_parallel_size": 2}),
}


def overrides(model: dict, moe: dict | None, system: dict) -> list[str]:
    out = [f"++train.model.{k}={v}" for k, v in model.items()]
    out += [f"++train.model.moe.{k}={v}" for k, v in (moe or {}).items()]
    out += [f"++train.system.{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in system.items()]
    return out


def settings(model: dict, moe: dict | None, system: dict):
    from flagscale.train.settings import train_settings

    m = {**model, **({"moe": moe} if moe else {})}
    return train_settings({"model": m, "system": system, "data": {"data_path": "-"}})


def run(python: Path, work: Path, corpus: Path, name: str) -> tuple[list[dict], float]:
    model, moe, world, system = LAYOUTS[name]
    exp = work / name
    flagscale = python.parent / "flagscale"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    env.pop("PYTHONPATH", None)
    start = time.perf_counter()
    result = subprocess.run(
        [
            str(flagscale),
            "train",
            str(ROOT / "examples/tiny_gpt/conf"),
            "--foreground",
            f"experiment.exp_dir={exp}",
            f"++experiment.runner.nproc_per_node={world}",
            f"train.data.data_path={corpus}",
            "train.system.checkpoint.save=null",
            "train.system.deterministic=false",
            *overrides(model, moe, system),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    if result.returncode:
        raise SystemExit(f"{name} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    records = [json.loads(p.read_text()) for p in (exp / "logs" / "memory").glob("rank*.json")]
    return sorted(records, key=lambda r: r["rank"]), time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--python", type=Path, required=True)
    parser.add_argument("--only", nargs="*", default=list(LAYOUTS))
    args = parser.parse_args()
    from flagscale.train.memory import estimate
    from flagscale.train.shapes import total_parameters

    work = Path(tempfile.mkdtemp(prefix="bench-memory-"))
    made = subprocess.run(
        [str(args.python), str(ROOT / "examples/tiny_gpt/make_corpus.py"), "--out", str(work / "data")],
        capture_output=True,
        text=True,
    )
    assert made.returncode == 0, made.stderr
    corpus = work / "data" / "corpus_text_document"
    gib = 2**30
    print(f"load average before: {os.getloadavg()}")
    print(
        "| layout | rank (stage/tp/dp) | params GiB pred / meas | grads GiB pred / meas | optimizer GiB pred / meas "
        "| activations GiB pred | total GiB pred / meas (err) |"
    )
    print("|---|---|---|---|---|---|---|")
    raw = {}
    for name in args.only:
        model, moe, world, system = LAYOUTS[name]
        t = settings(model, moe, system)
        t.check(world)
        predicted = estimate(t, world, 257)  # the byte tokenizer's vocabulary; model.vocab_size pads it to 32000
        measured, seconds = run(args.python, work, corpus, name)
        raw[name] = {"seconds": seconds, "measured": measured, "predicted": [p.__dict__ for p in predicted]}
        size = f"{total_parameters(t.model, t.model.vocab_size or 257) / 1e6:.0f}M"
        for p, r in zip(predicted, measured, strict=True):
            exact = (p.parameters, p.gradients, p.optimizer) == (r["parameters"], r["gradients"], r["optimizer"])
            err = (p.total - r["peak"]) / r["peak"]
            print(
                f"| {name} ({size}) | {p.rank} ({p.stage}/{p.tp_rank}/{p.dp_rank}) "
                f"| {p.parameters / gib:.3f} / {r['parameters'] / gib:.3f} "
                f"| {p.gradients / gib:.3f} / {r['gradients'] / gib:.3f} "
                f"| {p.optimizer / gib:.3f} / {r['optimizer'] / gib:.3f}{'' if exact else ' (NOT EXACT)'} "
                f"| {p.activations / gib:.3f} | {p.total / gib:.3f} / {r['peak'] / gib:.3f} ({err:+.1%}) |",
                flush=True,
            )
        print(f"<!-- {name}: {seconds:.0f} s -->", flush=True)
    print(f"load average after: {os.getloadavg()}")
    out = ROOT / "benchmarks" / "results" / "memory.raw.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(raw, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
