#!/usr/bin/env python3
"""Step time of `flagscale train` vs the same model driven by a minimal direct megatron.core script.

    .venv/bin/python benchmarks/bench_train.py --python /path/to/venv/bin/python [--runs 3] [--iters 30]

`--python` is an environment with the patched wheel: `pip install ".[train]" -C device=cpu -C backend=megatron`.
Both sides train the same GPT (same sizes, seed, optimizer, fp32, world size 1) on the same indexed
dataset (made once with examples/tiny_gpt/make_corpus.py) through Megatron Core's GPTDataset, DDP,
optimizer and pipeline schedule. `flagscale train` runs as a user runs it (Hydra config, launch script,
torchrun, the driver's logging, LR scheduler and metrics); the direct script is the smallest loop that
does the same training. Per-step wall time is read from each side's own per-step records (flagscale's
metrics.jsonl, the script's stdout); the first `--warmup` steps are dropped. Runs alternate between the
two sides; the figure is the median over runs of (median flagscale step / median direct step).

Target (issue #5): ratio <= 1.05. Raw samples: benchmarks/results/train.raw.json (git-ignored).

`--compare monitoring` measures the monitoring instead (issue #12), both sides `flagscale train`, same run:
"on" as a user runs it (heartbeats every `heartbeat_interval` = 1 s, TensorBoard event files written and
flushed every logged step) vs "off" (`train.system.logging.tensorboard=false`, and heartbeats only at start and
end: `heartbeat_interval` 1e9). Target: on / off <= 1.02. Raw samples: benchmarks/results/train_monitoring.raw.json.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONF = ROOT / "examples" / "tiny_gpt" / "conf"

# The direct side: a minimal megatron.core training loop, run in the benchmarked environment.
DIRECT = r"""
import json, os, sys, time
import torch, torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.transformer.transformer_config import TransformerConfig

a = json.loads(sys.argv[1])
torch.use_deterministic_algorithms(True)
dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
parallel_state.initialize_model_parallel()
torch.manual_seed(a["seed"]); tensor_parallel.model_parallel_cuda_manual_seed(a["seed"])
class Tok:
    vocab_size, eod, unique_identifiers = 257, 256, {"class": "direct-byte"}
cfg = GPTDatasetConfig(random_seed=a["seed"], sequence_length=a["seq"], blend=([a["data"]], None), split="100,0,0",
                       tokenizer=Tok(), reset_position_ids=False, reset_attention_mask=False, eod_mask_loss=False,
                       path_to_cache=a["cache"])
ds = BlendedMegatronDatasetBuilder(GPTDataset, [a["iters"] * a["gbs"], 0, 0], lambda: True, cfg).build()[0]
config = TransformerConfig(num_layers=a["layers"], hidden_size=a["hidden"], num_attention_heads=a["heads"],
    use_cpu_initialization=True, hidden_dropout=0.0, attention_dropout=0.0, bias_activation_fusion=False,
    bias_dropout_fusion=False, masked_softmax_fusion=False, gradient_accumulation_fusion=False,
    persist_layer_norm=False, apply_rope_fusion=False)
model = GPTModel(config=config, transformer_layer_spec=get_gpt_layer_local_spec(), vocab_size=a["vocab"],
                 max_sequence_length=a["seq"], position_embedding_type="rope")
model = DistributedDataParallel(config, DistributedDataParallelConfig(), model)
config.no_sync_func, config.finalize_model_grads_func = model.no_sync, finalize_model_grads
opt = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=a["lr"], weight_decay=0.0,
                                          adam_beta1=0.9, adam_beta2=0.95, clip_grad=1.0), [model])
fb = get_forward_backward_func()
keys = ("tokens", "labels", "loss_mask", "attention_mask", "position_ids")
def micro(it):
    for s in range(it * a["gbs"], (it + 1) * a["gbs"], a["mbs"]):
        b = [ds[i] for i in range(s, s + a["mbs"])]
        yield {k: torch.stack([torch.as_tensor(x[k]) for x in b]) for k in keys}  # mask: [b, 1, s, s]
def step_fn(it_, model):
    b = next(it_)
    out = model(b["tokens"], b["position_ids"], b["attention_mask"], labels=b["labels"])
    mask = b["loss_mask"].float().view(-1)
    def loss_fn(t):
        loss = (t.float().view(-1) * mask).sum() / mask.sum()
        return loss, {"lm loss": loss.detach().clone()}
    return out, loss_fn
for it in range(a["iters"]):
    t0 = time.perf_counter()
    model.zero_grad_buffer(); opt.zero_grad()
    losses = fb(forward_step_func=step_fn, data_iterator=micro(it), model=[model],
                num_microbatches=a["gbs"] // a["mbs"], seq_length=a["seq"], micro_batch_size=a["mbs"],
                forward_only=False)
    opt.step()
    loss = float(torch.stack([x["lm loss"] for x in losses]).mean())
    print(json.dumps({"iteration": it + 1, "loss": loss, "step_time": time.perf_counter() - t0}), flush=True)
"""


def env() -> dict[str, str]:
    drop = ("PYTHONPATH", "VIRTUAL_ENV", "FLAGSCALE_ROOT", "MEGATRON_DEVICE_TYPE", "MEGATRON_COLLECTIVE_BACKEND")
    e = {k: v for k, v in os.environ.items() if k not in drop}
    e.update(OMP_NUM_THREADS=str(os.environ.get("BENCH_THREADS", "1")), PYTHONWARNINGS="ignore")
    return e


# Monitoring off (--compare monitoring): no TensorBoard, heartbeats only when forced (start, save, end).
MONITORING_OFF = (
    "++train.system.logging.tensorboard=false",
    "++experiment.runner.fault_tolerance.heartbeat_interval=1e9",
)


def run_flagscale(
    python: str, work: Path, run: int, a: dict, extra: tuple[str, ...] = (), tag: str = ""
) -> tuple[list[dict], float]:
    exp = work / f"flagscale{tag}-{run}"
    cmd = [
        python,
        "-m",
        "flagscale.cli",
        "train",
        str(CONF),
        "--foreground",
        f"experiment.exp_dir={exp}",
        f"train.data.data_path={a['data']}",
        "train.system.checkpoint.save=null",
        f"train.model.train_iters={a['iters']}",
        f"train.model.num_layers={a['layers']}",
        f"train.model.hidden_size={a['hidden']}",
        f"train.model.num_attention_heads={a['heads']}",
        f"train.model.seq_length={a['seq']}",
        f"train.model.max_position_embeddings={a['seq']}",
        f"train.model.micro_batch_size={a['mbs']}",
        f"train.model.global_batch_size={a['gbs']}",
        f"train.model.optimizer.lr={a['lr']}",
        f"train.model.optimizer.min_lr={a['lr']}",
        "train.model.optimizer.warmup_iters=0",
        "train.model.optimizer.decay_style=constant",
        f"train.system.seed={a['seed']}",
        f"experiment.envs.OMP_NUM_THREADS={env()['OMP_NUM_THREADS']}",
        *extra,
    ]
    start = time.perf_counter()
    result = subprocess.run(cmd, cwd=work, env=env(), capture_output=True, text=True)
    wall = time.perf_counter() - start
    if result.returncode != 0:
        sys.exit(f"flagscale train failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    records = [json.loads(line) for line in (exp / "logs" / "metrics.jsonl").read_text().splitlines()]
    return records, wall


def run_direct(python: str, work: Path, run: int, a: dict) -> tuple[list[dict], float]:
    args = {**a, "cache": str(work / f"direct-cache-{run}"), "vocab": 320}
    start = time.perf_counter()
    result = subprocess.run(
        [python, "-c", DIRECT, json.dumps(args)], cwd=work, env=env(), capture_output=True, text=True
    )
    wall = time.perf_counter() - start
    if result.returncode != 0:
        sys.exit(f"direct script failed:\n{result.stderr[-3000:]}")
    return [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")], wall


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--python", required=True, help="python of an environment with flagscale[train] + the patched wheel")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--mbs", type=int, default=4)
    p.add_argument("--gbs", type=int, default=16)
    p.add_argument("--json", type=Path, default=None, help="default: benchmarks/results/train[_monitoring].raw.json")
    p.add_argument(
        "--compare",
        choices=("direct", "monitoring"),
        default="direct",
        help="direct: flagscale vs a direct megatron.core loop; monitoring: flagscale with monitoring on vs off",
    )
    p.add_argument("--strict", action="store_true", help="exit 1 when the ratio misses the target")
    args = p.parse_args()
    name = "train" if args.compare == "direct" else "train_monitoring"
    args.json = args.json or ROOT / "benchmarks" / "results" / f"{name}.raw.json"
    if args.compare == "direct":
        sides = (("flagscale", "flagscale", run_flagscale), ("direct", "direct", run_direct))
        labels, target = ("`flagscale train`", "direct megatron.core script"), 1.05
    else:
        sides = (
            ("flagscale", "monitoring on", functools.partial(run_flagscale, tag="-on")),
            ("direct", "monitoring off", functools.partial(run_flagscale, extra=MONITORING_OFF, tag="-off")),
        )
        labels, target = ("`flagscale train`, monitoring on", "`flagscale train`, monitoring off"), 1.02
    work = Path(tempfile.mkdtemp(prefix="flagscale-bench-train-"))
    made = subprocess.run(
        [args.python, str(ROOT / "examples/tiny_gpt/make_corpus.py"), "--out", str(work / "data"), "--docs", "2000"],
        cwd=work,
        env=env(),
        capture_output=True,
        text=True,
    )
    if made.returncode != 0:
        sys.exit(made.stderr[-3000:])
    a = {
        "data": str(work / "data" / "corpus_text_document"),
        "iters": args.iters,
        "layers": args.layers,
        "hidden": args.hidden,
        "heads": args.heads,
        "seq": args.seq,
        "mbs": args.mbs,
        "gbs": args.gbs,
        "lr": 1e-3,
        "seed": 1234,
    }
    rows = []
    for run in range(args.runs):
        for side, shown, fn in sides if run % 2 == 0 else sides[::-1]:
            records, wall = fn(args.python, work, run, a)
            steps = [r["step_time"] for r in records][args.warmup :]
            rows.append(
                {
                    "run": run,
                    "side": side,
                    "median_step_s": statistics.median(steps),
                    "wall_s": wall,
                    "steps": steps,
                    "losses": [r["loss"] for r in records],
                }
            )
            print(
                f"run {run} {shown:14s}: median step {statistics.median(steps) * 1000:7.1f} ms, wall {wall:5.1f} s",
                flush=True,
            )
    by_run = {}
    for row in rows:
        by_run.setdefault(row["run"], {})[row["side"]] = row
    ratios = [r["flagscale"]["median_step_s"] / r["direct"]["median_step_s"] for r in by_run.values()]
    same_loss = all(
        abs(x - y) < 1e-4
        for r in by_run.values()
        for x, y in zip(r["flagscale"]["losses"], r["direct"]["losses"], strict=False)
    )
    ratio = statistics.median(ratios)
    fs = statistics.median(r["flagscale"]["median_step_s"] for r in by_run.values())
    direct = statistics.median(r["direct"]["median_step_s"] for r in by_run.values())
    walls = (
        statistics.median(r["flagscale"]["wall_s"] for r in by_run.values()),
        statistics.median(r["direct"]["wall_s"] for r in by_run.values()),
    )
    table = (
        "| | median step (ms) | wall per run (s) |\n|---|---|---|\n"
        f"| {labels[0]} | {fs * 1000:.1f} | {walls[0]:.1f} |\n"
        f"| {labels[1]} | {direct * 1000:.1f} | {walls[1]:.1f} |\n"
        f"| **ratio (median of per-run ratios)** | **{ratio:.3f}** "
        f"(runs: {', '.join(f'{x:.3f}' for x in ratios)}) | |\n"
    )
    print("\n" + table)
    print(f"same losses on both sides: {same_loss}; target <= {target}: {'met' if ratio <= target else 'MISSED'}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(
        json.dumps(
            {
                "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
                "settings": {**vars(args), "json": str(args.json)},
                "ratio": ratio,
                "ratios": ratios,
                "same_loss": same_loss,
                "rows": rows,
                "table": table,
            },
            indent=1,
        )
    )
    return 1 if args.strict and ratio > target else 0


if __name__ == "__main__":
    sys.exit(main())
