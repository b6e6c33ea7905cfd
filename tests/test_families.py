"""Model families in `flagscale train` (flagscale/train/families.py): settings, their checks, and what each
family asks of megatron.core.

Without megatron: the settings and their checks, the TransformerConfig / GPTModel arguments of every family
(the gpt family's are exactly what the driver passed before families existed). With the patched megatron-core
(integration, the venv of tests/megatron_env.py): every family builds with megatron.core's local spec and the
parameters a family implies, and trains with `flagscale train` at TP=2 over gloo.
"""

from __future__ import annotations

import json

import pytest

from flagscale.errors import ConfigError
from flagscale.train import families
from flagscale.train.settings import train_settings

DATA = {"data_path": "/data/corpus"}
LLAMA = {
    "family": "llama",
    "num_layers": 2,
    "hidden_size": 64,
    "num_attention_heads": 4,
    "num_query_groups": 2,
    "ffn_hidden_size": 128,
    "rotary_base": 500000,
    "norm_epsilon": 1e-6,
}


def settings(model: dict, system: dict | None = None, **data):
    return train_settings({"model": model, "system": system or {}, "data": {**DATA, **data}})


# ------------------------------------------------------------------------------------------ settings
def test_gpt_is_the_default_and_keeps_megatron_core_defaults():
    m = settings({}).model
    assert m.family == "gpt"
    assert (m.num_query_groups, m.kv_channels, m.vocab_size, m.rotary_scaling_factor) == (None, None, None, None)
    assert m.rotary_base == 10000.0 and m.norm_epsilon == 1e-5 and m.share_embeddings_and_output_weights is False


@pytest.mark.parametrize(
    "model, system, world, message",
    [
        (
            {"num_attention_heads": 4, "num_query_groups": 3},
            {},
            1,
            "num_attention_heads=4 is not a multiple of num_query_groups=3",
        ),
        (
            {"num_attention_heads": 4, "num_query_groups": 1},
            {"tensor_model_parallel_size": 2},
            2,
            "num_query_groups=1 is not a multiple of tensor_model_parallel_size=2: every tensor-parallel rank needs",
        ),
        ({"num_attention_heads": 4, "num_query_groups": 2}, {"tensor_model_parallel_size": 4}, 4, "num_query_groups=2"),
        ({"hidden_size": 66}, {}, 1, r"hidden_size=66 is not a multiple of num_attention_heads=4 \(or set kv_channels"),
    ],
)
def test_layouts_a_family_cannot_run(model, system, world, message):
    with pytest.raises(ConfigError, match=message):
        settings(model, system).check(world)


def test_kv_channels_lifts_the_hidden_over_heads_rule():
    """qwen3's head dim is its own setting: 4 heads x 32 = 128 != hidden 64 is fine."""
    settings({**LLAMA, "family": "qwen3", "kv_channels": 32}, {"tensor_model_parallel_size": 2}).check(2)


@pytest.mark.parametrize(
    "model, checkpoint, message",
    [
        ({"family": "mistral"}, {}, r"train.model.family=mistral: use one of gpt, llama, qwen2, qwen3"),
        ({"family": "llama", "position_embedding_type": "learned_absolute"}, {}, "family llama uses rope"),
        ({"num_query_groups": 0}, {}, "train.model.num_query_groups=0: must be at least 1"),
        ({"rotary_base": 0}, {}, "train.model.rotary_base=0: must be > 0"),
        ({"rotary_scaling_factor": 0.5}, {}, r"rotary_scaling_factor=0.5: must be >= 1"),
        ({"norm_epsilon": -1}, {}, "train.model.norm_epsilon=-1: must be > 0"),
        ({"vocab_size": 0}, {}, "train.model.vocab_size=0: must be at least 1"),
        (
            {"position_embedding_type": "learned_absolute", "rotary_scaling_factor": 8},
            {},
            "rotary_scaling_factor needs position_embedding_type=rope",
        ),
        ({}, {"finetune": True}, "finetune=true needs checkpoint.load"),
    ],
)
def test_bad_family_settings_name_the_key(model, checkpoint, message):
    with pytest.raises(ConfigError, match=message):
        train_settings({"model": model, "system": {"checkpoint": checkpoint}, "data": DATA})


# ------------------------------------------------------------------------- megatron.core's arguments
def test_gpt_arguments_are_the_ones_the_driver_always_passed():
    m = settings({}).model
    kwargs = families.transformer_config_kwargs(m)
    assert kwargs == {
        "num_layers": 2,
        "hidden_size": 64,
        "num_attention_heads": 4,
        "ffn_hidden_size": None,
        "init_method_std": 0.02,
        "hidden_dropout": 0.0,
        "attention_dropout": 0.0,
        # TransformerConfig's own defaults, passed explicitly
        "num_query_groups": None,
        "kv_channels": None,
        "layernorm_epsilon": 1e-5,
    }
    model = families.gpt_model_kwargs(m, 320)
    # GPTModel's own defaults: rotary base 10000, untied output layer, no RoPE scaling
    assert model == {
        "vocab_size": 320,
        "max_sequence_length": 32,
        "position_embedding_type": "rope",
        "rotary_base": 10000.0,
        "share_embeddings_and_output_weights": False,
    }


@pytest.mark.parametrize(
    "family, qkv_bias, qk_norm",
    [("llama", False, False), ("qwen2", True, False), ("qwen3", False, True)],
)
def test_hf_families_are_rmsnorm_swiglu_without_linear_biases(family, qkv_bias, qk_norm):
    pytest.importorskip("torch")
    import torch.nn.functional as F

    m = settings({**LLAMA, "family": family, "kv_channels": 32, "rotary_scaling_factor": 8.0}).model
    kwargs = families.transformer_config_kwargs(m)
    assert kwargs["normalization"] == "RMSNorm" and kwargs["layernorm_epsilon"] == 1e-6
    assert kwargs["gated_linear_unit"] is True and kwargs["activation_func"] is F.silu
    assert kwargs["add_bias_linear"] is False
    assert kwargs["add_qkv_bias"] is qkv_bias and kwargs["qk_layernorm"] is qk_norm
    assert (kwargs["num_query_groups"], kwargs["kv_channels"]) == (2, 32)
    model = families.gpt_model_kwargs(m, 384)
    assert model["rotary_base"] == 500000 and model["rope_scaling"] is True and model["rope_scaling_factor"] == 8.0


def test_architecture_spells_out_defaults_and_names_differences():
    m = settings(LLAMA).model
    arch = families.architecture(m)
    assert arch["num_query_groups"] == 2 and arch["kv_channels"] == 16 and arch["ffn_hidden_size"] == 128
    assert families.differences(arch, m) == []
    other = settings({**LLAMA, "hidden_size": 128, "family": "qwen2"}).model
    assert families.differences(arch, other) == [
        "family='llama' (this run: 'qwen2')",
        "hidden_size=64 (this run: 128)",
        "kv_channels=16 (this run: 32)",
    ]
    json.dumps(arch)  # recorded in a checkpoint's common state as plain data


# --------------------------------------------------------------------------- with megatron.core (venv)
PARAMETERS = r"""
import json, sys
import torch.distributed as dist
from megatron.core import parallel_state
from flagscale.train.driver import gpt_model, transformer_config
from flagscale.train.settings import train_settings

dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
parallel_state.initialize_model_parallel()
out = {}
for model in json.loads(sys.argv[1]):
    t = train_settings({"model": model, "data": {"data_path": "-"}})
    m = gpt_model(t, 320, transformer_config(t))
    out[model["family"]] = {k: list(v.shape) for k, v in m.state_dict().items() if hasattr(v, "shape")}
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def venv(tmp_path_factory):
    from megatron_env import megatron_env

    return megatron_env(tmp_path_factory)


@pytest.mark.integration
def test_each_family_builds_the_parameters_it_implies(venv):
    models = [{**LLAMA, "family": f, "kv_channels": 32} for f in ("llama", "qwen2", "qwen3")]
    models.append({"family": "gpt"})
    result = venv.run([venv.python, "-c", PARAMETERS, json.dumps(models)], timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    shapes = json.loads(result.stdout.strip().splitlines()[-1])
    layer = "decoder.layers.0."
    gpt = shapes["gpt"]
    assert gpt[layer + "input_layernorm.bias"] == [64] and gpt[layer + "mlp.linear_fc1.bias"] == [256]
    for family in ("llama", "qwen2", "qwen3"):
        p = shapes[family]
        assert not [k for k in p if k.endswith("layernorm.bias") or k.endswith("norm.bias")], family  # RMSNorm
        assert layer + "self_attention.linear_proj.bias" not in p and layer + "mlp.linear_fc1.bias" not in p
        # fused q, k, v: 4 query heads + 2 key + 2 value heads of 32; gate and up stacked
        assert p[layer + "self_attention.linear_qkv.weight"] == [(4 + 2 + 2) * 32, 64]
        assert p[layer + "mlp.linear_fc1.weight"] == [2 * 128, 64]
        assert p[layer + "self_attention.linear_proj.weight"] == [64, 4 * 32]
        assert (layer + "self_attention.linear_qkv.bias" in p) is (family == "qwen2")
        assert (layer + "self_attention.q_layernorm.weight" in p) is (family == "qwen3")
        assert p.get(layer + "self_attention.k_layernorm.weight", [32]) == [32]
        assert "output_layer.weight" in p  # untied by default


@pytest.mark.integration
@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_each_family_trains_with_flagscale_train_at_tp2(venv, family):
    """`flagscale train` with the tiny example's config, the family's structure, GQA and TP=2 over gloo."""
    from conftest import REPO_ROOT

    corpus = venv.corpus()
    exp = venv.work / f"train-{family}"
    overrides = {**LLAMA, "family": family, "kv_channels": 32 if family == "qwen3" else None, "train_iters": 12}
    result = venv.run(
        [
            venv.flagscale,
            "train",
            REPO_ROOT / "examples/tiny_gpt/conf",
            "--config-name",
            "tp2",
            "--foreground",
            f"experiment.exp_dir={exp}",
            f"train.data.data_path={corpus}",
            "train.system.checkpoint.save=null",
            *(f"++train.model.{k}={'null' if v is None else v}" for k, v in overrides.items()),
        ],
        timeout=600,
        label=f"train-{family}",
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "world size 2 (TP=2 PP=1 DP=1)" in result.stdout
    curve = [json.loads(line)["loss"] for line in (exp / "logs" / "metrics.jsonl").read_text().splitlines()]
    print(f"\n{family} TP=2: loss {curve[0]:.3f} -> {curve[-1]:.3f} ({venv.timings[f'train-{family}']} s)")
    assert len(curve) == 12 and curve[-1] < 0.7 * curve[0], curve


@pytest.mark.integration
def test_tied_embeddings_train_across_pipeline_stages(venv):
    """qwen2 with a tied output layer at PP=2: the last stage's copy of the embedding (patch 0010 puts it on the
    current device) learns with the first stage's."""
    from conftest import REPO_ROOT

    corpus = venv.corpus()
    exp = venv.work / "train-qwen2-tied-pp2"
    overrides = {**LLAMA, "family": "qwen2", "share_embeddings_and_output_weights": "true", "train_iters": 12}
    result = venv.run(
        [
            venv.flagscale,
            "train",
            REPO_ROOT / "examples/tiny_gpt/conf",
            "--config-name",
            "pp2",
            "--foreground",
            f"experiment.exp_dir={exp}",
            f"train.data.data_path={corpus}",
            "train.system.checkpoint.save=null",
            *(f"++train.model.{k}={v}" for k, v in overrides.items()),
        ],
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    curve = [json.loads(line)["loss"] for line in (exp / "logs" / "metrics.jsonl").read_text().splitlines()]
    print(f"\nqwen2 tied, PP=2: loss {curve[0]:.3f} -> {curve[-1]:.3f}")
    assert len(curve) == 12 and curve[-1] < 0.7 * curve[0], curve
