"""Offline tokenizers for `flagscale train` and tools/preprocess_data.py.

* `byte`: UTF-8 bytes (ids 0-255) plus one end-of-document id (256). Needs nothing, works anywhere:
  what the tiny example and the tests use.
* `hf`: a tokenizer folder on disk loaded with transformers (`local_files_only`: never a download).

Both expose what Megatron's GPTDataset reads: `vocab_size`, `eod` and `unique_identifiers`.
"""

from __future__ import annotations

from flagscale.errors import ConfigError


class ByteTokenizer:
    vocab_size = 257
    eod = 256
    unique_identifiers = {"class": "ByteTokenizer"}  # Megatron's dataset cache key includes it

    def tokenize(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def detokenize(self, ids) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    def __init__(self, path: str) -> None:
        try:
            from transformers import AutoTokenizer
        except ImportError:
            raise ConfigError("tokenizer type hf needs the transformers package (pip install transformers)") from None
        try:
            self._tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"tokenizer {path}: {str(exc).splitlines()[0]}") from None
        eod = self._tok.eos_token_id
        if eod is None:
            raise ConfigError(f"tokenizer {path} has no end-of-sequence token to separate documents")
        self.eod = int(eod)
        self.vocab_size = len(self._tok)
        self.unique_identifiers = {"class": "HFTokenizer", "path": path, "vocab_size": self.vocab_size}

    @property
    def hf(self):
        """The transformers tokenizer (its chat template formats SFT records)."""
        return self._tok

    def tokenize(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False)

    def detokenize(self, ids) -> str:
        return self._tok.decode(list(ids))


def build_tokenizer(kind: str, path: str | None = None):
    if kind == "byte":
        return ByteTokenizer()
    if kind == "hf":
        if not path:
            raise ConfigError("tokenizer type hf needs a tokenizer folder (path)")
        return HFTokenizer(path)
    raise ConfigError(f"tokenizer type {kind!r}: use byte or hf")


def padded_vocab_size(vocab_size: int, divisible_by: int, tensor_parallel: int) -> int:
    """As Megatron-LM: round up so every tensor-parallel shard of the embedding has the same size."""
    multiple = divisible_by * tensor_parallel
    return -(-vocab_size // multiple) * multiple
