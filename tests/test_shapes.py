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
MIXTRAL_8X7B = {**LLAMA3_8B, "family": "mixtral", "moe": {"num_experts": 8, "router_topk": 2}}
QWEN3_30B_A3B = {
    "family": "qwen3_moe",
    "num_layers": 48,
    "hidden_size": 2048,
    "num_attention_heads": 32,
    "num_query_groups": 4,
    "kv_channels": 128,
    "ffn_hidden_size": 6144,
    "make_vocab_size_divisible_by": 128,
    "moe": {"num_experts": 128, "router_topk": 8, "ffn_hidden_size": 768, "router_pre_softmax": True},
}
DEEPSEEK_V3 = {
    "family": "deepseek_v3",
    "num_layers": 61,
    "hidden_size": 7168,
    "num_attention_heads": 128,
    "ffn_hidden_size": 18432,
    "make_vocab_size_divisible_by": 128,
    "moe": {
        "num_experts": 256,
        "router_topk": 8,
        "ffn_hidden_size": 2048,
        "shared_expert_ffn_hidden_size": 2048,
        "dense_layers": 3,
        "router_score_function": "sigmoid",
        "router_expert_bias": True,
        "router_num_groups": 8,
        "router_group_topk": 4,
        "router_topk_scaling_factor": 2.5,
    },
    "mla": {"q_lora_rank": 1536, "kv_lora_rank": 512, "qk_head_dim": 128, "qk_pos_emb_head_dim": 64, "v_head_dim": 128},
}
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
    [
        (LLAMA3_8B, 128256, 8_030_261_248),
        (LLAMA3_70B, 128256, 70_553_706_496),
        (QWEN3_8B, 151936, 8_190_735_360),
        (MIXTRAL_8X7B, 32000, 46_702_792_704),
        (QWEN3_30B_A3B, 151936, 30_532_122_624),
        # 671,026,419,200 published, less the 58 MoE layers' 256 router expert biases: a buffer in megatron.core
        (DEEPSEEK_V3, 129280, 671_026_419_200 - 58 * 256),
    ],
    ids=["llama3-8b", "llama3-70b", "qwen3-8b", "mixtral-8x7b", "qwen3-30b-a3b", "deepseek-v3"],
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
TINY_MOE = {"num_experts": 4, "router_topk": 2, "ffn_hidden_size": 32}
TINY_DEEPSEEK = {
    "family": "deepseek_v3",
    "num_layers": 4,
    "hidden_size": 64,
    "num_attention_heads": 4,
    "ffn_hidden_size": 128,
    "moe": {
        **TINY_MOE,
        "shared_expert_ffn_hidden_size": 32,
        "dense_layers": 1,
        "router_score_function": "sigmoid",
        "router_expert_bias": True,
    },
    "mla": {"q_lora_rank": 32, "kv_lora_rank": 32, "qk_head_dim": 16, "qk_pos_emb_head_dim": 8, "v_head_dim": 16},
}
MOE_LAYOUTS = [  # (settings, TP, PP, EP, processes)
    (
        {"family": "mixtral", "num_layers": 2, "num_query_groups": 2, "ffn_hidden_size": 128, "moe": TINY_MOE},
        1,
        1,
        2,
        2,
    ),
    (
        {
            "family": "qwen3_moe",
            "num_layers": 4,
            "num_query_groups": 2,
            "kv_channels": 32,
            "ffn_hidden_size": 128,
            "moe": TINY_MOE,
        },
        2,
        2,
        1,
        4,
    ),
    (
        {"family": "qwen3_moe", "num_layers": 2, "num_query_groups": 2, "ffn_hidden_size": 128, "moe": TINY_MOE},
        2,
        1,
        2,
        4,
    ),
    (TINY_DEEPSEEK, 2, 2, 1, 4),
    (TINY_DEEPSEEK, 1, 2, 2, 4),
    ({**TINY_DEEPSEEK, "mla": {**TINY_DEEPSEEK["mla"], "q_lora_rank": None}}, 2, 1, 1, 2),
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


@pytest.mark.integration
@pytest.mark.parametrize(
    "settings, tp, pp, ep, nproc", MOE_LAYOUTS, ids=lambda v: v["family"] if isinstance(v, dict) else str(v)
)
def test_every_rank_of_moe_and_mla_layouts_holds_exactly_the_counted_parameters(
    venv, tmp_path, settings, tp, pp, ep, nproc
):
    result = venv.torchrun(
        nproc,
        REPO_ROOT / "tests/megatron_cpu/count_parameters.py",
        json.dumps(settings),
        tp,
        pp,
        VOCAB,
        tmp_path,
        ep,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    built = [json.loads(p.read_text()) for p in sorted(tmp_path.glob("rank*.json"))]
    assert len(built) == nproc
    counted = {s.stage: s.total for s in stage_parameters(model(settings), VOCAB, tp, pp, ep)}
    assert {(r["stage"], r["parameters"]) for r in built} == set(counted.items())


@pytest.mark.parametrize(
    "settings, tp, pp, ep",
    [(s, tp, pp, 1) for s, tp, pp in LAYOUTS]
    + [(s, tp, pp, ep) for s, tp, pp, ep, _ in MOE_LAYOUTS]
    + [(LLAMA3_8B, 8, 4, 1), (DEEPSEEK_V3, 8, 1, 8), (QWEN3_30B_A3B, 4, 4, 4)],
    ids=lambda v: v["family"] if isinstance(v, dict) else str(v),
)
def test_stage_tensors_add_up_to_the_stage_parameters(settings, tp, pp, ep):
    """The per-tensor list the memory model lays out in megatron DDP's buffers (flagscale.train.memory) holds
    exactly the counted parameters; with EP > 1 the experts are the expert-parallel tensors."""
    from flagscale.train.shapes import stage_tensors

    m = model(settings)
    for stage in stage_parameters(m, VOCAB, tp, pp, ep):
        tensors = stage_tensors(m, VOCAB, tp, pp, ep, stage.stage)
        assert sum(t.numel for t in tensors) == stage.total
        assert any(t.expert for t in tensors) == (ep > 1 and m.moe is not None and stage.layers_total > 0)
