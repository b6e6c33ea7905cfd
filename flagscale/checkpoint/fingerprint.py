"""The content hash of a Hugging Face model folder: what the caches of converted models are keyed by.

`flagscale serve` (a GGUF for llama.cpp) and `train.system.checkpoint.hf_model` (a Megatron import at a layout)
convert an HF folder once and reuse the result while the folder's content is the same: config.json, the weight
files (safetensors shards and their index, or PyTorch .bin files) and the tokenizer files. Paths and timestamps
do not count: a copied folder hits the same entry, a rewritten shard misses it.
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

from flagscale.checkpoint.hf import CONFIG, TOKENIZER_FILES

WEIGHT_PATTERNS = ("*.safetensors", "*.safetensors.index.json", "pytorch_model*.bin", "pytorch_model*.bin.index.json")
_CHUNK = 1 << 22


def hashed_files(folder: Path) -> list[Path]:
    """The files of `folder` that make its content (sorted by name): config, weights, tokenizer."""
    names = {CONFIG, *TOKENIZER_FILES}
    files = {p for p in folder.iterdir() if p.name in names and p.is_file()}
    for pattern in WEIGHT_PATTERNS:
        files.update(p for p in folder.glob(pattern) if p.is_file())
    return sorted(files, key=lambda p: p.name)


def weight_files(folder: Path) -> list[Path]:
    return [p for p in hashed_files(folder) if p.suffix in (".safetensors", ".bin")]


def content_hash(folder: Path) -> str:
    """sha256 over every hashed file's name and bytes."""
    files = hashed_files(folder)
    # the memo holds for one process while no file changes (a rewrite changes size or mtime): serve checks the
    # folder both when it converts and when it builds the engine command
    stats = tuple((p.name, st.st_size, st.st_mtime_ns, st.st_ino) for p in files for st in [p.stat()])
    return _hash(str(folder.resolve()), stats)


@functools.cache
def _hash(folder: str, stats: tuple[tuple[str, int, int, int], ...]) -> str:
    digest = hashlib.sha256()
    for name, size, _mtime, _inode in stats:
        digest.update(f"{name}\0{size}\0".encode())
        with open(Path(folder) / name, "rb") as f:
            while chunk := f.read(_CHUNK):
                digest.update(chunk)
    return digest.hexdigest()
