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


# ------------------------------------------------------------------------- the tensors, in megatron's order
@dataclass(frozen=True)
class Tensor:
    """One parameter tensor of a rank: its elements, whether it is an expert-parallel one (megatron DDP puts those
    in a buffer of their own, reduced over the expert-data-parallel group) and whether it is a pipeline-shared
    embedding (the distributed optimizer gives those a bucket of their own)."""

    numel: int
    expert: bool = False
    shared_embedding: bool = False


def _norm_tensors(m: ModelSettings, size: int) -> list[Tensor]:
    return [Tensor(size)] * (2 if structure(m.family).normalization == "LayerNorm" else 1)


def _linear(m: ModelSettings, out: int, inp: int, bias: bool, expert: bool = False) -> list[Tensor]:
    return [Tensor(out * inp, expert)] + ([Tensor(out, expert)] if bias else [])


def _attention_tensors(m: ModelSettings, tp: int) -> list[Tensor]:
    """As GPTModel.named_parameters() lists them: linear_proj first (megatron's Attention makes it before the
    query/key/value projections), then the projections, then the QK norms."""
    s, h = structure(m.family), m.hidden_size
    if m.mla is not None:
        a, heads = m.mla, m.num_attention_heads
        q_head = a.qk_head_dim + a.qk_pos_emb_head_dim
        out = _linear(m, h, heads * a.v_head_dim // tp, False)
        if a.q_lora_rank is None:
            out += _linear(m, heads * q_head // tp, h, False)
        else:
            out += _linear(m, a.q_lora_rank // tp, h, False) + _linear(m, heads * q_head // tp, a.q_lora_rank, False)
        out += _linear(m, (a.kv_lora_rank + a.qk_pos_emb_head_dim) // tp, h, False)
        out += _linear(m, heads * (a.qk_head_dim + a.v_head_dim) // tp, a.kv_lora_rank, False)
        if s.qk_norm:
            out += _norm_tensors(m, a.q_lora_rank) if a.q_lora_rank is not None else []
            out += _norm_tensors(m, a.kv_lora_rank)
        return out
    hd, heads, groups = head_dim(m), m.num_attention_heads, query_groups(m)
    out = [Tensor(h * heads * hd // tp)] + ([Tensor(h)] if s.linear_bias else [])
    out += _linear(m, (heads + 2 * groups) * hd // tp, h, s.linear_bias or s.qkv_bias)
    if s.qk_norm:
        out += _norm_tensors(m, hd) + _norm_tensors(m, hd)
    return out


def _mlp_tensors(m: ModelSettings, ffn: int, tp: int, expert: bool = False) -> list[Tensor]:
    s = structure(m.family)
    fc1 = _linear(m, (2 if s.swiglu else 1) * ffn // tp, m.hidden_size, s.linear_bias, expert)
    fc2 = [Tensor(m.hidden_size * ffn // tp, expert)] + ([Tensor(m.hidden_size, expert)] if s.linear_bias else [])
    return fc1 + fc2


def layer_tensors(m: ModelSettings, tp: int, ep: int = 1, moe: bool = False) -> list[Tensor]:
    """One layer's parameter tensors on one rank, in megatron's order (their sum is layer_parameters)."""
    out = _norm_tensors(m, m.hidden_size) + _attention_tensors(m, tp) + _norm_tensors(m, m.hidden_size)
    if not moe:
        return out + _mlp_tensors(m, ffn_size(m), tp)
    e = m.moe
    assert e is not None
    out.append(Tensor(e.num_experts * m.hidden_size))  # the router
    for _ in range(e.num_experts // ep):  # expert-parallel only when experts are split over ranks
        out += _mlp_tensors(m, e.ffn_hidden_size or ffn_size(m), tp, expert=ep > 1)
    if e.shared_expert_ffn_hidden_size:
        out += _mlp_tensors(m, e.shared_expert_ffn_hidden_size, tp)
    return out


def stage_tensors(m: ModelSettings, vocab_size: int, tp: int, pp: int, ep: int, stage: int) -> list[Tensor]:
    """Every parameter tensor of one rank of pipeline stage `stage`, in GPTModel.named_parameters() order."""
    vocab = padded_vocab_size(vocab_size, m.make_vocab_size_divisible_by, tp) // tp * m.hidden_size
    tied_across = m.share_embeddings_and_output_weights and pp > 1
    out: list[Tensor] = []
    if stage == 0:
        out.append(Tensor(vocab, shared_embedding=tied_across))
        if m.position_embedding_type == "learned_absolute":
            out.append(Tensor((m.max_position_embeddings or m.seq_length) * m.hidden_size))
    dense = m.moe.dense_layers if m.moe is not None else m.num_layers
    per_stage = m.num_layers // pp
    for i in range(stage * per_stage, (stage + 1) * per_stage):
        out += layer_tensors(m, tp, ep, moe=i >= dense)
    if stage == pp - 1:
        out += _norm_tensors(m, m.hidden_size)
        if not m.share_embeddings_and_output_weights or stage != 0:
            out.append(Tensor(vocab, shared_embedding=tied_across))
    return out
