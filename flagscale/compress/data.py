"""Calibration and held-out text: documents from a JSONL or the pre-training data, packed into token sequences.

The pre-training data is Megatron's indexed dataset (PREFIX.bin/.idx, tools/preprocess_data.py): token ids of
the tokenizer that made it (`byte` or an `hf` folder, flagscale.train.tokenizer), which need not be the model's.
So each document is decoded with that tokenizer and encoded again with the model's: any model calibrates on any
corpus. The .idx is read with numpy as Megatron's MMapIndexedDataset lays it out (megatron need not be installed).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from flagscale.compress.settings import Data
from flagscale.errors import ConfigError

# Megatron's indexed dataset: DType codes (megatron/core/datasets/indexed_dataset.py)
_DTYPES = {1: "uint8", 2: "int8", 3: "int16", 4: "int32", 5: "int64", 6: "float64", 7: "float32", 8: "uint16"}


def jsonl_documents(path: str, key: str) -> Iterator[str]:
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                text = json.loads(line).get(key)
                if isinstance(text, str) and text.strip():
                    yield text


def indexed_documents(prefix: str) -> Iterator[list[int]]:
    """The token ids of each document of PREFIX.bin/.idx."""
    import numpy

    index = Path(f"{prefix}.idx").read_bytes()
    code = index[17]
    sequences, documents = struct.unpack("<QQ", index[18:34])
    offset = 34
    lengths = numpy.frombuffer(index, numpy.int32, sequences, offset)
    offset += lengths.nbytes
    pointers = numpy.frombuffer(index, numpy.int64, sequences, offset)
    offset += pointers.nbytes
    doc_index = numpy.frombuffer(index, numpy.int64, documents, offset)
    dtype = numpy.dtype(_DTYPES[code])
    tokens = numpy.memmap(f"{prefix}.bin", dtype=dtype, mode="r")
    for start, end in zip(doc_index[:-1], doc_index[1:], strict=True):
        ids: list[int] = []
        for seq in range(int(start), int(end)):
            first = int(pointers[seq]) // dtype.itemsize
            ids.extend(int(i) for i in tokens[first : first + int(lengths[seq])])
        yield ids


def documents(data: Data) -> Iterator[str]:
    """The source's documents as text."""
    if data.jsonl:
        yield from jsonl_documents(data.jsonl, data.text_key)
        return
    if not data.data_path:
        return
    from flagscale.train.tokenizer import build_tokenizer

    made_by = build_tokenizer(data.tokenizer, data.tokenizer_path)
    eod = getattr(made_by, "eod", None)
    for ids in indexed_documents(data.data_path):
        text = made_by.detokenize([i for i in ids if i != eod])
        if text.strip():
            yield text


@dataclass(frozen=True)
class Packed:
    samples: list[list[int]]  # num_samples sequences of seq_len token ids (the last may be shorter)
    texts: list[str]  # the documents they came from
    used: int  # documents read, so a held-out set starts after them


def pack(tokenizer, docs: Iterator[str], num_samples: int, seq_len: int, skip: int = 0) -> Packed:
    """Consecutive documents (after `skip`), each BOS + its tokens, cut into sequences of `seq_len` tokens."""
    want = num_samples * seq_len
    stream: list[int] = []
    texts: list[str] = []
    used = 0
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    for number, text in enumerate(docs):
        if number < skip:
            continue
        used = number + 1
        texts.append(text)
        stream.extend(bos + tokenizer(text, add_special_tokens=False)["input_ids"])
        if len(stream) >= want:
            break
    samples = [stream[i : i + seq_len] for i in range(0, min(len(stream), want), seq_len)]
    samples = [s for s in samples if len(s) >= 2]  # a one-token tail predicts nothing
    return Packed(samples, texts, used)


def calibration_and_held_out(tokenizer, calibration: Data | None, evaluation: Data, held_out: bool):
    """(calibration Packed or None, evaluation Packed): the held-out set starts after calibration's documents."""
    calib = None
    if calibration is not None:
        calib = pack(tokenizer, documents(calibration), calibration.num_samples, calibration.seq_len)
        if not calib.samples:
            raise ConfigError(f"compress.calibration: the set is empty ({calibration.source} gave no tokens)")
    skip = calib.used if (held_out and calib is not None) else 0
    held = pack(tokenizer, documents(evaluation), evaluation.num_samples, evaluation.seq_len, skip=skip)
    if not held.samples:
        where = f"the documents after the {skip} calibration used" if skip else "it"
        raise ConfigError(f"compress.evaluation: the held-out set is empty ({evaluation.source}: {where} gave none)")
    return calib, held
