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

    @property
    def total(self) -> int:
        return self.embedding + self.layers * self.per_layer + self.head


def _norm(m: ModelSettings, size: int) -> int:
    """A LayerNorm has a weight and a bias, an RMSNorm only a weight."""
    return size * (2 if structure(m.family).normalization == "LayerNorm" else 1)


def layer_parameters(m: ModelSettings, tp: int) -> int:
    """One transformer layer's parameters on one TP rank."""
    s = structure(m.family)
    hd, heads, groups, ffn = head_dim(m), m.num_attention_heads, query_groups(m), ffn_size(m)
    qkv_out = (heads + 2 * groups) * hd // tp
    attention = qkv_out * m.hidden_size + m.hidden_size * heads * hd // tp
    if s.linear_bias or s.qkv_bias:
        attention += qkv_out
    if s.linear_bias:
        attention += m.hidden_size  # the row-parallel projection's bias is whole on every rank
    if s.qk_norm:
        attention += 2 * _norm(m, hd)
    fc1_out = (2 if s.swiglu else 1) * ffn // tp
    mlp = fc1_out * m.hidden_size + m.hidden_size * ffn // tp
    if s.linear_bias:
        mlp += fc1_out + m.hidden_size
    return _norm(m, m.hidden_size) + attention + _norm(m, m.hidden_size) + mlp


def stage_parameters(m: ModelSettings, vocab_size: int, tp: int, pp: int) -> list[StageParameters]:
    """Every pipeline stage's parameters per TP rank, first stage first."""
    vocab = padded_vocab_size(vocab_size, m.make_vocab_size_divisible_by, tp) // tp * m.hidden_size
    positions = (m.max_position_embeddings or m.seq_length) * m.hidden_size
    per_layer = layer_parameters(m, tp)
    stages = []
    for stage in range(pp):
        first, last = stage == 0, stage == pp - 1
        embedding = (vocab + (positions if m.position_embedding_type == "learned_absolute" else 0)) if first else 0
        head = 0
        if last:
            head = _norm(m, m.hidden_size)
            # a tied output layer reuses the embedding on a single stage; the last of several keeps a copy
            if not m.share_embeddings_and_output_weights or not first:
                head += vocab
        stages.append(StageParameters(stage, m.num_layers // pp, embedding, per_layer, head))
    return stages


def total_parameters(m: ModelSettings, vocab_size: int) -> int:
    """The model's parameters at TP=1, PP=1, counted once (the padded vocabulary included)."""
    return stage_parameters(m, vocab_size, 1, 1)[0].total
