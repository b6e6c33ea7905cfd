#!/usr/bin/env python3
"""`flagscale checkpoint import | export` of a ~1B-parameter Llama beside a plain copy of the same bytes.

    /work/mcvenv/bin/python benchmarks/bench_checkpoint.py [--runs 3] [--work /tmp/bench-ckpt] [--python PY]

The script writes its own HF checkpoint first: a Llama-3.2-1B-shaped LlamaForCausalLM (16 layers, hidden 2048,
32 heads / 8 KV heads, FFN 8192, vocabulary 128256, tied embeddings: 1.24 B parameters) with random bf16 weights,
in safetensors shards of at most --shard-size bytes as transformers' save_pretrained splits them (tensors in
order, a new file when the next would overflow), with model.safetensors.index.json and config.json. Then, same
run, each measured `--runs` times, interleaved:

* copy: `shutil.copy` of every shard into a fresh folder (the floor: the same bytes read and written once);
* import: `bridge.import_checkpoint(HF, OUT, tp=1, pp=1)` (torchrun + one worker rank, as the CLI runs it);
* export: `bridge.export_checkpoint(OUT, HF2)` of that import, and a check that HF2's tensors equal the source's.

Each conversion runs in a fresh child process (`--python`: an environment with the megatron build, flagscale and
psutil). Peak memory is measured two ways, for the whole process tree (the bridge, torchrun's agent, the worker):
* tree RSS: the sum of the RSS of every process in the tree, sampled every 20 ms with psutil (file-backed pages
  of memory-mapped files count: safetensors maps the files it reads); the same sum of RssAnon (anonymous
  memory only) beside it;
* max RSS: `resource.getrusage(RUSAGE_CHILDREN).ru_maxrss` of a wrapper process, i.e. the largest single
  process of the tree (the kernel's own peak, not sampled).

Targets (issue #11): conversion wall time <= 2x the copy's, peak RSS <= 1.5x the largest shard (medians). Files
are read from a warm page cache in every case (the copy too). Raw samples: --json PATH.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

GB = 10**9
# Llama-3.2-1B's shapes
SHAPE = dict(layers=16, hidden=2048, heads=32, kv_heads=8, ffn=8192, vocab=128256)

CONVERT = r"""
import resource, subprocess, sys
code = '''
import sys
from pathlib import Path
from flagscale.checkpoint import bridge
action, source, out = sys.argv[1:]
if action == "import":
    bridge.import_checkpoint(Path(source), Path(out), tp=1, pp=1)
else:
    bridge.export_checkpoint(Path(source), Path(out))
'''
result = subprocess.run([sys.executable, "-c", code, *sys.argv[1:]])
print("maxrss_kb", resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, flush=True)
sys.exit(result.returncode)
"""


def hf_shapes(s: dict[str, int]) -> dict[str, tuple[int, ...]]:
    """The tensors of the Llama in the order transformers saves them."""
    head = s["hidden"] // s["heads"]
    q, kv = s["heads"] * head, s["kv_heads"] * head
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (s["vocab"], s["hidden"])}
    for i in range(s["layers"]):
        p = f"model.layers.{i}."
        shapes.update(
            {
                p + "self_attn.q_proj.weight": (q, s["hidden"]),
                p + "self_attn.k_proj.weight": (kv, s["hidden"]),
                p + "self_attn.v_proj.weight": (kv, s["hidden"]),
                p + "self_attn.o_proj.weight": (s["hidden"], q),
                p + "mlp.gate_proj.weight": (s["ffn"], s["hidden"]),
                p + "mlp.up_proj.weight": (s["ffn"], s["hidden"]),
                p + "mlp.down_proj.weight": (s["hidden"], s["ffn"]),
                p + "input_layernorm.weight": (s["hidden"],),
                p + "post_attention_layernorm.weight": (s["hidden"],),
            }
        )
    shapes["model.norm.weight"] = (s["hidden"],)
    return shapes


def make_checkpoint(folder: Path, s: dict[str, int], shard_size: int, seed: int = 0) -> list[Path]:
    """Random bf16 weights in save_pretrained's shards; one shard in memory at a time."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    folder.mkdir(parents=True)
    shapes = hf_shapes(s)
    shards: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        nbytes = math.prod(shape) * 2
        if shards[-1] and size + nbytes > shard_size:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    gen = torch.Generator().manual_seed(seed)
    files, weight_map = [], {}
    for i, names in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for name in names:
            if "norm" in name:
                tensors[name] = (1 + 0.1 * torch.randn(shapes[name], generator=gen)).to(torch.bfloat16)
            else:
                tensors[name] = (0.02 * torch.randn(shapes[name], generator=gen)).to(torch.bfloat16)
        save_file(tensors, str(folder / file), metadata={"format": "pt"})
        del tensors
        files.append(folder / file)
        weight_map.update(dict.fromkeys(names, file))
    total = sum(math.prod(shape) * 2 for shape in shapes.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    config = LlamaConfig(
        vocab_size=s["vocab"],
        hidden_size=s["hidden"],
        intermediate_size=s["ffn"],
        num_hidden_layers=s["layers"],
        num_attention_heads=s["heads"],
        num_key_value_heads=s["kv_heads"],
        max_position_embeddings=8192,
        rope_theta=500000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
    ).to_dict()
    config.update(architectures=["LlamaForCausalLM"], torch_dtype="bfloat16")
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return files


class TreeSampler:
    """Peaks of the summed Rss, Pss and Anonymous memory (/proc/PID/smaps_rollup) of a process and all its
    descendants, sampled every `period` seconds."""

    FIELDS = ("Rss", "Pss", "Anonymous")

    def __init__(self, pid: int, period: float = 0.02) -> None:
        self.pid, self.period = pid, period
        self.peak = dict.fromkeys(self.FIELDS, 0)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    @classmethod
    def _rollup(cls, pid: int) -> dict[str, int]:
        out = dict.fromkeys(cls.FIELDS, 0)
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                key, _, rest = line.partition(":")
                if key in out:
                    out[key] = int(rest.split()[0]) * 1024
        except (OSError, ValueError, IndexError):
            pass
        return out

    def run(self) -> None:
        import psutil

        root = psutil.Process(self.pid)
        while not self.stop.is_set():
            try:
                pids = [self.pid, *(p.pid for p in root.children(recursive=True))]
            except psutil.Error:
                break
            total = dict.fromkeys(self.FIELDS, 0)
            for pid in pids:
                for key, value in self._rollup(pid).items():
                    total[key] += value
            self.peak = {k: max(v, total[k]) for k, v in self.peak.items()}
            time.sleep(self.period)

    def finish(self) -> dict[str, int]:
        self.stop.set()
        self.thread.join()
        return self.peak


def measure(cmd: list[str], env: dict[str, str]) -> dict[str, float]:
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    sampler = TreeSampler(proc.pid)
    out, err = proc.communicate()
    wall = time.perf_counter() - start
    peak = sampler.finish()
    if proc.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{out[-3000:]}\n{err[-3000:]}")
    maxrss = next(int(line.split()[1]) for line in out.splitlines() if line.startswith("maxrss_kb")) * 1024
    return {
        "wall_s": wall,
        "tree_pss": peak["Pss"],
        "tree_rss": peak["Rss"],
        "tree_anon": peak["Anonymous"],
        "max_rss": maxrss,
    }


def copy_shards(files: list[Path], dest: Path) -> dict[str, float]:
    dest.mkdir()
    start = time.perf_counter()
    for f in files:
        shutil.copy(f, dest / f.name)
    return {"wall_s": time.perf_counter() - start}


def same_tensors(a: Path, b: Path) -> bool:
    import torch
    from safetensors import safe_open

    def names(folder: Path) -> dict[str, Path]:
        out = {}
        for path in sorted(folder.glob("*.safetensors")):
            with safe_open(str(path), framework="pt") as f:
                out.update(dict.fromkeys(f.keys(), path))  # noqa: SIM118
        return out

    left, right = names(a), names(b)
    if sorted(left) != sorted(right):
        return False
    for name in left:
        with safe_open(str(left[name]), framework="pt") as f, safe_open(str(right[name]), framework="pt") as g:
            x, y = f.get_tensor(name), g.get_tensor(name)
            if x.dtype != y.dtype or not torch.equal(x, y):
                return False
    return True


def median(samples: list[dict[str, float]], key: str) -> float:
    return statistics.median(s[key] for s in samples)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: a new temp folder)")
    parser.add_argument("--python", default=sys.executable, help="python of the env with megatron + flagscale")
    parser.add_argument("--shard-size", type=int, default=GB, help="max bytes per generated shard (1e9)")
    parser.add_argument("--layers", type=int, default=SHAPE["layers"])
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    shape = {**SHAPE, "layers": args.layers}
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-ckpt-"))
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    try:
        hf = work / "hf"
        t = time.perf_counter()
        files = make_checkpoint(hf, shape, args.shard_size)
        sizes = [f.stat().st_size for f in files]
        params = sum(math.prod(s) for s in hf_shapes(shape).values())
        print(
            f"generated {params / 1e9:.2f} B parameters, {sum(sizes) / GB:.2f} GB in {len(files)} shards "
            f"(largest {max(sizes) / GB:.2f} GB) in {time.perf_counter() - t:.0f} s",
            flush=True,
        )
        samples: dict[str, list[dict[str, float]]] = {"copy": [], "import": [], "export": []}
        for run in range(args.runs):
            run_dir = work / f"run{run}"
            run_dir.mkdir()
            samples["copy"].append(copy_shards(files, run_dir / "copy"))
            samples["import"].append(measure([args.python, "-c", CONVERT, "import", str(hf), str(run_dir / "mg")], env))
            samples["export"].append(
                measure([args.python, "-c", CONVERT, "export", str(run_dir / "mg"), str(run_dir / "back")], env)
            )
            if run == 0 and not same_tensors(hf, run_dir / "back"):
                sys.exit("export differs from the source checkpoint")
            print(
                f"run {run + 1}: " + ", ".join(f"{k} {v[-1]['wall_s']:.1f} s" for k, v in samples.items()), flush=True
            )
            shutil.rmtree(run_dir)
        report(samples, max(sizes), args.runs)
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps({"shard_sizes": sizes, "samples": samples}, indent=2))
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


def report(samples: dict[str, list[dict[str, float]]], largest: int, runs: int) -> None:
    copy = median(samples["copy"], "wall_s")
    print(f"\nmedians of {runs} runs; largest shard {largest / GB:.2f} GB; copy {copy:.1f} s\n")
    print("| step | wall (s) | vs copy | tree PSS (GB) | tree RSS (GB) | tree anon (GB) | max RSS (GB) ", end="")
    print("| PSS / largest shard | targets |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---|")
    print(f"| copy (`shutil.copy` of the shards) | {copy:.1f} | 1.00x | | | | | | |")
    for step in ("import", "export"):
        s = samples[step]
        wall, pss, rss = median(s, "wall_s"), median(s, "tree_pss"), median(s, "tree_rss")
        anon, maxrss = median(s, "tree_anon"), median(s, "max_rss")
        ratio, mem = wall / copy, pss / largest
        verdict = f"time {'PASS' if ratio <= 2 else 'FAIL'} (<= 2x), "
        verdict += f"memory {'PASS' if mem <= 1.5 else 'FAIL'} (<= 1.5x)"
        label = "import TP=1 (HF -> Megatron)" if step == "import" else "export (Megatron -> HF)"
        print(
            f"| {label} | {wall:.1f} | {ratio:.2f}x | {pss / GB:.2f} | {rss / GB:.2f} | {anon / GB:.2f} "
            f"| {maxrss / GB:.2f} | {mem:.2f}x | {verdict} |"
        )


if __name__ == "__main__":
    sys.exit(main())
