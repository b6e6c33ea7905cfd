"""Model families: what `train.model.family` means to megatron.core.

A family fixes the structure of a decoder (normalization, MLP activation, which linears have biases,
QK-norm); `ModelSettings` gives its sizes. This module turns both into megatron.core's own arguments:
`TransformerConfig` kwargs, the local (non-TransformerEngine) layer spec, and `GPTModel` kwargs.

* gpt: megatron.core's GPT as `flagscale train` always built it (LayerNorm, GeLU MLP, biases everywhere).
  Its arguments are exactly the ones the driver passed before families existed.
* llama: RMSNorm, SwiGLU (gated linear unit + SiLU), RoPE, GQA, no biases.
* qwen2: llama + biases on the query/key/value projections.
* qwen3: llama + RMSNorm on every query and key head (QK-norm); its head dim is `kv_channels`, which need
  not be hidden_size / num_attention_heads.
* qwen3_moe: qwen3 with a mixture-of-experts MLP (`model.moe`: softmax router, top-k).
* mixtral: llama with a mixture-of-experts MLP (top-2 of 8 in Mixtral 8x7B).
* deepseek_v3: llama's norms and SwiGLU with multi-latent attention (`model.mla`) and MoE with shared experts,
  a sigmoid router with expert bias, group-limited top-k and dense first layers (`model.moe`).

Imports no torch or megatron at module level: the settings and the checkpoint bridge read `FAMILIES`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from flagscale.train.settings import ModelSettings


@dataclass(frozen=True)
class Structure:
    """The structural choices of a family, in megatron.core's terms."""

    normalization: str  # TransformerConfig.normalization: LayerNorm | RMSNorm
    swiglu: bool  # gated_linear_unit with SiLU; otherwise megatron's default GeLU MLP
    linear_bias: bool  # TransformerConfig.add_bias_linear: every linear layer has a bias
    qkv_bias: bool  # TransformerConfig.add_qkv_bias: the fused query/key/value projection has one
    qk_norm: bool  # TransformerConfig.qk_layernorm: normalize every query and key head
    moe: bool = False  # a mixture-of-experts MLP (train.model.moe)
    mla: bool = False  # multi-latent attention (train.model.mla)


FAMILIES: dict[str, Structure] = {
    "gpt": Structure(normalization="LayerNorm", swiglu=False, linear_bias=True, qkv_bias=False, qk_norm=False),
    "llama": Structure(normalization="RMSNorm", swiglu=True, linear_bias=False, qkv_bias=False, qk_norm=False),
    "qwen2": Structure(normalization="RMSNorm", swiglu=True, linear_bias=False, qkv_bias=True, qk_norm=False),
    "qwen3": Structure(normalization="RMSNorm", swiglu=True, linear_bias=False, qkv_bias=False, qk_norm=True),
    "qwen3_moe": Structure("RMSNorm", swiglu=True, linear_bias=False, qkv_bias=False, qk_norm=True, moe=True),
    "mixtral": Structure("RMSNorm", swiglu=True, linear_bias=False, qkv_bias=False, qk_norm=False, moe=True),
    "deepseek_v3": Structure(
        "RMSNorm", swiglu=True, linear_bias=False, qkv_bias=False, qk_norm=True, moe=True, mla=True
    ),  # with MLA, qk_norm is the RMSNorm of the compressed query and key/value latents
}


def structure(family: str) -> Structure:
    return FAMILIES[family]


def head_dim(m: ModelSettings) -> int:
    return m.kv_channels or m.hidden_size // m.num_attention_heads


def query_groups(m: ModelSettings) -> int:
    return m.num_query_groups or m.num_attention_heads


def ffn_size(m: ModelSettings) -> int:
    return m.ffn_hidden_size or 4 * m.hidden_size


def transformer_config_kwargs(m: ModelSettings) -> dict[str, Any]:
    """The model's part of megatron.core's TransformerConfig (sizes and structure; no parallelism or dtype)."""
    kwargs: dict[str, Any] = {
        "num_layers": m.num_layers,
        "hidden_size": m.hidden_size,
        "num_attention_heads": m.num_attention_heads,
        "ffn_hidden_size": m.ffn_hidden_size,
        "init_method_std": m.init_method_std,
        "hidden_dropout": m.hidden_dropout,
        "attention_dropout": m.attention_dropout,
        # None and 1e-5 are TransformerConfig's own defaults: the gpt family is built as it always was
        "num_query_groups": m.num_query_groups,
        "kv_channels": m.kv_channels,
        "layernorm_epsilon": m.norm_epsilon,
    }
    if m.family == "gpt":
        return kwargs
    import torch.nn.functional as F

    s = structure(m.family)
    kwargs.update(
        normalization=s.normalization,
        add_bias_linear=s.linear_bias,
        add_qkv_bias=s.qkv_bias,
        qk_layernorm=s.qk_norm,
    )
    if s.swiglu:
        kwargs.update(gated_linear_unit=True, activation_func=F.silu)
    if m.moe is not None:
        kwargs.update(moe_config_kwargs(m))
    if m.mla is not None:
        kwargs.update(
            q_lora_rank=m.mla.q_lora_rank,
            kv_lora_rank=m.mla.kv_lora_rank,
            qk_head_dim=m.mla.qk_head_dim,
            qk_pos_emb_head_dim=m.mla.qk_pos_emb_head_dim,
            v_head_dim=m.mla.v_head_dim,
            rope_type="rope",  # the model's RoPE settings apply (no YaRN yet)
        )
    return kwargs


def moe_config_kwargs(m: ModelSettings) -> dict[str, Any]:
    """megatron.core's moe_* TransformerConfig fields of `model.moe`."""
    e = m.moe
    assert e is not None
    return {
        "num_moe_experts": e.num_experts,
        "moe_router_topk": e.router_topk,
        "moe_ffn_hidden_size": e.ffn_hidden_size or ffn_size(m),
        "moe_shared_expert_intermediate_size": e.shared_expert_ffn_hidden_size,
        "moe_layer_freq": [0] * e.dense_layers + [1] * (m.num_layers - e.dense_layers),
        "moe_router_score_function": e.router_score_function,
        "moe_router_pre_softmax": e.router_pre_softmax,
        "moe_router_enable_expert_bias": e.router_expert_bias,
        "moe_router_num_groups": e.router_num_groups,
        "moe_router_group_topk": e.router_group_topk,
        "moe_router_topk_scaling_factor": e.router_topk_scaling_factor,
        "moe_router_load_balancing_type": "seq_aux_loss" if e.router_expert_bias else "aux_loss",
        "moe_aux_loss_coeff": e.aux_loss_coeff,
        "moe_token_dispatcher_type": e.token_dispatcher,
        "moe_router_dtype": "fp32",
        "moe_grouped_gemm": False,  # the local spec's SequentialMLP experts run on every device
    }


def layer_spec(m: ModelSettings, config=None):
    """megatron.core's local layer spec for the family (TransformerEngine-free: it runs on every device). MoE
    families get a block spec built from `config`: their dense first layers and MoE layers differ."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec, get_gpt_layer_local_spec

    if m.family == "gpt":
        return get_gpt_layer_local_spec()
    s = structure(m.family)
    if s.moe:
        assert config is not None, "a MoE family's layer spec is built from its TransformerConfig"
        return get_gpt_decoder_block_spec(config, use_transformer_engine=False, normalization=s.normalization)
    return get_gpt_layer_local_spec(normalization=s.normalization, qk_layernorm=s.qk_norm)


def gpt_model_kwargs(m: ModelSettings, vocab_size: int) -> dict[str, Any]:
    """GPTModel's arguments besides config, layer spec and pipeline stage. The defaults of the settings are
    GPTModel's own (rotary base 10000, untied output layer, no RoPE scaling)."""
    kwargs: dict[str, Any] = {
        "vocab_size": vocab_size,
        "max_sequence_length": m.max_position_embeddings or m.seq_length,
        "position_embedding_type": m.position_embedding_type,
        "rotary_base": m.rotary_base,
        "share_embeddings_and_output_weights": m.share_embeddings_and_output_weights,
    }
    if m.rotary_scaling_factor is not None:
        kwargs.update(rope_scaling=True, rope_scaling_factor=m.rotary_scaling_factor)
    return kwargs


# The settings that decide the weights' shapes and what they compute: a checkpoint records them, and a run
# (or an export) that loads it must agree.
ARCHITECTURE_FIELDS = (
    "family",
    "num_layers",
    "hidden_size",
    "num_attention_heads",
    "num_query_groups",
    "kv_channels",
    "ffn_hidden_size",
    "position_embedding_type",
    "rotary_base",
    "rotary_scaling_factor",
    "norm_epsilon",
    "share_embeddings_and_output_weights",
    "moe",
    "mla",
)
# model.moe fields that change how a run trains, not the weights or what the model computes
_MOE_TRAINING_ONLY = ("aux_loss_coeff", "token_dispatcher")


def architecture(m: ModelSettings) -> dict[str, Any]:
    """The architecture fields of `m`, with the defaults spelled out (None head counts resolved); `moe` and `mla`
    as plain mappings (None for the families without them)."""
    from dataclasses import asdict

    arch = {name: getattr(m, name) for name in ARCHITECTURE_FIELDS}
    arch.update(num_query_groups=query_groups(m), kv_channels=head_dim(m), ffn_hidden_size=ffn_size(m))
    if m.moe is not None:
        moe = {k: v for k, v in asdict(m.moe).items() if k not in _MOE_TRAINING_ONLY}
        arch["moe"] = {**moe, "ffn_hidden_size": m.moe.ffn_hidden_size or ffn_size(m)}
    if m.mla is not None:
        arch["mla"] = asdict(m.mla)
    return arch


def differences(recorded: dict[str, Any], m: ModelSettings) -> list[str]:
    """`field=recorded (run: value)` for every architecture field where `m` differs from a recorded one."""
    ours = architecture(m)
    return [
        f"{name}={recorded[name]!r} (this run: {ours[name]!r})"
        for name in ARCHITECTURE_FIELDS
        if name in recorded and recorded[name] != ours[name]
    ]
