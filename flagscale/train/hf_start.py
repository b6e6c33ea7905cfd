"""`train.system.checkpoint.hf_model`: start training from a Hugging Face folder directly.

On the launching machine, once per run (not per rank):

* `merge` (at plan time, dry runs too) takes the model architecture from the folder's config.json (the same
  `train.model` settings `flagscale checkpoint import` writes to flagscale_model.yaml) and the tokenizer from
  the folder (`data.tokenizer: {type: hf, path: FOLDER}`). Training settings (seq_length, batch sizes,
  train_iters, optimizer, lora, dropout, make_vocab_size_divisible_by) stay the YAML's; an architecture key the
  YAML also sets must agree with config.json, else one line names the disagreement.
* `prepare` (at `action=run`) imports the folder with flagscale.checkpoint.bridge.import_checkpoint at the
  run's TP/PP/EP layout into the flagscale cache (`hf-imports/<key>/checkpoint`, the key hashing the folder's
  content and the layout; flagscale.upstream.cache builds it under a file lock in a temporary folder and
  renames it when complete), reused on every rerun, and points `checkpoint.load` at it with finetune semantics:
  model weights only, iteration 0, a fresh optimizer; once `save` holds a checkpoint of the run, it resumes that.

Multi-node runs read the import from the cache path on every node: put `FLAGSCALE_CACHE_DIR` on a shared
filesystem there, as the data. Only the standard library loads here (the import runs under torchrun).
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from flagscale.errors import ConfigError

KIND = "hf-imports"
SUBDIR = "checkpoint"
KEY = "train.system.checkpoint.hf_model"


def _folder(raw_train: dict[str, Any]) -> Path | None:
    path = ((raw_train.get("system") or {}).get("checkpoint") or {}).get("hf_model")
    return Path(str(path)).expanduser().resolve() if path else None


def _same(ours: Any, theirs: Any) -> bool:
    if isinstance(theirs, float) and isinstance(ours, (int, float)) and not isinstance(ours, bool):
        return abs(float(ours) - theirs) <= 1e-12 * max(1.0, abs(theirs))
    return ours == theirs


def _overlay(ours: dict[str, Any], theirs: dict[str, Any], prefix: str = "") -> tuple[dict[str, Any], list[str]]:
    """config.json's settings over the YAML's: (merged, the keys where both are set and disagree). Nested
    settings (moe, mla) keep the YAML's keys config.json does not set (e.g. moe.token_dispatcher)."""
    merged, differ = dict(ours), []
    for key, value in theirs.items():
        if isinstance(value, dict) and isinstance(ours.get(key), dict):
            merged[key], inner = _overlay(ours[key], value, f"{prefix}{key}.")
            differ += inner
            continue
        if key in ours and ours[key] is not None and not _same(ours[key], value):
            differ.append(f"{prefix}{key}={ours[key]} (config.json: {value})")
        merged[key] = value
    return merged, differ


def architecture(folder: Path) -> dict[str, Any]:
    """The `train.model` architecture settings of an HF folder's config.json (a clear error when unsupported)."""
    from flagscale.checkpoint import hf

    config = hf.read_config(folder)
    where = f"{KEY}: {folder / hf.CONFIG}"
    return hf.model_settings(config, hf.family_of(config, where), where)


def merge(raw_train: dict[str, Any], where: str = "train") -> dict[str, Any]:
    """The plain `train` config with hf_model's architecture and tokenizer filled in (unchanged without it)."""
    folder = _folder(raw_train)
    if folder is None:
        return raw_train
    model, differ = _overlay(dict(raw_train.get("model") or {}), architecture(folder))
    if differ:
        raise ConfigError(
            f"{where}.model: {', '.join(differ)} disagree with {folder}/config.json: remove them from the YAML "
            f"({KEY} takes the model's architecture from config.json)"
        )
    data = dict(raw_train.get("data") or {})
    tokenizer = dict(data.get("tokenizer") or {})
    if tokenizer.get("type", "hf") != "hf":
        raise ConfigError(
            f"{where}.data.tokenizer.type={tokenizer['type']}: {KEY} trains with the folder's own tokenizer; "
            "remove data.tokenizer (or set type: hf)"
        )
    tokenizer = {"type": "hf", "path": tokenizer.get("path") or str(folder)}
    data["tokenizer"] = tokenizer
    system = dict(raw_train.get("system") or {})
    system["checkpoint"] = {**(system.get("checkpoint") or {}), "hf_model": str(folder)}
    return {**raw_train, "model": model, "data": data, "system": system}


def layout_of(train) -> dict[str, int]:
    s = train.system
    return {
        "tp": s.tensor_model_parallel_size,
        "pp": s.pipeline_model_parallel_size,
        "ep": s.expert_model_parallel_size,
        "make_vocab_size_divisible_by": train.model.make_vocab_size_divisible_by,
    }


def key_of(folder: Path, layout: dict[str, int]) -> str:
    from flagscale.checkpoint.fingerprint import content_hash

    blob = json.dumps({"content": content_hash(folder), **layout}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def import_path(train) -> Path | None:
    """Where the import of the run's hf_model at its layout is (or will be), None without hf_model."""
    from flagscale.upstream.cache import Cache

    hf_model = train.system.checkpoint.hf_model
    if not hf_model:
        return None
    return Cache().path(KIND, key_of(Path(hf_model), layout_of(train))) / SUBDIR


def prepare(train, say=None):
    """`train` starting from the import of its hf_model (imported now unless cached); unchanged without it."""
    from flagscale.checkpoint.bridge import import_checkpoint
    from flagscale.upstream.cache import Cache

    hf_model = train.system.checkpoint.hf_model
    if not hf_model:
        return train
    say = say or (lambda message: print(message, file=sys.stderr, flush=True))
    folder, layout = Path(hf_model), layout_of(train)
    cache = Cache()
    key = key_of(folder, layout)
    where = f"TP={layout['tp']} PP={layout['pp']}" + (f" EP={layout['ep']}" if layout["ep"] > 1 else "")
    if cache.path(KIND, key).exists():
        say(f"starting from {folder}: using its cached import at {where}, {cache.path(KIND, key) / SUBDIR}")
    else:
        say(f"starting from {folder}: importing it at {where} into the flagscale cache (once per content and layout)")
    start = time.perf_counter()

    def build(tmp: Path) -> None:
        import_checkpoint(
            folder,
            tmp / SUBDIR,
            tp=layout["tp"],
            pp=layout["pp"],
            ep=layout["ep"],
            make_vocab_size_divisible_by=layout["make_vocab_size_divisible_by"],
        )

    entry, hit = cache.get_or_create(KIND, key, build)
    if not hit:
        say(f"imported {folder} in {time.perf_counter() - start:.1f} s: {entry / SUBDIR}")
    # the driver gets a plain finetune from `load` (the folder's part is done: architecture, tokenizer, import)
    ckpt = replace(train.system.checkpoint, load=str(entry / SUBDIR), finetune=True, hf_model=None)
    return replace(train, system=replace(train.system, checkpoint=ckpt))
