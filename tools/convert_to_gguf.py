#!/usr/bin/env python3
"""Convert a local Hugging Face checkpoint to GGUF with the pinned llama.cpp converter; optionally quantize.

    tools/convert_to_gguf.py HF_DIR OUT.gguf [--outtype f32|f16|bf16|q8_0] [--quantize Q4_K_M]

A thin command line over flagscale.serve.gguf (which `flagscale serve` uses to convert an HF folder itself,
cached). The converter is `convert_hf_to_gguf.py` of the patched llama.cpp pin (third_party/upstreams.toml, the
llama-cpp-python sdist's vendor/llama.cpp on machines without GitHub) run with that tree's own gguf-py, so
the GGUF matches the llama.cpp that serves it. Nothing is downloaded from the hub (HF_HUB_OFFLINE=1).
`--quantize TYPE` then runs `llama-quantize` from the installed llama.cpp backend wheel.
Needs torch, transformers, sentencepiece, numpy (the `models` extra).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout, installed or not

from flagscale.errors import FlagScaleError  # noqa: E402
from flagscale.serve import gguf  # noqa: E402

OUTTYPES = gguf.OUTTYPES


def convert(model: Path, out: Path, outtype: str = "f16", device: str | None = "cpu", source: str = "auto") -> Path:
    gguf.check_folder(model, "model")
    if outtype not in OUTTYPES:
        raise FlagScaleError(f"--outtype {outtype}: use one of {', '.join(OUTTYPES)}")
    root, _ = gguf.converter_root(device, source)
    out.parent.mkdir(parents=True, exist_ok=True)
    return gguf.convert(model, out, outtype, root)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path, help="local Hugging Face checkpoint folder")
    parser.add_argument("out", type=Path, help="GGUF file to write")
    parser.add_argument("--outtype", default="f16", help=f"converter output type: {', '.join(OUTTYPES)}")
    parser.add_argument(
        "--quantize",
        metavar="TYPE",
        help="then quantize with llama-quantize (Q4_K_M, Q8_0, ...); "
        "OUT gets the quantized model, OUT with .<outtype>.gguf the converted one",
    )
    parser.add_argument("--device", default="cpu", help="device whose patched llama.cpp tree to use")
    parser.add_argument("--source", default="auto", help="auto | submodule | sdist | PATH")
    args = parser.parse_args(argv)
    try:
        if args.quantize:
            plain = convert(
                args.model, args.out.with_suffix(f".{args.outtype}.gguf"), args.outtype, args.device, args.source
            )
            gguf.quantize(plain, args.out, args.quantize)
        else:
            convert(args.model, args.out, args.outtype, args.device, args.source)
    except FlagScaleError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
