"""The MoE families of `flagscale train` (qwen3_moe, mixtral, deepseek_v3): their settings and checks, and, with
the patched megatron-core (integration: the venv of tests/megatron_env.py), training with `flagscale train` on the
CPU over gloo with expert parallelism (allgather and alltoall dispatchers) and with tensor parallelism (which
turns sequence parallelism on), DeepSeek-V3's multi-latent attention, shared experts and sigmoid router included."""

from __future__ import annotations

import json

import pytest

from flagscale.errors import ConfigError
from flagscale.train import families
from flagscale.train.settings import train_settings

DATA = {"data_path": "/data/corpus"}
MOE = {"num_experts": 4, "router_topk": 2, "ffn_hidden_size": 64}
BASE = {"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "num_query_groups": 2, "ffn_hidden_size": 128}
MIXTRAL = {**BASE, "family": "mixtral", "moe": MOE}
QWEN3_MOE = {**BASE, "family": "qwen3_moe", "kv_channels": 32, "moe": {**MOE, "router_pre_softmax": True}}
DEEPSEEK_V3 = {
    **{k: v for k, v in BASE.items() if k != "num_query_groups"},
    "family": "deepseek_v3",
    "moe": {
        **MOE,
        "shared_expert_ffn_hidden_size": 64,
        "dense_layers": 1,
        "router_score_function": "sigmoid",
        "router_expert_bias": True,
        "router_num_groups": 2,
        "router_group_topk": 1,
    },
    "mla": {"q_lora_rank": 32, "kv_lora_rank": 32, "qk_head_dim": 16, "qk_pos_emb_head_dim": 8, "v_head_dim": 16},
}


def settings(model: dict, system: dict | None = None):
    return train_settings({"model": model, "system": system or {}, "data": DATA})


@pytest.mark.parametrize(
    "model, system, world, message",
    [
        ({**BASE, "family": "mixtral"}, {}, 1, r"train.model.moe: family mixtral needs it"),
        ({**BASE, "family": "llama", "moe": MOE}, {}, 1, r"train.model.moe: family llama has none"),
        ({**MIXTRAL, "family": "deepseek_v3"}, {}, 1, r"train.model.mla: family deepseek_v3 needs it"),
        ({**MIXTRAL, "moe": {**MOE, "router_topk": 5}}, {}, 1, r"router_topk=5 exceeds num_experts"),
        ({**MIXTRAL, "moe": {**MOE, "dense_layers": 2}}, {}, 1, r"dense_layers=2: leave at least one MoE layer"),
        ({**MIXTRAL, "moe": {**MOE, "router_num_groups": 2}}, {}, 1, "set router_num_groups and router_group_topk"),
        ({**MIXTRAL, "moe": {**MOE, "num_experts": 0}}, {}, 1, r"train.model.moe.num_experts=0: must be at least 1"),
        ({**MIXTRAL, "moe": {"router_topk": 2}}, {}, 1, r"train.model.moe: missing required field 'num_experts'"),
        (
            {**MIXTRAL, "global_batch_size": 6},
            {"expert_model_parallel_size": 3},
            3,
            r"num_experts=4 is not a multiple of expert_model_parallel_size=3",
        ),
        (
            MIXTRAL,
            {"expert_model_parallel_size": 2, "tensor_model_parallel_size": 2},
            2,
            r"expert_model_parallel_size=2 does not divide the data-parallel size 1",
        ),
        (BASE, {"expert_model_parallel_size": 2}, 2, r"expert_model_parallel_size=2 needs a MoE family"),
    ],
)
def test_moe_settings_a_run_cannot_use(model, system, world, message):
    with pytest.raises(ConfigError, match=message):
        settings(model, system).check(world)


def test_moe_arguments_for_megatron_core():
    kwargs = families.moe_config_kwargs(settings(DEEPSEEK_V3).model)
    assert kwargs["num_moe_experts"] == 4 and kwargs["moe_router_topk"] == 2 and kwargs["moe_ffn_hidden_size"] == 64
    assert kwargs["moe_layer_freq"] == [0, 1]  # the first layer keeps its dense MLP
    assert kwargs["moe_router_score_function"] == "sigmoid" and kwargs["moe_router_enable_expert_bias"] is True
    assert kwargs["moe_router_load_balancing_type"] == "seq_aux_loss"
    assert kwargs["moe_shared_expert_intermediate_size"] == 64 and kwargs["moe_grouped_gemm"] is False
    mixtral = families.moe_config_kwargs(settings(MIXTRAL).model)
    assert (
        mixtral["moe_router_load_balancing_type"] == "aux_loss" and mixtral["moe_token_dispatcher_type"] == "alltoall"
    )


@pytest.fixture(scope="module")
def venv(tmp_path_factory):
    from megatron_env import megatron_env

    return megatron_env(tmp_path_factory)


def _overrides(prefix: str, value) -> list[str]:
    """Hydra `++key=value` overrides of a nested settings mapping."""
    if isinstance(value, dict):
        return [o for k, v in value.items() for o in _overrides(f"{prefix}.{k}", v)]
    return [f"++{prefix}={'null' if value is None else json.dumps(value)}"]


RUNS = {
    "mixtral-ep2-allgather": (
        MIXTRAL,
        {"token_dispatcher": "allgather"},
        ["experiment.runner.nproc_per_node=2", "++train.system.expert_model_parallel_size=2"],
    ),
    "qwen3_moe-tp2": (
        QWEN3_MOE,
        {},
        ["experiment.runner.nproc_per_node=2", "train.system.tensor_model_parallel_size=2"],
    ),
    "deepseek_v3-ep2-alltoall": (
        DEEPSEEK_V3,
        {},
        ["experiment.runner.nproc_per_node=2", "++train.system.expert_model_parallel_size=2"],
    ),
}


@pytest.mark.integration
@pytest.mark.parametrize("run", list(RUNS))
def test_moe_family_trains_with_flagscale_train(venv, run):
    from conftest import REPO_ROOT

    model, moe, layout = RUNS[run]
    corpus = venv.corpus()
    exp = venv.work / f"train-{run}"
    model = {**model, "moe": {**model["moe"], **moe}, "train_iters": 12}
    result = venv.run(
        [
            venv.flagscale,
            "train",
            REPO_ROOT / "examples/tiny_gpt/conf",
            "--foreground",
            f"experiment.exp_dir={exp}",
            f"train.data.data_path={corpus}",
            "train.system.checkpoint.save=null",
            *layout,
            *_overrides("train.model", model),
        ],
        timeout=600,
        label=f"train-{run}",
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    curve = [json.loads(line)["loss"] for line in (exp / "logs" / "metrics.jsonl").read_text().splitlines()]
    print(f"\n{run}: loss {curve[0]:.3f} -> {curve[-1]:.3f} ({venv.timings[f'train-{run}']} s)")
    assert len(curve) == 12 and curve[-1] < 0.7 * curve[0], curve
