"""What a compression run reports: sizes before/after and perplexity on the held-out set before/after.

Perplexity is exp(mean next-token negative log-likelihood) over the held-out sequences. For llm-compressor
schemes both numbers come from transformers (the source model, then the saved compressed checkpoint loaded
back with AutoModelForCausalLM.from_pretrained); for GGUF schemes both come from llama.cpp's llama-perplexity
(the unquantized GGUF, then the quantized one), so each pair is measured the same way.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path


def weight_bytes(path: Path) -> int:
    """A checkpoint's size: its safetensors weights (a folder) or the file (a GGUF)."""
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.glob("*.safetensors"))


def hf_perplexity(model, samples: list[list[int]]) -> float:
    """transformers perplexity over `samples` (each a window of token ids), weighted by predicted tokens."""
    import torch

    total, count = 0.0, 0
    with torch.no_grad():
        for ids in samples:
            tensor = torch.tensor([ids])
            loss = model(input_ids=tensor, labels=tensor).loss
            total += float(loss) * (len(ids) - 1)
            count += len(ids) - 1
    return math.exp(total / count)


def build(settings, before: int, after: int, ppl_before: float, ppl_after: float, **extra) -> dict:
    return {
        "model": settings.model,
        "scheme": settings.scheme,
        "tool": settings.tool,
        "output": settings.output,
        "size": {"before_bytes": before, "after_bytes": after, "ratio": round(after / before, 4)},
        "perplexity": {
            "before": round(ppl_before, 4),
            "after": round(ppl_after, 4),
            "delta": round(ppl_after - ppl_before, 4),
            "delta_pct": round(100 * (ppl_after - ppl_before) / ppl_before, 3),
            **extra.pop("perplexity", {}),
        },
        **extra,
    }


def table(report: dict) -> str:
    size, ppl = report["size"], report["perplexity"]
    rows = [
        ("scheme", f"{report['scheme']} ({report['tool']})"),
        ("size before", f"{size['before_bytes']:,} B"),
        ("size after", f"{size['after_bytes']:,} B"),
        ("size ratio", f"{size['ratio']:.3f} ({1 / size['ratio']:.2f}x smaller)"),
        ("perplexity before", f"{ppl['before']:.4f}"),
        ("perplexity after", f"{ppl['after']:.4f}"),
        ("perplexity delta", f"{ppl['delta']:+.4f} ({ppl['delta_pct']:+.2f}%)"),
        ("measured by", ppl["method"]),
        ("output", report["output"]),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def write_json(path: Path, report: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    os.replace(tmp, path)
