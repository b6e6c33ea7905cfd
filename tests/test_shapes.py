"""Parameters per rank from the shapes (flagscale.train.shapes): the published sizes of real models, and exactly
what megatron.core builds on every rank of TP/PP layouts (integration: the patched wheel, real torchrun)."""

from __future__ import annotations

import json

import pytest
from conftest import REPO_ROOT

from flagscale.train.settings import train_settings
from flagscale.train.shapes import layer_parameters, stage_parameters, total_parameters

LLAMA3_8B = {
    "family": "llama",
    "num_layers": 32,
    "hidden_size": 4096,
    "num_attention_heads": 32,
    "num_query_groups": 8,
    "ffn_hidden_size": 14336,
    "make_vocab_size_divisible_by": 128,
}
LLAMA3_70B = {**LLAMA3_8B, "num_layers": 80, "hidden_size": 8192, "num_attention_heads": 64, "ffn_hidden_size": 28672}
QWEN3_8B = {
    "family": "qwen3",
    "num_layers": 36,
    "hidden_size": 4096,
    "num_attention_heads": 32,
    "num_query_groups": 8,
    "kv_channels": 128,
    "ffn_hidden_size": 12288,
    "make_vocab_size_divisible_by": 128,
}


def model(settings: dict):
    return train_settings({"model": settings, "data": {"data_path": "-"}}).model


@pytest.mark.parametrize(
    "settings, vocab, published",
    [(LLAMA3_8B, 128256, 8_030_261_248), (LLAMA3_70B, 128256, 70_553_706_496), (QWEN3_8B, 151936, 8_190_735_360)],
    ids=["llama3-8b", "llama3-70b", "qwen3-8b"],
)
def test_real_models_have_their_published_size(settings, vocab, published):
    assert total_parameters(model(settings), vocab) == published


def test_stages_split_layers_and_put_embedding_first_and_head_last():
    m = model({**LLAMA3_8B})
    stages = stage_parameters(m, 128256, tp=8, pp=4)
    assert [s.layers for s in stages] == [8, 8, 8, 8]
    padded = 129024  # 128256 rounded up to a multiple of 128 x TP=8
    assert stages[0].embedding == padded // 8 * 4096 and stages[0].head == 0
    assert stages[-1].embedding == 0 and stages[-1].head == 4096 + padded // 8 * 4096
    assert stages[1].total == 8 * layer_parameters(m, 8)
    # the TP shards of every layer add up to the whole layer but the norms, which every TP rank keeps
    assert 8 * layer_parameters(m, 8) - layer_parameters(m, 1) == 7 * 2 * 4096


LAYOUTS = [
    ({"family": "gpt", "num_layers": 4}, 2, 2),
    (
        {
            "family": "gpt",
            "num_layers": 4,
            "position_embedding_type": "learned_absolute",
            "share_embeddings_and_output_weights": True,
        },
        2,
        2,
    ),
    ({"family": "gpt", "num_layers": 2, "share_embeddings_and_output_weights": True}, 2, 1),
    ({"family": "llama", "num_layers": 4, "num_query_groups": 2, "ffn_hidden_size": 128}, 2, 2),
    ({"family": "qwen2", "num_layers": 4, "num_query_groups": 2, "ffn_hidden_size": 128}, 2, 2),
    ({"family": "qwen3", "num_layers": 4, "num_query_groups": 2, "ffn_hidden_size": 128, "kv_channels": 32}, 1, 4),
    ({"family": "llama", "num_layers": 2, "num_query_groups": 2, "ffn_hidden_size": 96}, 4, 1),
]
VOCAB = 300


@pytest.fixture(scope="module")
def venv(tmp_path_factory):
    from megatron_env import megatron_env

    return megatron_env(tmp_path_factory)


@pytest.mark.integration
@pytest.mark.parametrize("settings, tp, pp", LAYOUTS, ids=lambda v: str(v) if isinstance(v, int) else v["family"])
def test_every_rank_holds_exactly_the_counted_parameters(venv, tmp_path, settings, tp, pp):
    result = venv.torchrun(
        tp * pp,
        REPO_ROOT / "tests/megatron_cpu/count_parameters.py",
        json.dumps(settings),
        tp,
        pp,
        VOCAB,
        tmp_path,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    built = [json.loads(p.read_text()) for p in sorted(tmp_path.glob("rank*.json"))]
    assert len(built) == tp * pp
    counted = {s.stage: s.total for s in stage_parameters(model(settings), VOCAB, tp, pp)}
    assert {(r["stage"], r["parameters"]) for r in built} == set(counted.items())
