"""The content hash of a Hugging Face model folder: what the caches of converted models are keyed by.

`flagscale serve` (a GGUF for llama.cpp) and `train.system.checkpoint.hf_model` (a Megatron import at a layout)
convert an HF folder once and reuse the result while the folder's content is the same: config.json, the weight
files (safetensors shards and their index, or PyTorch .bin files) and the tokenizer files. Paths and timestamps
do not count: a copied folder hits the same entry, a rewritten shard misses it. Each file's digest is remembered
by its path and stat, so only new or changed files are read.
"""

from __future__ import annotations

import hashlib
import json
import os
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
    """sha256 over every hashed file's name and content digest."""
    digest = hashlib.sha256()
    for path in hashed_files(folder):
        digest.update(f"{path.name}\0{file_digest(path)}\n".encode())
    return digest.hexdigest()


def file_digest(path: Path) -> str:
    """sha256 of a file's bytes, remembered in the flagscale cache (`hashes/`) under the file's path and stat
    (size, mtime, ctime, inode): starting a server or a run again does not re-read tens of GB of weights, and any
    write to the file (which changes its ctime) reads it again."""
    from flagscale.upstream.cache import cache_root

    path = path.resolve()
    st = path.stat()
    stamp = [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]
    memo = cache_root() / "hashes" / f"{hashlib.sha256(str(path).encode()).hexdigest()}.json"
    try:
        saved = json.loads(memo.read_text())
        if saved["stamp"] == stamp:
            return str(saved["sha256"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    try:  # a memo only: a read-only cache still hashes, just every time
        memo.parent.mkdir(parents=True, exist_ok=True)
        tmp = memo.with_name(f"{memo.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"path": str(path), "stamp": stamp, "sha256": digest.hexdigest()}))
        os.replace(tmp, memo)
    except OSError:
        pass
    return digest.hexdigest()
