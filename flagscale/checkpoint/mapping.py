"""Which rows of which Hugging Face tensors make each Megatron parameter, on each tensor-parallel rank.

One table serves both directions. A `TensorMap` describes a parameter of megatron.core's local-spec GPTModel
(its name in the module's state dict) as sections laid end to end along one dimension; each section is a run of
`Piece`s, row ranges of HF tensors (or zero rows: vocabulary padding). Tensor parallelism splits every section
evenly and rank r holds the r-th part of each, concatenated, which is how megatron.core shards them:

* linear_qkv (column-parallel): one section, query group by query group: [q heads of the group, k, v]. A rank
  holds whole groups (query groups divide by TP), so its rows are its groups' q, k and v rows.
* linear_fc1 (column-parallel, SwiGLU): two sections, [gate; up]: a rank holds [gate part; up part].
* linear_proj, linear_fc2 (row-parallel): one section along the input dimension (dim 1).
* word embeddings, output layer (vocab-parallel): one section of the vocabulary followed by zero padding
  rows up to the padded size (make_vocab_size_divisible_by x TP).
* norms (input_layernorm, pre_mlp_layernorm, q/k layernorm, final layernorm): whole on every rank.

Import reads a rank's pieces (`TensorMap.shard`) with safetensors slices; export walks the TP=1 pieces of a
fully loaded model and writes each into its HF tensor. Pure Python: torch only inside the functions that
copy tensors.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Piece:
    source: str | None  # HF tensor name; None: zero rows (vocabulary padding)
    start: int  # rows [start, stop) of the source along the map's dimension
    stop: int

    @property
    def size(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class TensorMap:
    megatron: str  # the parameter's name in the Megatron module's state dict (local layer numbers)
    dim: int  # the dimension the sections run along (and tensor parallelism splits)
    sections: tuple[tuple[Piece, ...], ...]
    parallel: bool = True  # False: the whole tensor on every rank

    def shard(self, rank: int, size: int) -> list[Piece]:
        """The pieces rank `rank` of `size` tensor-parallel ranks holds, in order."""
        if not self.parallel:
            return [piece for section in self.sections for piece in section]
        pieces: list[Piece] = []
        for section in self.sections:
            total = sum(p.size for p in section)
            part = total // size
            pieces += _cut(section, rank * part, (rank + 1) * part)
        return pieces


def _cut(section: tuple[Piece, ...], start: int, stop: int) -> list[Piece]:
    """Rows [start, stop) of a section as pieces."""
    out, offset = [], 0
    for p in section:
        lo, hi = max(start, offset), min(stop, offset + p.size)
        if lo < hi:
            out.append(Piece(p.source, p.start + lo - offset, p.start + hi - offset))
        offset += p.size
    return out


@dataclass(frozen=True)
class Sizes:
    """The sizes the maps need, from an architecture (flagscale.train.families.architecture)."""

    family: str
    hidden: int
    layers: int
    heads: int
    groups: int
    head_dim: int
    ffn: int
    tied: bool

    @classmethod
    def of(cls, arch: dict[str, Any]) -> Sizes:
        return cls(
            family=arch["family"],
            hidden=arch["hidden_size"],
            layers=arch["num_layers"],
            heads=arch["num_attention_heads"],
            groups=arch["num_query_groups"],
            head_dim=arch["kv_channels"],
            ffn=arch["ffn_hidden_size"],
            tied=arch["share_embeddings_and_output_weights"],
        )


def _whole(name: str, source: str, rows: int) -> TensorMap:
    return TensorMap(name, 0, ((Piece(source, 0, rows),),), parallel=False)


def _split(name: str, source: str, rows: int, dim: int = 0) -> TensorMap:
    return TensorMap(name, dim, ((Piece(source, 0, rows),),))


def _qkv(name: str, prefix: str, suffix: str, s: Sizes) -> TensorMap:
    per_group, d = s.heads // s.groups, s.head_dim
    pieces: list[Piece] = []
    for g in range(s.groups):
        pieces.append(Piece(f"{prefix}q_proj.{suffix}", g * per_group * d, (g + 1) * per_group * d))
        pieces.append(Piece(f"{prefix}k_proj.{suffix}", g * d, (g + 1) * d))
        pieces.append(Piece(f"{prefix}v_proj.{suffix}", g * d, (g + 1) * d))
    return TensorMap(name, 0, (tuple(pieces),))


def layer_maps(s: Sizes, layer: int, local: int) -> list[TensorMap]:
    """The maps of HF layer `layer`, which is layer `local` of this pipeline stage."""
    m, hf = f"decoder.layers.{local}.", f"model.layers.{layer}."
    attn = hf + "self_attn."
    maps = [
        _whole(m + "input_layernorm.weight", hf + "input_layernorm.weight", s.hidden),
        _qkv(m + "self_attention.linear_qkv.weight", attn, "weight", s),
        _split(m + "self_attention.linear_proj.weight", attn + "o_proj.weight", s.heads * s.head_dim, dim=1),
        _whole(m + "pre_mlp_layernorm.weight", hf + "post_attention_layernorm.weight", s.hidden),
        TensorMap(
            m + "mlp.linear_fc1.weight",
            0,
            ((Piece(hf + "mlp.gate_proj.weight", 0, s.ffn),), (Piece(hf + "mlp.up_proj.weight", 0, s.ffn),)),
        ),
        _split(m + "mlp.linear_fc2.weight", hf + "mlp.down_proj.weight", s.ffn, dim=1),
    ]
    if s.family == "qwen2":
        maps.append(_qkv(m + "self_attention.linear_qkv.bias", attn, "bias", s))
    if s.family == "qwen3":
        maps.append(_whole(m + "self_attention.q_layernorm.weight", attn + "q_norm.weight", s.head_dim))
        maps.append(_whole(m + "self_attention.k_layernorm.weight", attn + "k_norm.weight", s.head_dim))
    return maps


def _vocab(name: str, source: str, vocab: int, padded: int) -> TensorMap:
    pieces = (Piece(source, 0, vocab),) + ((Piece(None, 0, padded - vocab),) if padded > vocab else ())
    return TensorMap(name, 0, (pieces,))


def model_maps(
    arch: dict[str, Any], vocab: int, padded: int, first_layer: int, num_layers: int, pre: bool, post: bool
) -> list[TensorMap]:
    """Every parameter of one pipeline stage: layers [first_layer, first_layer + num_layers), the embedding on
    the first stage (`pre`), the final norm and output layer on the last (`post`)."""
    s = Sizes.of(arch)
    maps: list[TensorMap] = []
    if pre:
        maps.append(_vocab("embedding.word_embeddings.weight", "model.embed_tokens.weight", vocab, padded))
    for local in range(num_layers):
        maps += layer_maps(s, first_layer + local, local)
    if post:
        maps.append(_whole("decoder.final_layernorm.weight", "model.norm.weight", s.hidden))
        # tied: the first stage's embedding is the output layer; a later last stage keeps a copy of it
        if not (s.tied and pre):
            source = "model.embed_tokens.weight" if s.tied else "lm_head.weight"
            maps.append(_vocab("output_layer.weight", source, vocab, padded))
    return maps


def hf_shapes(arch: dict[str, Any], vocab: int) -> dict[str, tuple[int, ...]]:
    """Every tensor of the HF checkpoint and its shape, in the order transformers saves them."""
    s = Sizes.of(arch)
    q, kv = s.heads * s.head_dim, s.groups * s.head_dim
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, s.hidden)}
    for i in range(s.layers):
        p = f"model.layers.{i}."
        layer = {
            "self_attn.q_proj.weight": (q, s.hidden),
            "self_attn.k_proj.weight": (kv, s.hidden),
            "self_attn.v_proj.weight": (kv, s.hidden),
            "self_attn.o_proj.weight": (s.hidden, q),
            "mlp.gate_proj.weight": (s.ffn, s.hidden),
            "mlp.up_proj.weight": (s.ffn, s.hidden),
            "mlp.down_proj.weight": (s.hidden, s.ffn),
            "input_layernorm.weight": (s.hidden,),
            "post_attention_layernorm.weight": (s.hidden,),
        }
        if s.family == "qwen2":
            layer.update(
                {"self_attn.q_proj.bias": (q,), "self_attn.k_proj.bias": (kv,), "self_attn.v_proj.bias": (kv,)}
            )
        if s.family == "qwen3":
            layer.update({"self_attn.q_norm.weight": (s.head_dim,), "self_attn.k_norm.weight": (s.head_dim,)})
        shapes.update({p + k: v for k, v in layer.items()})
    shapes["model.norm.weight"] = (s.hidden,)
    if not s.tied:
        shapes["lm_head.weight"] = (vocab, s.hidden)
    return shapes


# ------------------------------------------------------------------------------ copying (torch)
def fill(target, pieces: list[Piece], dim: int, read: Callable[[Piece, int], Any]) -> None:
    """Write `pieces` (read with `read(piece, dim)`) end to end along `dim` into tensor `target`."""
    offset = 0
    for piece in pieces:
        part = target.narrow(dim, offset, piece.size)
        if piece.source is None:
            part.zero_()
        else:
            value = read(piece, dim)
            if tuple(value.shape) != tuple(part.shape):
                raise ValueError(f"{piece.source}[{piece.start}:{piece.stop}] has shape {list(value.shape)}")
            part.copy_(value)
        offset += piece.size
    if offset != target.shape[dim]:
        raise ValueError(f"the pieces cover {offset} of {target.shape[dim]} rows")


def scatter(value, pieces: list[Piece], dim: int, hf: dict[str, Any], covered: dict[str, int]) -> None:
    """The inverse of `fill`: write the rows of Megatron tensor `value` into the HF tensors they came from,
    counting the rows each HF tensor received in `covered` (padding rows are dropped)."""
    offset = 0
    for piece in pieces:
        if piece.source is not None:
            hf[piece.source].narrow(dim, piece.start, piece.size).copy_(value.narrow(dim, offset, piece.size))
            covered[piece.source] = covered.get(piece.source, 0) + piece.size
        offset += piece.size
    if offset != value.shape[dim]:
        raise ValueError(f"the pieces cover {offset} of {value.shape[dim]} rows")
