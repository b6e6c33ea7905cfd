"""The two ways a checkpoint is compressed: llm-compressor recipes (compressed-tensors) and GGUF (llama.cpp).

Runs inside the worker process (`python -m flagscale.compress.worker`): torch, transformers and llmcompressor
load there, never in the `flagscale` CLI. Each writes into a temporary sibling of the output, which
flagscale.compress.worker renames into place once the report is complete: a failed run leaves nothing behind.
"""

from __future__ import annotations

import re
import subprocess
import tempfile
from pathlib import Path

from flagscale.compress.settings import CompressSettings
from flagscale.errors import ConfigError, ConversionError


# ----------------------------------------------------------------------------------------- llm-compressor
def recipe(settings: CompressSettings) -> list:
    """The modifiers of a scheme: W8A8 = SmoothQuant then GPTQ (int8 weights and activations), W4A16 = GPTQ
    (int4 weights in groups), FP8_DYNAMIC = round-to-nearest fp8 weights, per-token fp8 activations (no data)."""
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier

    r = settings.recipe
    ignore = list(r.ignore)
    if settings.scheme == "W8A8":
        from llmcompressor.modifiers.smoothquant import SmoothQuantModifier

        return [
            SmoothQuantModifier(smoothing_strength=r.smoothing_strength),
            GPTQModifier(targets="Linear", scheme="W8A8", ignore=ignore, dampening_frac=r.dampening_frac),
        ]
    if settings.scheme == "W4A16":
        return [GPTQModifier(targets="Linear", scheme="W4A16", ignore=ignore, dampening_frac=r.dampening_frac)]
    return [QuantizationModifier(targets="Linear", scheme="FP8_DYNAMIC", ignore=ignore)]


def check_group_size(model, settings: CompressSettings) -> None:
    """Grouped schemes (W4A16: groups of 128 input columns) need every quantized Linear's width to divide."""
    import torch
    from compressed_tensors.quantization import preset_name_to_scheme

    group = preset_name_to_scheme(settings.scheme, ["Linear"]).weights.group_size
    if not group or group < 0:
        return
    for name, module in model.named_modules():
        skipped = any(name == i or name.endswith("." + i) or name.split(".")[-1] == i for i in settings.recipe.ignore)
        if isinstance(module, torch.nn.Linear) and not skipped and module.in_features % group:
            raise ConfigError(
                f"compress.scheme={settings.scheme}: {name} has {module.in_features} input features, not a multiple "
                f"of the scheme's group size {group}; add it to compress.recipe.ignore or pick W8A8/FP8_DYNAMIC"
            )


def llmcompressor_run(settings: CompressSettings, model, tokenizer, samples: list[list[int]] | None, out: Path):
    """Apply the scheme's recipe to `model` in place and save it compressed (compressed-tensors) into `out`."""
    import torch
    from llmcompressor import oneshot

    kwargs: dict = {}
    if samples:
        from datasets import Dataset

        kwargs = {
            "dataset": Dataset.from_dict({"input_ids": samples, "attention_mask": [[1] * len(s) for s in samples]}),
            "num_calibration_samples": len(samples),
            "max_seq_length": max(len(s) for s in samples),
        }
    torch.manual_seed(settings.seed)  # llm-compressor draws the calibration order from torch's generator
    oneshot(model=model, recipe=recipe(settings), **kwargs)
    model.save_pretrained(out, save_compressed=True)
    tokenizer.save_pretrained(out)


# ----------------------------------------------------------------------------------------- GGUF
def gguf_run(settings: CompressSettings, work: Path) -> tuple[Path, Path]:
    """(unquantized GGUF, quantized GGUF), both made in `work`: the llama.cpp pin's convert_hf_to_gguf.py (run by
    flagscale.serve.gguf as `flagscale serve` converts a folder), then llama-quantize of the installed wheel. Not
    through serve's content-keyed cache: a compression run always converts, and leaves no full-size copy there."""
    from flagscale.serve import gguf

    folder = Path(settings.model)
    gguf.check_folder(folder, "compress.model")
    outtype = gguf.outtype_of(folder, gguf.Options(outtype=settings.gguf.outtype))
    root, _ = gguf.converter_root()
    plain = gguf.convert(folder, work / f"model.{outtype}.gguf", outtype, root, work / "convert.log")
    return plain, gguf.quantize(plain, work / "model.gguf", settings.scheme)


_PPL = re.compile(r"Final estimate: PPL = ([0-9.]+)")


def llama_perplexity(gguf_file: Path, texts: list[str], seq_len: int, chunks: int, threads: int) -> float:
    """Perplexity through llama.cpp's own llama-perplexity (the wheel's binary): `chunks` windows of `seq_len`
    tokens; llama.cpp scores the second half of each window (the first half is context)."""
    from flagscale.serve.binaries import llama_tool

    with tempfile.TemporaryDirectory(prefix="flagscale-ppl-") as tmp:
        text = Path(tmp) / "held_out.txt"
        text.write_text("\n".join(texts) + "\n", encoding="utf-8")
        cmd = [
            str(llama_tool("llama-perplexity")),
            *("-m", str(gguf_file), "-f", str(text), "-c", str(seq_len), "-b", str(seq_len)),
            *("--chunks", str(chunks), "-t", str(threads), "--no-warmup"),
        ]
        # llama.cpp logs from a background thread and may exit (status 0) before its last lines are written:
        # here 6 runs in 60 lost the final estimate into pipes, 3 in 100 into a file. The result is
        # deterministic, so such a run is simply repeated (6 tries: ~1e-8 to fail on a lost tail).
        log = Path(tmp) / "perplexity.log"
        for _attempt in range(6):
            with log.open("w") as handle:
                result = subprocess.run(cmd, stdout=handle, stderr=subprocess.STDOUT)
            output = log.read_text(errors="replace")
            match = _PPL.search(output)
            if result.returncode != 0 or match:
                break
    if result.returncode != 0 or not match:
        lines = [line for line in output.splitlines() if line.strip()]
        raise ConversionError(
            f"llama-perplexity on {gguf_file} failed (exit status {result.returncode}): "
            f"{(lines or ['no output'])[-1].strip()}"
        )
    return float(match.group(1))
