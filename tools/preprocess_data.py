#!/usr/bin/env python3
"""Turn a text or JSONL corpus into Megatron's indexed dataset (.bin/.idx) with an offline tokenizer.

    python tools/preprocess_data.py --input corpus.jsonl --output-prefix data/corpus [--json-key text]
    python tools/preprocess_data.py --input corpus.txt --output-prefix data/corpus --tokenizer hf \\
        --tokenizer-path /models/tok

Input: `.jsonl` (one JSON object per line, the document under --json-key) or plain text (one document
per non-empty line). Each document is tokenized and followed by the end-of-document id. Output:
PREFIX.bin and PREFIX.idx, written by megatron.core's own IndexedDatasetBuilder, so Megatron Core's
GPTDataset (and `flagscale train`, `train.data.data_path=PREFIX`) read them. Needs megatron-core
(the one `pip install . -C backend=megatron` installs).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def documents(path: Path, json_key: str):
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            if path.suffix in (".jsonl", ".json"):
                try:
                    yield json.loads(line)[json_key]
                except (ValueError, KeyError, TypeError):
                    raise SystemExit(f"{path}:{lineno}: not a JSON object with a {json_key!r} string") from None
            else:
                yield line.rstrip("\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--input", required=True, type=Path)
    p.add_argument("--output-prefix", required=True, type=Path)
    p.add_argument("--tokenizer", choices=("byte", "hf"), default="byte")
    p.add_argument("--tokenizer-path", default=None, help="local tokenizer folder (--tokenizer hf)")
    p.add_argument("--json-key", default="text")
    p.add_argument("--no-append-eod", action="store_true", help="do not end each document with the eod id")
    args = p.parse_args(argv)
    if not args.input.is_file():
        raise SystemExit(f"{args.input}: no such file")

    import numpy
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without install
    from flagscale.train.tokenizer import build_tokenizer

    tokenizer = build_tokenizer(args.tokenizer, args.tokenizer_path)
    dtype = numpy.uint16 if tokenizer.vocab_size < 65500 else numpy.int32  # as Megatron-LM picks it
    args.output_prefix.parent.mkdir(parents=True, exist_ok=True)
    builder = IndexedDatasetBuilder(f"{args.output_prefix}.bin", dtype=dtype)
    docs = tokens = 0
    for text in documents(args.input, args.json_key):
        ids = tokenizer.tokenize(text)
        if not args.no_append_eod:
            ids.append(tokenizer.eod)
        if not ids:
            continue
        builder.add_document(torch.tensor(ids, dtype=torch.int64), [len(ids)])
        docs += 1
        tokens += len(ids)
    if not docs:
        raise SystemExit(f"{args.input}: no documents")
    builder.finalize(f"{args.output_prefix}.idx")
    print(f"wrote {args.output_prefix}.bin/.idx: {docs} documents, {tokens} tokens")
    return 0


if __name__ == "__main__":
    sys.exit(main())
