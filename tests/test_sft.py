"""Supervised fine-tuning (`train.data.format=sft`, flagscale/train/sft.py) on chat-format JSONL.

Fast (the test process): the settings; the assistant mask from the chat template of a real offline tokenizer (the
SentencePiece one tools/make_tiny_model.py trains, with its ChatML template) by prefixes and by `{% generation %}`
markers; packing (block-diagonal attention, positions restarting per record, no loss across a record boundary)
and padding; bad records refused by `flagscale train` with one `file:line` line before anything is written.

Integration (megatron.core under torchrun, tests/megatron_env.py's venv): a tiny random llama with that tokenizer,
imported with `flagscale checkpoint import` (fp32), fine-tuned on chat records, packed: the loss falls.
"""

from __future__ import annotations

import json
import random
import re
import sys
from pathlib import Path

import pytest
from conftest import REPO_ROOT, flagscale_cli

from flagscale.errors import ConfigError
from flagscale.train import sft
from flagscale.train.settings import train_settings

CONF = REPO_ROOT / "examples" / "tiny_gpt" / "conf"
WORDS = "ka lo mi ne ru sa ti vo ze po hello world model tiny test once upon time".split()


def chat_records(n: int, seed: int = 0) -> list[dict]:
    """Learnable conversations: the answer is the question's words reversed; every third has a system prompt and
    a second exchange (two assistant turns)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        question = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 6)))
        answer = " ".join(reversed(question.split()))
        messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        if i % 3 == 0:
            messages = [
                {"role": "system", "content": "Reverse the words."},
                *messages,
                {"role": "user", "content": "again"},
                {"role": "assistant", "content": answer},
            ]
        out.append({"messages": messages})
    return out


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    pytest.importorskip("sentencepiece")
    sys.path.insert(0, str(REPO_ROOT / "tools"))
    import make_tiny_model

    folder = tmp_path_factory.mktemp("tok")
    make_tiny_model.train_tokenizer(folder, 512, 0)
    return folder


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)


# ------------------------------------------------------------------------------------------- settings
def _settings(**data):
    return train_settings({"data": {"format": "sft", "tokenizer": {"type": "hf", "path": "/m"}, **data}})


def test_sft_settings_parse_and_need_a_file_and_the_hf_tokenizer():
    t = _settings(sft={"path": "chat.jsonl", "packing": "padded"})
    assert (t.data.format, t.data.sft.path, t.data.sft.packing, t.data.data_path) == ("sft", "chat.jsonl", "padded", "")
    assert _settings(sft={"path": "c.jsonl"}).data.sft.packing == "packed"
    with pytest.raises(ConfigError, match=r"train.data.sft.path is not set"):
        _settings()
    with pytest.raises(ConfigError, match=r"train.data.sft.packing=tight: use one of packed, padded"):
        _settings(sft={"path": "c.jsonl", "packing": "tight"})
    with pytest.raises(ConfigError, match=r"tokenizer.type=byte: SFT needs the model's HF tokenizer"):
        train_settings({"data": {"format": "sft", "sft": {"path": "c.jsonl"}}})


# ------------------------------------------------------------------------------------- assistant mask
def assistant_text(tok, ids, mask) -> str:
    return tok.decode([i for i, m in zip(ids, mask, strict=True) if m])


def test_the_mask_covers_assistant_turns_only(tok):
    """By prefixes: each assistant turn's content and its end-of-turn, not its header, nor any other turn."""
    messages = chat_records(1)[0]["messages"]  # system, user, assistant, user, assistant
    ids, mask = sft.encode(tok, messages)
    assert ids == tok.apply_chat_template(messages, tokenize=True)
    answer = messages[2]["content"]
    assert assistant_text(tok, ids, mask) == f"{answer}<|im_end|>\n{answer}<|im_end|>\n"
    header = tok.apply_chat_template(messages[:2], tokenize=True, add_generation_prompt=True)
    assert mask[: len(header)] == [0] * len(header) and mask[len(header)] == 1
    assert sum(mask) < len(ids) / 2


def test_generation_markers_are_used_when_the_template_has_them(tok):
    """A template with {% generation %} markers: transformers' own assistant mask, the same tokens here."""
    marked = (
        "{% for message in messages %}{% if message['role'] == 'assistant' %}"
        "{{ '<|im_start|>assistant\n' }}{% generation %}{{ message['content'] + '<|im_end|>\n' }}{% endgeneration %}"
        "{% else %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}{% endif %}"
        "{% endfor %}"
    )
    assert sft.has_generation_markers(marked) and not sft.has_generation_markers(tok.chat_template)
    messages = chat_records(1)[0]["messages"]
    plain = sft.encode(tok, messages)
    original = tok.chat_template
    try:
        tok.chat_template = marked
        assert sft.encode(tok, messages) == plain
    finally:
        tok.chat_template = original


def test_a_template_that_is_not_prefix_stable_is_refused(tok):
    original = tok.chat_template
    try:  # the number of messages rendered up front: every prefix renders differently
        tok.chat_template = "{{ messages | length }}" + original
        with pytest.raises(ConfigError, match="does not render the first 1 messages as a prefix.*generation"):
            sft.encode(tok, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}], "c:1")
    finally:
        tok.chat_template = original


# ------------------------------------------------------------------------------------ packing, padding
def test_packed_records_attend_only_to_themselves_and_never_learn_across_a_boundary():
    records = [([10, 11, 12, 13], [0, 0, 1, 1]), ([20, 21, 22], [0, 1, 1]), ([30, 31, 32, 33, 34], [0, 0, 0, 1, 1])]
    seqs = sft.pack(records, 8, pad=0)  # 9 tokens a sequence: records 0+1 (7), then record 2 (5) + padding
    assert [s["ids"] for s in seqs] == [[10, 11, 12, 13, 20, 21, 22, 0, 0], [30, 31, 32, 33, 34, 0, 0, 0, 0]]
    s = sft.sample(seqs[0], packed=True)
    assert s["tokens"].tolist() == [10, 11, 12, 13, 20, 21, 22, 0]
    assert s["labels"].tolist() == [11, 12, 13, 20, 21, 22, 0, 0]
    # label 13 (record 0's assistant) and 21, 22 (record 1's) are trained; 20 (a new record) and padding are not
    assert s["loss_mask"].tolist() == [0, 1, 1, 0, 1, 1, 0, 0]
    assert s["position_ids"].tolist() == [0, 1, 2, 3, 0, 1, 2, 0]
    allowed = ~s["attention_mask"][0]
    assert allowed[5].tolist() == [False] * 4 + [True, True] + [False] * 2  # record 1 sees itself only, causally
    assert allowed[3].tolist() == [True] * 4 + [False] * 4
    assert s["attention_mask"].shape == (1, 8, 8)


def test_padded_records_are_one_per_sequence_cut_to_fit():
    records = [([10, 11, 12, 13], [0, 0, 1, 1]), (list(range(100, 112)), [0] * 6 + [1] * 6)]
    seqs = sft.pad_each(records, 8, pad=2)
    assert seqs[0]["ids"] == [10, 11, 12, 13, 2, 2, 2, 2, 2] and len(seqs[1]["ids"]) == 9
    s = sft.sample(seqs[0], packed=False)
    assert s["loss_mask"].tolist() == [0, 1, 1, 0, 0, 0, 0, 0]
    assert s["position_ids"].tolist() == list(range(8))
    assert (~s["attention_mask"][0]).tolist() == [[j <= i for j in range(8)] for i in range(8)]
    assert sft.sample(seqs[1], packed=False)["loss_mask"].tolist() == [0] * 5 + [1] * 3


def test_the_dataset_cycles_epochs_in_a_seeded_order():
    seqs = sft.pad_each([([i, i + 1], [0, 1]) for i in range(5)], 4, pad=0)
    data = sft.SFTDataset(seqs, 12, seed=3, packed=False)
    firsts = [int(data[i]["tokens"][0]) for i in range(12)]
    assert sorted(firsts[:5]) == list(range(5)) and sorted(firsts[5:10]) == list(range(5))
    assert firsts == [int(sft.SFTDataset(seqs, 12, seed=3, packed=False)[i]["tokens"][0]) for i in range(12)]


# ------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize(
    "line, message",
    [
        ('{"messages": [{"role": "user", "content": "hi"}]}', "no assistant turn: nothing to train on"),
        ('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant"', r"not JSON \(Expecting"),
        ('{"text": "hello"}', 'not a record with "messages"'),
        ('{"messages": []}', '"messages" is not a non-empty list'),
        ('{"messages": [{"role": "assistant", "content": 3}]}', 'message 0 is not {"role": str, "content": str}'),
    ],
)
def test_a_bad_record_fails_before_anything_is_written(tmp_path, tokenizer_dir, line, message):
    """`flagscale train` names file:line in one line, and neither the experiment folder nor anything else
    appears (the file is checked before the launch)."""
    good = [json.dumps(r) for r in chat_records(3)]
    data = write_jsonl(tmp_path / "chat.jsonl", [*good, "", line, *good])
    exp_dir = tmp_path / "exp"
    result = flagscale_cli(
        "train",
        str(CONF),
        f"experiment.exp_dir={exp_dir}",
        "++train.data.format=sft",
        f"++train.data.sft.path={data}",
        "train.data.tokenizer.type=hf",
        f"++train.data.tokenizer.path={tokenizer_dir}",
        cwd=tmp_path,
    )
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {data}:5: "), result.stderr
    assert re.search(message, lines[0]), lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chat.jsonl"]


def test_an_empty_or_missing_file_is_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"empty.jsonl: no records"):
        sft.check_file(write_jsonl(tmp_path / "empty.jsonl", ["", "  "]))
    with pytest.raises(ConfigError, match=r"train.data.sft.path: .*missing.jsonl: No such file"):
        sft.check_file(tmp_path / "missing.jsonl")
    assert sft.check_file(write_jsonl(tmp_path / "ok.jsonl", chat_records(4))) == 4


# ---------------------------------------------------------------------------------------- integration
@pytest.fixture(scope="module")
def venv(tmp_path_factory):
    from megatron_env import megatron_env

    return megatron_env(tmp_path_factory)


def tiny_llama(venv) -> tuple[Path, Path]:
    """tools/make_tiny_model.py's llama (4 layers) and its `flagscale checkpoint import` at TP=1 (fp32), made once
    per session in the venv's work folder (tests/test_lora.py shares them)."""
    model, ckpt = venv.work / "sft-llama", venv.work / "sft-llama-tp1"
    if not (ckpt / "latest_checkpointed_iteration.txt").is_file():
        made = venv.run([venv.python, REPO_ROOT / "tools/make_tiny_model.py", model, "--layers", "4"])
        assert made.returncode == 0, made.stderr[-3000:]
        imported = venv.run([venv.flagscale, "checkpoint", "import", model, ckpt], label="import tiny llama")
        assert imported.returncode == 0, imported.stdout[-3000:] + imported.stderr[-3000:]
    return model, ckpt


def finetune(venv, exp: Path, data: Path, *extra: str, config: str = "train", iters: int = 12):
    """`flagscale train` of the imported tiny llama on chat records (finetune from the import)."""
    model, ckpt = tiny_llama(venv)
    settings = [line.split(": ", 1) for line in (ckpt / "flagscale_model.yaml").read_text().splitlines()]
    return venv.run(
        [
            venv.flagscale,
            "train",
            CONF,
            "--config-name",
            config,
            "--foreground",
            f"experiment.exp_dir={exp}",
            f"++train.system.checkpoint.load={ckpt}",
            "++train.system.checkpoint.finetune=true",
            "++train.data.format=sft",
            f"++train.data.sft.path={data}",
            "train.data.tokenizer.type=hf",
            f"++train.data.tokenizer.path={model}",
            f"train.model.train_iters={iters}",
            "train.model.seq_length=128",
            *(f"++train.model.{k}={v.strip(chr(34))}" for k, v in settings if not k.startswith("#")),
            *extra,
        ],
        label=f"train {exp.name}",
    )


def losses(exp: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (exp / "logs" / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.integration
def test_sft_packed_loss_falls(venv):
    data = write_jsonl(venv.work / "chat.jsonl", chat_records(64))
    exp = venv.work / "sft-packed"
    result = finetune(venv, exp, data, "++train.data.sft.packing=packed")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "sft: 64 records of" in result.stdout and "packed sequences of 128 tokens" in result.stdout
    curve = losses(exp)
    print(f"\nSFT (packed, full fine-tune, TP=1): loss {curve[0]:.3f} -> {curve[-1]:.3f}; {venv.timings}")
    assert len(curve) == 12 and curve[-1] < 0.8 * curve[0]
