"""Supervised fine-tuning data (`train.data.format=sft`): chat records from JSONL, loss on assistant tokens only.

A record is one JSON object per line: `{"messages": [{"role": "system"|"user"|"assistant"|..., "content": str},
...]}` with at least one assistant turn. `check_file` reads the file before anything is launched (the launcher
calls it) and refuses bad input with one line naming `file:line`.

Tokens come from the model's own HF tokenizer and its chat template (`apply_chat_template`, offline, from the
model folder in `train.data.tokenizer.path`). The assistant mask:
* a template with `{% generation %}` markers: transformers' own `return_assistant_tokens_mask`;
* otherwise by prefixes: assistant turn k covers the tokens between the conversation up to turn k rendered with
  the generation prompt (the assistant header is not trained) and the conversation up to and including turn k
  (its content and end-of-turn tokens are). Both renderings must tokenize to prefixes of the whole
  conversation's tokens, which is checked; a template where they do not fails with one line (add generation
  markers to it). An assistant turn that opens the conversation is trained header and all.

Sequences of seq_length + 1 tokens become tokens/labels shifted by one; `loss_mask[i]` is 1 when label i is an
assistant token of the same record as token i.
* packed: records end to end, greedily, a record that does not fit starting the next sequence (one longer than a
  sequence is cut); the rest is padding (loss 0). Each record attends only to itself: the attention mask is
  block-diagonal causal, which megatron.core's local (unfused) attention applies as given, and position ids
  restart at every record (learned absolute positions; RoPE, the families' embedding, is relative, so a record
  computes the same wherever it sits).
* padded: one record per sequence (cut to fit), padded with the pad token (else end-of-sequence), causal mask.

Every rank builds the same sequences (small files: no cache). Sample i of the run is sequence
`order[i % n]`, the order shuffled per epoch with the run's seed: the same samples whatever the layout, so
data.Batches serves them as it does the pre-training ones.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from flagscale.errors import ConfigError

log = logging.getLogger("flagscale.train")


def validate(t: Any, where: str) -> None:
    """The SFT settings (no file access: the launcher checks the file)."""
    if not t.data.sft.path:
        raise ConfigError(
            f"{where}.data.sft.path is not set: point it at a JSONL file of "
            '{"messages": [{"role": ..., "content": ...}, ...]} records'
        )
    if t.data.tokenizer.type != "hf":
        raise ConfigError(
            f"{where}.data.tokenizer.type={t.data.tokenizer.type}: SFT needs the model's HF tokenizer and its chat "
            "template (type hf, path: the model folder)"
        )


def check_record(value: Any) -> str | None:
    """What is wrong with one parsed record, or None."""
    if not isinstance(value, dict) or "messages" not in value:
        return 'not a record with "messages"'
    messages = value["messages"]
    if not isinstance(messages, list) or not messages:
        return '"messages" is not a non-empty list'
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            return f'message {i} is not {{"role": str, "content": str}}'
    if not any(m["role"] == "assistant" for m in messages):
        return "no assistant turn: nothing to train on"
    return None


def read_records(path: str | Path) -> list[list[dict[str, str]]]:
    """Every record's messages; the first bad line fails with `file:line: what`."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"train.data.sft.path: {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"train.data.sft.path: {path}: not UTF-8 text") from None
    records = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}:{number}: not JSON ({exc.msg})") from None
        problem = check_record(value)
        if problem:
            raise ConfigError(f"{path}:{number}: {problem}")
        records.append(value["messages"])
    if not records:
        raise ConfigError(f"{path}: no records (expected one JSON object per line)")
    return records


def check_file(path: str | Path) -> int:
    """The launcher's check before anything is written: how many records the file holds."""
    return len(read_records(path))


# ------------------------------------------------------------------------------------ tokenizing
def has_generation_markers(template: str | None) -> bool:
    return template is not None and "{% generation %}" in template.replace("{%-", "{%").replace("-%}", "%}")


def _render(tok, messages, generation_prompt: bool = False) -> list[int]:
    return list(tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=generation_prompt))


def encode(tok, messages: list[dict[str, str]], where: str = "record") -> tuple[list[int], list[int]]:
    """A conversation's token ids and its assistant mask (1: an assistant token) with tokenizer `tok`'s
    chat template."""
    if not getattr(tok, "chat_template", None):
        raise ConfigError(f"the tokenizer {tok.name_or_path} has no chat template: SFT formats records with it")
    if has_generation_markers(tok.chat_template):
        out = tok.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        return list(out["input_ids"]), [int(x) for x in out["assistant_masks"]]
    ids = _render(tok, messages)
    mask = [0] * len(ids)
    for k, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = len(_prefix(tok, messages[:k], ids, True, where)) if k else 0
        end = len(_prefix(tok, messages[: k + 1], ids, False, where))
        mask[start:end] = [1] * (end - start)
    return ids, mask


def _prefix(tok, messages, ids: list[int], generation_prompt: bool, where: str) -> list[int]:
    part = _render(tok, messages, generation_prompt)
    if ids[: len(part)] != part:
        raise ConfigError(
            f"{where}: the chat template of {tok.name_or_path} does not render the first {len(messages)} messages "
            "as a prefix of the conversation's tokens; add {% generation %} markers to it to mark assistant text"
        )
    return part


# ------------------------------------------------------------------------------------ sequences
def pack(records: list[tuple[list[int], list[int]]], length: int, pad: int) -> list[dict[str, Any]]:
    """Records end to end in sequences of `length` + 1 tokens (see the module's doc): each sequence as ids,
    assistant mask and record number per token (-1: padding)."""
    sequences: list[dict[str, Any]] = []
    ids: list[int] = []
    mask: list[int] = []
    docs: list[int] = []

    def flush() -> None:
        if ids:
            sequences.append(_padded(ids, mask, docs, length + 1, pad))
            ids.clear()
            mask.clear()
            docs.clear()

    for number, (rec_ids, rec_mask) in enumerate(records):
        rec_ids, rec_mask = rec_ids[: length + 1], rec_mask[: length + 1]
        if len(ids) + len(rec_ids) > length + 1:
            flush()
        ids.extend(rec_ids)
        mask.extend(rec_mask)
        docs.extend([number] * len(rec_ids))
    flush()
    return sequences


def pad_each(records: list[tuple[list[int], list[int]]], length: int, pad: int) -> list[dict[str, Any]]:
    """One record per sequence of `length` + 1 tokens, cut to fit and padded."""
    return [
        _padded(ids[: length + 1], mask[: length + 1], [n] * min(len(ids), length + 1), length + 1, pad)
        for n, (ids, mask) in enumerate(records)
    ]


def _padded(ids: list[int], mask: list[int], docs: list[int], size: int, pad: int) -> dict[str, Any]:
    extra = size - len(ids)
    return {"ids": ids + [pad] * extra, "mask": mask + [0] * extra, "docs": docs + [-1] * extra}


def sample(seq: dict[str, Any], packed: bool) -> dict[str, Any]:
    """The training sample of a sequence: what data.Batches stacks (numpy arrays)."""
    import numpy as np

    ids, mask, docs = np.array(seq["ids"]), np.array(seq["mask"]), np.array(seq["docs"])
    tokens, labels = ids[:-1], ids[1:]
    same = docs[:-1] == docs[1:]
    loss_mask = (mask[1:].astype(bool) & same & (docs[1:] >= 0)).astype(np.float32)
    n = len(tokens)
    causal = np.tril(np.ones((n, n), dtype=bool))
    if packed:  # block-diagonal: a token sees the earlier tokens of its own record only
        d = docs[:-1]
        allowed = causal & (d[:, None] == d[None, :])
        starts = np.r_[0, np.flatnonzero(d[1:] != d[:-1]) + 1]
        position_ids = np.arange(n) - np.repeat(starts, np.diff(np.r_[starts, n]))
    else:
        allowed, position_ids = causal, np.arange(n)
    return {
        "tokens": tokens.astype(np.int64),
        "labels": labels.astype(np.int64),
        "loss_mask": loss_mask,
        "attention_mask": ~allowed[None],  # megatron: True = masked out; [1, s, s]
        "position_ids": position_ids.astype(np.int64),
    }


class SFTDataset:
    """`samples` samples drawn epoch by epoch from the sequences, each epoch in a seeded random order."""

    def __init__(self, sequences: list[dict[str, Any]], samples: int, seed: int, packed: bool) -> None:
        import numpy as np

        self.sequences, self.packed = sequences, packed
        n = len(sequences)
        rng = np.random.default_rng(seed)
        epochs = -(-samples // n)
        self.order = np.concatenate([rng.permutation(n) for _ in range(epochs)])[:samples]

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return sample(self.sequences[int(self.order[i])], self.packed)


def build_dataset(settings, tokenizer) -> SFTDataset:
    """The run's SFT samples from `train.data.sft` with the run's HF tokenizer."""
    s, m = settings.data.sft, settings.model
    tok = tokenizer.hf
    records = [encode(tok, msgs, f"{s.path} record {i + 1}") for i, msgs in enumerate(read_records(s.path))]
    pad = tok.pad_token_id if tok.pad_token_id is not None else tokenizer.eod
    packed = s.packing == "packed"
    sequences = (pack if packed else pad_each)(records, m.seq_length, pad)
    cut = sum(len(ids) > m.seq_length + 1 for ids, _ in records)
    trained = sum(sum(mask[: m.seq_length + 1]) for _, mask in records)
    log.info(
        f"sft: {len(records)} records of {s.path} -> {len(sequences)} {s.packing} sequences of {m.seq_length} "
        f"tokens, {trained} assistant tokens" + (f", {cut} record(s) cut to the sequence length" if cut else "")
    )
    return SFTDataset(sequences, m.train_iters * m.global_batch_size, settings.system.seed, packed)
