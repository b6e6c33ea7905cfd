#!/usr/bin/env python3
"""Make the tiny example's corpus: generated English-like sentences, tokenized to .bin/.idx.

    python examples/tiny_gpt/make_corpus.py [--out data/tiny_gpt] [--docs 2000]

Writes OUT/corpus.jsonl and, with tools/preprocess_data.py and the byte tokenizer, OUT/corpus_text_document
.bin/.idx (the prefix the example's train.data.data_path names). Deterministic: the same seed writes the
same bytes. A small grammar over a few dozen words is learnable in a few steps, so the loss visibly falls.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
from pathlib import Path

SUBJECTS = ["the cat", "a dog", "the bird", "my friend", "the teacher", "a child", "the old man", "her sister"]
VERBS = ["sees", "likes", "finds", "watches", "helps", "follows", "calls", "paints"]
OBJECTS = ["the ball", "a tree", "the river", "a red house", "the moon", "a small boat", "the garden", "a book"]
TAILS = ["today", "at night", "in the park", "every morning", "with joy", "again", "by the sea", "slowly"]


def sentence(rng: random.Random) -> str:
    return f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)} {rng.choice(TAILS)}."


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("data/tiny_gpt"))
    p.add_argument("--docs", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    rng = random.Random(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    corpus = args.out / "corpus.jsonl"
    with corpus.open("w") as f:
        for _ in range(args.docs):
            text = " ".join(sentence(rng).capitalize() for _ in range(rng.randint(2, 5)))
            f.write(json.dumps({"text": text}) + "\n")
    tool = Path(__file__).resolve().parents[2] / "tools" / "preprocess_data.py"
    return subprocess.call(
        [sys.executable, str(tool), "--input", str(corpus), "--output-prefix", str(args.out / "corpus_text_document")]
    )


if __name__ == "__main__":
    sys.exit(main())
