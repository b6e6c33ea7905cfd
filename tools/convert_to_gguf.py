#!/usr/bin/env python3
"""Convert a local Hugging Face checkpoint to GGUF with the pinned llama.cpp converter; optionally quantize.

    tools/convert_to_gguf.py HF_DIR OUT.gguf [--outtype f32|f16|bf16|q8_0] [--quantize Q4_K_M]

The converter is `convert_hf_to_gguf.py` of the patched llama.cpp pin (third_party/upstreams.toml, the
llama-cpp-python sdist's vendor/llama.cpp on machines without GitHub) run with that tree's own gguf-py, so
the GGUF matches the llama.cpp that serves it. Nothing is downloaded from the hub (HF_HUB_OFFLINE=1).
`--quantize TYPE` then runs `llama-quantize` from the installed llama.cpp backend wheel.
Needs torch, transformers, sentencepiece, numpy (the `models` extra).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout, installed or not

from flagscale.errors import FlagScaleError  # noqa: E402

OUTTYPES = ("f32", "f16", "bf16", "q8_0")


def converter_root(device: str | None = "cpu", source: str = "auto") -> Path:
    """The patched llama.cpp repository root (holding convert_hf_to_gguf.py and gguf-py/)."""
    from flagscale.patches.tree import patched_tree
    from flagscale.upstream.project import Project
    from flagscale.upstream.target import Target

    project = Project.find(Path(__file__).resolve().parent.parent)
    tree = patched_tree(Target.of(project, "llama.cpp", device, source))
    root = tree.path / (tree.source.to_tree_path("") or "")
    if not (root / "convert_hf_to_gguf.py").is_file():
        raise FlagScaleError(f"{root} has no convert_hf_to_gguf.py: is the llama.cpp pin complete?")
    return root


def convert(model: Path, out: Path, outtype: str = "f16", device: str | None = "cpu", source: str = "auto") -> Path:
    if not (model / "config.json").is_file():
        raise FlagScaleError(f"{model} is not a Hugging Face checkpoint (no config.json)")
    if outtype not in OUTTYPES:
        raise FlagScaleError(f"--outtype {outtype}: use one of {', '.join(OUTTYPES)}")
    root = converter_root(device, source)
    out.parent.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(root / "gguf-py"), os.environ.get("PYTHONPATH")])),
        "PYTHONDONTWRITEBYTECODE": "1",  # the cached tree is read-only
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
    }
    cmd = [sys.executable, str(root / "convert_hf_to_gguf.py"), str(model), "--outfile", str(out), "--outtype", outtype]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if result.returncode != 0 or not out.is_file():
        tail = "\n".join((result.stdout + result.stderr).strip().splitlines()[-15:])
        raise FlagScaleError(f"convert_hf_to_gguf.py failed (exit {result.returncode}):\n{tail}")
    return out


def quantize(gguf: Path, out: Path, qtype: str) -> Path:
    from flagscale.serve.binaries import llama_tool

    result = subprocess.run(
        [str(llama_tool("llama-quantize")), str(gguf), str(out), qtype, "1"], capture_output=True, text=True
    )
    if result.returncode != 0 or not out.is_file():
        tail = "\n".join((result.stdout + result.stderr).strip().splitlines()[-10:])
        raise FlagScaleError(f"llama-quantize {qtype} failed (exit {result.returncode}):\n{tail}")
    return out


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
            quantize(plain, args.out, args.quantize)
        else:
            convert(args.model, args.out, args.outtype, args.device, args.source)
    except FlagScaleError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
