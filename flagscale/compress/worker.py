"""`python -m flagscale.compress.worker SPEC.json`: the worker process of `flagscale compress`.

Measures the source model on the held-out set, compresses it into a temporary sibling of the output, loads the
result back and measures it again, then moves it into place and writes the report (JSON, and a table on
stdout). A failure at any step leaves neither output nor report.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

from flagscale.compress import report as reporting
from flagscale.compress.settings import DATA_FREE, CompressSettings
from flagscale.errors import reported


def _data_summary(packed, data) -> dict:
    return {
        "source": data.source,
        "samples": len(packed.samples),
        "seq_len": data.seq_len,
        "tokens": sum(len(s) for s in packed.samples),
        "documents": len(packed.texts),
    }


def compress_llmcompressor(settings: CompressSettings, work: Path) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from flagscale.compress.data import calibration_and_held_out
    from flagscale.compress.quantize import check_group_size, llmcompressor_run

    tokenizer = AutoTokenizer.from_pretrained(settings.model)
    calib, held = calibration_and_held_out(tokenizer, settings.calibration, settings.evaluation, settings.held_out)
    model = AutoModelForCausalLM.from_pretrained(settings.model, dtype="auto").eval()
    check_group_size(model, settings)  # before any work: a width the scheme cannot group
    ppl_before = reporting.hf_perplexity(model, held.samples)
    samples = None if settings.scheme in DATA_FREE or calib is None else calib.samples
    llmcompressor_run(settings, model, tokenizer, samples, work)
    del model
    loaded = AutoModelForCausalLM.from_pretrained(work).eval()  # what a user's transformers does with it
    ppl_after = reporting.hf_perplexity(loaded, held.samples)
    prompt = torch.tensor([held.samples[0][:8]])
    with torch.no_grad():
        generated = loaded.generate(input_ids=prompt, max_new_tokens=8, do_sample=False)
    quant = getattr(loaded.config, "quantization_config", None)
    quant = quant if isinstance(quant, dict) else (quant.to_dict() if quant is not None else {})
    return reporting.build(
        settings,
        reporting.weight_bytes(Path(settings.model)),
        reporting.weight_bytes(work),
        ppl_before,
        ppl_after,
        perplexity={"method": "transformers (AutoModelForCausalLM, the saved checkpoint loaded back)"},
        held_out=_data_summary(held, settings.evaluation),
        calibration=_data_summary(calib, settings.calibration) if samples and settings.calibration else None,
        format=quant.get("format") or quant.get("quant_method"),
        generated=tokenizer.decode(generated[0][prompt.shape[1] :].tolist()),
    )


def compress_gguf(settings: CompressSettings, work: Path) -> dict:
    from transformers import AutoTokenizer

    from flagscale.compress.data import calibration_and_held_out
    from flagscale.compress.quantize import gguf_run, llama_perplexity

    tokenizer = AutoTokenizer.from_pretrained(settings.model)
    # one window more than scored: llama.cpp tokenizes the text its own way (one BOS, not one per document)
    evaluation = settings.evaluation
    wider = type(evaluation)(**{**evaluation.__dict__, "num_samples": evaluation.num_samples + 1})
    _, held = calibration_and_held_out(tokenizer, settings.calibration, wider, settings.held_out)
    plain, quantized = gguf_run(settings, work)
    chunks, threads = evaluation.num_samples, settings.gguf.threads
    ppl_before = llama_perplexity(plain, held.texts, evaluation.seq_len, chunks, threads)
    ppl_after = llama_perplexity(quantized, held.texts, evaluation.seq_len, chunks, threads)
    return reporting.build(
        settings,
        reporting.weight_bytes(Path(settings.model)),
        quantized.stat().st_size,
        ppl_before,
        ppl_after,
        perplexity={
            "method": "llama.cpp llama-perplexity (the unquantized GGUF, then the quantized one)",
            "unquantized_gguf": plain.name,
        },
        # llama.cpp scores `chunks` windows of the text (its own tokenization), not the packed sequences
        held_out={
            "source": evaluation.source,
            "chunks": chunks,
            "seq_len": evaluation.seq_len,
            "documents": len(held.texts),
        },
        unquantized_gguf_bytes=plain.stat().st_size,
    )


def install(work: Path, output: Path, tool: str) -> None:
    """Move the finished result into place (replacing an earlier run's)."""
    if tool == "gguf":
        os.replace(work / "model.gguf", output)
        return
    if output.is_dir():
        shutil.rmtree(output)
    elif output.exists():
        output.unlink()
    os.replace(work, output)


def run(settings: CompressSettings) -> dict:
    output = Path(settings.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    work = output.parent / f".{output.name}.{os.getpid()}.tmp"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    try:
        compress = compress_gguf if settings.tool == "gguf" else compress_llmcompressor
        result = compress(settings, work)
        install(work, output, settings.tool)
        reporting.write_json(Path(settings.report), result)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return result


def main(argv: list[str]) -> int:
    settings = CompressSettings.from_json(json.loads(Path(argv[0]).read_text()))
    with reported():
        result = run(settings)
    print(reporting.table(result), flush=True)
    print(f"wrote {settings.output} and the report {settings.report}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
