"""How many parameters each rank holds, worked out from the shapes megatron.core gives a model's weights.

The count is exact for the local layer spec (what `flagscale train` builds): tensor parallelism splits the
column-parallel weights (fused query/key/value, fc1, the vocabulary of the embedding and output layer) and
the row-parallel ones (attention projection, fc2) over TP ranks, keeps norms and row-parallel biases whole
on every TP rank, and pipeline parallelism gives each stage its share of the layers, the embedding to the
first stage and the final norm and output layer to the last. `action=dryrun` prints it; the memory model
of the auto-tuner builds on it.

Pure arithmetic: no torch, no megatron.
"""

from __future__ import annotations

from dataclasses import dataclass

from flagscale.train.families import ffn_size, head_dim, query_groups, structure
from flagscale.train.settings import ModelSettings
from flagscale.train.tokenizer import padded_vocab_size


@dataclass(frozen=True)
class StageParameters:
    """One pipeline stage's parameters on each of its TP ranks (every TP rank of a stage holds as many)."""

    stage: int
    layers: int
    embedding: int
    per_layer: int
    head: int  # final norm and output layer
    layers_total: int  # all of the stage's layers

    @property
    def total(self) -> int:
        return self.embedding + self.layers_total + self.head


def _norm(m: ModelSettings, size: int) -> int:
    """A LayerNorm has a weight and a bias, an RMSNorm only a weight."""
    return size * (2 if structure(m.family).normalization == "LayerNorm" else 1)


def _attention(m: ModelSettings, tp: int) -> int:
    """The self-attention block's parameters on one TP rank."""
    s = structure(m.family)
    if m.mla is not None:
        return _mla(m, tp)
    hd, heads, groups = head_dim(m), m.num_attention_heads, query_groups(m)
    qkv_out = (heads + 2 * groups) * hd // tp
    count = qkv_out * m.hidden_size + m.hidden_size * heads * hd // tp
    if s.linear_bias or s.qkv_bias:
        count += qkv_out
    if s.linear_bias:
        count += m.hidden_size  # the row-parallel projection's bias is whole on every rank
    if s.qk_norm:
        count += 2 * _norm(m, hd)
    return count


def _mla(m: ModelSettings, tp: int) -> int:
    """Multi-latent attention: queries (optionally through a low-rank latent) and a shared key/value latent
    with its decoupled RoPE part; qk_norm normalizes the latents."""
    a, h, heads = m.mla, m.hidden_size, m.num_attention_heads
    assert a is not None
    q_head = a.qk_head_dim + a.qk_pos_emb_head_dim
    if a.q_lora_rank is None:
        count = heads * q_head // tp * h
    else:
        count = a.q_lora_rank // tp * h + heads * q_head // tp * a.q_lora_rank
        count += _norm(m, a.q_lora_rank) if structure(m.family).qk_norm else 0
    count += (a.kv_lora_rank + a.qk_pos_emb_head_dim) // tp * h
    count += heads * (a.qk_head_dim + a.v_head_dim) // tp * a.kv_lora_rank
    count += _norm(m, a.kv_lora_rank) if structure(m.family).qk_norm else 0
    return count + h * heads * a.v_head_dim // tp


def _mlp(m: ModelSettings, ffn: int, tp: int) -> int:
    """A dense MLP of `ffn` on one TP rank (column-parallel fc1, row-parallel fc2)."""
    s = structure(m.family)
    fc1_out = (2 if s.swiglu else 1) * ffn // tp
    count = fc1_out * m.hidden_size + m.hidden_size * ffn // tp
    return count + (fc1_out + m.hidden_size if s.linear_bias else 0)


def _moe(m: ModelSettings, tp: int, ep: int) -> int:
    """A MoE layer's MLP on one rank: the router (whole), its share of the experts (split over EP, each over
    TP), and the shared experts (split over TP)."""
    e = m.moe
    assert e is not None
    count = e.num_experts * m.hidden_size + e.num_experts // ep * _mlp(m, e.ffn_hidden_size or ffn_size(m), tp)
    return count + (_mlp(m, e.shared_expert_ffn_hidden_size, tp) if e.shared_expert_ffn_hidden_size else 0)


def layer_parameters(m: ModelSettings, tp: int, ep: int = 1, moe: bool = False) -> int:
    """One transformer layer's parameters on one rank (`moe`: a MoE layer of a MoE family)."""
    mlp = _moe(m, tp, ep) if moe else _mlp(m, ffn_size(m), tp)
    return _norm(m, m.hidden_size) + _attention(m, tp) + _norm(m, m.hidden_size) + mlp


def stage_parameters(m: ModelSettings, vocab_size: int, tp: int, pp: int, ep: int = 1) -> list[StageParameters]:
    """Every pipeline stage's parameters per rank, first stage first (`per_layer` is their average for a MoE
    family, whose dense first layers are smaller)."""
    vocab = padded_vocab_size(vocab_size, m.make_vocab_size_divisible_by, tp) // tp * m.hidden_size
    positions = (m.max_position_embeddings or m.seq_length) * m.hidden_size
    dense = m.moe.dense_layers if m.moe is not None else m.num_layers
    per_stage = m.num_layers // pp
    stages = []
    for stage in range(pp):
        first, last = stage == 0, stage == pp - 1
        ids = range(stage * per_stage, (stage + 1) * per_stage)
        layers = sum(layer_parameters(m, tp, ep, moe=i >= dense) for i in ids)
        embedding = (vocab + (positions if m.position_embedding_type == "learned_absolute" else 0)) if first else 0
        head = 0
        if last:
            head = _norm(m, m.hidden_size)
            # a tied output layer reuses the embedding on a single stage; the last of several keeps a copy
            if not m.share_embeddings_and_output_weights or not first:
                head += vocab
        stages.append(StageParameters(stage, per_stage, embedding, layers // per_stage, head, layers))
    return stages


def total_parameters(m: ModelSettings, vocab_size: int) -> int:
    """The model's parameters at TP=1, PP=1, EP=1, counted once (the padded vocabulary included)."""
    return stage_parameters(m, vocab_size, 1, 1)[0].total
