#!/usr/bin/env python3
"""TaylorSeer feature caching (flagscale/transforms) vs no caching on a random-weight FLUX transformer.

    OMP_NUM_THREADS=2 /work/mmvenv/bin/python benchmarks/bench_taylorseer.py [--steps 28] [--rounds 3]

The model: a diffusers FluxTransformer2DModel built from its config with random weights (seed 0, fp32): 2 double-
stream and 8 single-stream blocks, 8 heads of 64 (inner 512), 512-wide text features: 52 M parameters. The
generation: a 256x256 image's latents (32x32x16, packed 2x2 into 256 tokens of 64), 64 text tokens, FLUX's
flow-matching Euler scheduler (FlowMatchEulerDiscreteScheduler, dynamic shift for 256 tokens) over --steps steps,
the same latents, prompt embeddings and scheduler for every variant, as the FluxPipeline's denoising loop does.

Same run, --rounds rounds, each variant once per round in turn (the uncached one first), wall time of the whole
denoising loop; the table has medians. "PSNR" compares the final latents (unpacked, 16x32x32) with the uncached
run's, the peak being the uncached latents' range: there is no trained VAE to decode them to pixels, and a
random one would only add a fixed random map. The variants: TaylorSeer on the whole transformer's output (the
cheapest: a predicted step skips everything) or on every transformer block's output, and a few warm-up /
interval / order settings. Raw samples: --json PATH.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from flagscale.transforms import apply, parse

BLOCKS = {"type": ["FluxTransformerBlock", "FluxSingleTransformerBlock"]}
FINAL = {"type": "FluxTransformer2DModel"}
VARIANTS: dict[str, list[dict] | None] = {
    "uncached": None,
    "final w3 i3 o2": [{"name": "taylorseer", "select": FINAL, "warmup": 3, "interval": 3, "order": 2}],
    "final w3 i3 o1": [{"name": "taylorseer", "select": FINAL, "warmup": 3, "interval": 3, "order": 1}],
    "final w3 i2 o2": [{"name": "taylorseer", "select": FINAL, "warmup": 3, "interval": 2, "order": 2}],
    "final w3 i4 o2": [{"name": "taylorseer", "select": FINAL, "warmup": 3, "interval": 4, "order": 2}],
    "final w3 i3 o2 x=t": [
        {"name": "taylorseer", "select": FINAL, "warmup": 3, "interval": 3, "order": 2, "x": "timestep"}
    ],
    "final w3 i3 o0 (reuse)": [{"name": "taylorseer", "select": FINAL, "warmup": 3, "interval": 3, "order": 0}],
    "blocks w3 i3 o2": [{"name": "taylorseer", "select": BLOCKS, "warmup": 3, "interval": 3, "order": 2}],
}


def build(seed: int = 0):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,
        num_layers=2,
        num_single_layers=8,
        attention_head_dim=64,
        num_attention_heads=8,
        joint_attention_dim=512,
        pooled_projection_dim=256,
        axes_dims_rope=(8, 28, 28),
    ).eval()


def inputs(size: int = 256, text: int = 64, seed: int = 1) -> dict:
    from diffusers import FluxPipeline

    g = torch.Generator().manual_seed(seed)
    h = w = size // 16  # VAE /8, then packed 2x2
    return dict(
        latents=torch.randn(1, h * w, 64, generator=g),
        encoder_hidden_states=torch.randn(1, text, 512, generator=g),
        pooled_projections=torch.randn(1, 256, generator=g),
        img_ids=FluxPipeline._prepare_latent_image_ids(1, h, w, "cpu", torch.float32),
        txt_ids=torch.zeros(text, 3),
        hw=(h, w),
    )


def denoise(model, data: dict, steps: int) -> torch.Tensor:
    """FluxPipeline's loop: shifted sigmas, velocity from the transformer, an Euler step."""
    import numpy as np
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    tokens = data["latents"].shape[1]
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=calculate_shift(tokens))
    latents = data["latents"].clone()
    cond = {k: data[k] for k in ("encoder_hidden_states", "pooled_projections", "img_ids", "txt_ids")}
    with torch.no_grad():
        for t in scheduler.timesteps:
            v = model(latents, timestep=t.expand(1) / 1000, return_dict=False, **cond)[0]
            latents = scheduler.step(v, t, latents, return_dict=False)[0]
    return unpack(latents, data["hw"])


def psnr(out: torch.Tensor, ref: torch.Tensor) -> float:
    mse = ((out - ref) ** 2).mean().item()
    peak = (ref.max() - ref.min()).item()
    return math.inf if mse == 0 else 10 * math.log10(peak**2 / mse)


def unpack(latents: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    h, w = hw
    return latents.view(1, h, w, 16, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(1, 16, 2 * h, 2 * w)


def run_variant(model, data, steps, raw) -> tuple[float, torch.Tensor, int]:
    calls = []
    # computed steps: the first block's first norm runs unless its block or the whole transformer is predicted
    counter = model.transformer_blocks[0].norm1.register_forward_hook(lambda *a: calls.append(1))
    handle = apply(model, parse(raw)) if raw else None
    start = time.perf_counter()
    out = denoise(model, data, steps)
    seconds = time.perf_counter() - start
    if handle:
        handle.remove()
    counter.remove()
    return seconds, out, len(calls)


def velocity_change(model, data, steps) -> float:
    """How much the transformer's output moves from one step to the next in the uncached run (median of
    |v_t - v_t-1| / |v_t|): what caching bets on being small."""
    outs: list[torch.Tensor] = []
    hook = model.register_forward_hook(lambda m, a, out: outs.append(out[0].clone()))
    denoise(model, data, steps)
    hook.remove()
    return statistics.median(((b - a).norm() / b.norm()).item() for a, b in zip(outs, outs[1:], strict=False))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS))
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    model, data = build(), inputs()
    params = sum(p.numel() for p in model.parameters())
    load = os.getloadavg()
    print(f"model {params / 1e6:.1f} M params, {args.steps} steps, {torch.get_num_threads()} threads, load {load}")
    change = velocity_change(model, data, args.steps)  # also warms the allocator and kernels
    print(f"step-to-step change of the transformer output (median relative L2): {change:.4f}")
    samples: dict[str, list[float]] = {v: [] for v in args.variants}
    outs: dict[str, torch.Tensor] = {}
    computed: dict[str, int] = {}
    for r in range(args.rounds):
        for name in args.variants:
            seconds, out, computed[name] = run_variant(model, data, args.steps, VARIANTS[name])
            samples[name].append(seconds)
            if name in outs:
                assert torch.equal(out, outs[name]), f"{name}: not deterministic"
            outs[name] = out
            print(f"round {r} {name}: {seconds:.2f} s", flush=True)
    ref, start = outs["uncached"], unpack(data["latents"], data["hw"])
    base = statistics.median(samples["uncached"])
    rows = []
    print(
        "\n| variant | computed steps | median wall (s) | speed-up (paired) | PSNR vs uncached (dB) "
        "| PSNR, update (dB) | rel. L2 error, update |"
    )
    print("|---|---|---|---|---|---|---|")
    for name in args.variants:
        med = statistics.median(samples[name])
        # the update: what the denoiser changed (final - initial latents), so the initial noise does not count
        row = dict(
            variant=name,
            computed=computed[name],
            median_s=med,
            speedup=base / med,
            psnr=psnr(outs[name], ref),
            psnr_update=psnr(outs[name] - start, ref - start),
            # each round's uncached time over this variant's: the machine's load drifts less within a round
            paired=statistics.median(u / c for u, c in zip(samples["uncached"], samples[name], strict=True)),
            error=((outs[name] - ref).norm() / (ref - start).norm()).item(),
        )
        rows.append(row)
        db = ["inf" if math.isinf(row[k]) else f"{row[k]:.1f}" for k in ("psnr", "psnr_update")]
        print(
            f"| {name} | {computed[name]}/{args.steps} | {med:.2f} | {base / med:.2f}x ({row['paired']:.2f}x) "
            f"| {db[0]} | {db[1]} | {row['error']:.2%} |"
        )
    print(f"load average after: {os.getloadavg()}")
    if args.json:
        result = {"params": params, "steps": args.steps, "change": change, "samples": samples, "rows": rows}
        args.json.write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
