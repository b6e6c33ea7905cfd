#!/usr/bin/env python3
"""Make a tiny random Llama checkpoint + SentencePiece tokenizer, fully offline (no hub access).

    tools/make_tiny_model.py OUT_DIR [--vocab 512] [--hidden 64] [--layers 2] [--seed 0]

OUT_DIR gets what `LlamaForCausalLM.from_pretrained` and the pinned `convert_hf_to_gguf.py` read:
config.json, model.safetensors, tokenizer.model, tokenizer_config.json (with a chat template, so
llama-server's /v1/chat/completions formats messages the same way everywhere). The weights are random:
the output is gibberish, which is all tests, examples and benchmarks need. Same arguments, same files.

Needs torch, transformers and sentencepiece (the `models` extra).
"""

from __future__ import annotations

import argparse
import io
import json
import random
import sys
from pathlib import Path

# A ChatML-style template: short, and understood by llama.cpp's template detection.
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SYLLABLES = [
    "ka",
    "lo",
    "mi",
    "ne",
    "ru",
    "sa",
    "ti",
    "vo",
    "ze",
    "po",
    "an",
    "el",
    "is",
    "on",
    "ur",
    "be",
    "da",
    "fi",
    "go",
    "hu",
]


def corpus(seed: int, lines: int = 4000) -> list[str]:
    """Deterministic made-up text: enough distinct pieces for a 512-token vocabulary."""
    rng = random.Random(seed)
    words = ["".join(rng.choice(SYLLABLES) for _ in range(rng.randint(1, 4))) for _ in range(600)]
    words += ["the", "a", "of", "and", "to", "in", "hello", "world", "model", "tiny", "test", "once", "upon", "time"]
    return [" ".join(rng.choice(words) for _ in range(rng.randint(4, 16))).capitalize() + "." for _ in range(lines)]


def train_tokenizer(out: Path, vocab: int, seed: int) -> None:
    import sentencepiece as spm

    model = io.BytesIO()
    # an iterator and a writer, not file paths: the trainer would record those paths in tokenizer.model
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus(seed)),
        model_writer=model,
        vocab_size=vocab,
        model_type="bpe",
        character_coverage=1.0,
        byte_fallback=True,  # any input text tokenizes, as with real Llama tokenizers
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        user_defined_symbols=["<|im_start|>", "<|im_end|>"],
        num_threads=1,
        minloglevel=2,
    )
    (out / "tokenizer.model").write_bytes(model.getvalue())
    config = {
        "tokenizer_class": "LlamaTokenizer",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "add_bos_token": True,
        "add_eos_token": False,
        "model_max_length": 512,
        "legacy": False,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}, indent=2) + "\n"
    )


def save_model(out: Path, vocab: int, hidden: int, layers: int, seed: int) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=2,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        torch_dtype="float32",
    )
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(out, safe_serialization=True)
    model.generation_config.save_pretrained(out)


def make(out: Path, vocab: int = 512, hidden: int = 64, layers: int = 2, seed: int = 0) -> Path:
    if hidden % 4:
        raise SystemExit(f"--hidden {hidden}: must be a multiple of 4 (4 attention heads)")
    out.mkdir(parents=True, exist_ok=True)
    train_tokenizer(out, vocab, seed)
    save_model(out, vocab, hidden, layers, seed)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="folder to write the checkpoint to")
    parser.add_argument("--vocab", type=int, default=512)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        make(args.out, args.vocab, args.hidden, args.layers, args.seed)
    except ImportError as exc:
        print(
            f"error: {exc.name} is missing: pip install 'flagscale[models]' (torch, transformers, sentencepiece)",
            file=sys.stderr,
        )
        return 2
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
