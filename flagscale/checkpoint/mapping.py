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

The MoE families (qwen3_moe, mixtral, deepseek_v3) add, in their MoE layers (megatron.core's MoELayer with
SequentialMLP experts):
* mlp.router.weight (and deepseek_v3's mlp.router.expert_bias, a buffer: HF e_score_correction_bias): whole.
* mlp.experts.local_experts.{i}: expert parallelism gives EP rank e the experts [e*L, (e+1)*L) (L = experts / EP)
  as its local experts 0..L-1; each is split over the expert-tensor-parallel ranks like a dense MLP (`expert`).
* mlp.shared_experts (deepseek_v3): a dense SwiGLU MLP, tensor-parallel like the dense one.
and deepseek_v3's multi-latent attention (MLASelfAttention, local spec: every projection column-parallel):
linear_q_down_proj / linear_q_up_proj (or linear_q_proj without q_lora_rank), linear_kv_down_proj,
linear_kv_up_proj: rows split evenly; q_layernorm / kv_layernorm (the latents' norms): whole. The row layouts
are transformers' own (per head [nope, rope] of q_b_proj, [nope, v] of kv_b_proj; [latent, rope] of
kv_a_proj_with_mqa), and megatron.core reads RoPE rows interleaved as transformers does with rope_interleave.

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
    expert: bool = False  # an expert's weight: split over the expert-tensor-parallel ranks

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
    moe: dict[str, Any] | None = None  # architecture()'s model.moe (ffn_hidden_size resolved)
    mla: dict[str, Any] | None = None

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
            moe=arch.get("moe"),
            mla=arch.get("mla"),
        )

    def is_moe_layer(self, layer: int) -> bool:
        return self.moe is not None and layer >= self.moe["dense_layers"]

    @property
    def experts(self) -> int:
        return self.moe["num_experts"] if self.moe else 0

    @property
    def mlp_prefix(self) -> str:
        """Where an HF MoE layer keeps its router and experts (Mixtral's own name)."""
        return "block_sparse_moe." if self.family == "mixtral" else "mlp."


# HF names of an expert's [gate, up, down] projections
_EXPERT_NAMES = {"mixtral": ("w1", "w3", "w2")}
_SWIGLU_NAMES = ("gate_proj", "up_proj", "down_proj")


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


def _swiglu(m: str, hf: str, ffn: int, names: tuple[str, str, str] = _SWIGLU_NAMES, expert: bool = False):
    """A SwiGLU MLP: fc1 = [gate; up] (each split over TP), fc2 = down (its columns split)."""
    gate, up, down = (f"{hf}{n}.weight" for n in names)
    return [
        TensorMap(m + "linear_fc1.weight", 0, ((Piece(gate, 0, ffn),), (Piece(up, 0, ffn),)), expert=expert),
        TensorMap(m + "linear_fc2.weight", 1, ((Piece(down, 0, ffn),),), expert=expert),
    ]


def _attention_maps(s: Sizes, m: str, attn: str) -> list[TensorMap]:
    if s.mla is not None:
        return _mla_maps(s, m, attn)
    maps = [
        _qkv(m + "linear_qkv.weight", attn, "weight", s),
        _split(m + "linear_proj.weight", attn + "o_proj.weight", s.heads * s.head_dim, dim=1),
    ]
    if s.family == "qwen2":
        maps.append(_qkv(m + "linear_qkv.bias", attn, "bias", s))
    if s.family in ("qwen3", "qwen3_moe"):
        maps.append(_whole(m + "q_layernorm.weight", attn + "q_norm.weight", s.head_dim))
        maps.append(_whole(m + "k_layernorm.weight", attn + "k_norm.weight", s.head_dim))
    return maps


def _mla_maps(s: Sizes, m: str, attn: str) -> list[TensorMap]:
    a = s.mla
    assert a is not None
    q_rows = s.heads * (a["qk_head_dim"] + a["qk_pos_emb_head_dim"])
    maps = [
        _split(
            m + "linear_kv_down_proj.weight",
            attn + "kv_a_proj_with_mqa.weight",
            a["kv_lora_rank"] + a["qk_pos_emb_head_dim"],
        ),
        _whole(m + "kv_layernorm.weight", attn + "kv_a_layernorm.weight", a["kv_lora_rank"]),
        _split(
            m + "linear_kv_up_proj.weight", attn + "kv_b_proj.weight", s.heads * (a["qk_head_dim"] + a["v_head_dim"])
        ),
        _split(m + "linear_proj.weight", attn + "o_proj.weight", s.heads * a["v_head_dim"], dim=1),
    ]
    if a["q_lora_rank"] is None:
        return [*maps, _split(m + "linear_q_proj.weight", attn + "q_proj.weight", q_rows)]
    return [
        *maps,
        _split(m + "linear_q_down_proj.weight", attn + "q_a_proj.weight", a["q_lora_rank"]),
        _whole(m + "q_layernorm.weight", attn + "q_a_layernorm.weight", a["q_lora_rank"]),
        _split(m + "linear_q_up_proj.weight", attn + "q_b_proj.weight", q_rows),
    ]


def _moe_maps(s: Sizes, m: str, hf: str, ep_rank: int, ep: int) -> list[TensorMap]:
    """A MoE layer on expert-parallel rank `ep_rank` of `ep`: the router, this rank's experts, shared experts."""
    moe, block = s.moe, hf + s.mlp_prefix
    assert moe is not None
    maps = [_whole(m + "router.weight", block + "gate.weight", s.experts)]
    if moe["router_expert_bias"]:
        maps.append(_whole(m + "router.expert_bias", block + "gate.e_score_correction_bias", s.experts))
    local = s.experts // ep
    names = _EXPERT_NAMES.get(s.family, _SWIGLU_NAMES)
    for i in range(local):
        expert = f"{block}experts.{ep_rank * local + i}."
        maps += _swiglu(f"{m}experts.local_experts.{i}.", expert, moe["ffn_hidden_size"], names, expert=True)
    if moe["shared_expert_ffn_hidden_size"]:
        maps += _swiglu(m + "shared_experts.", block + "shared_experts.", moe["shared_expert_ffn_hidden_size"])
    return maps


def layer_maps(s: Sizes, layer: int, local: int, ep_rank: int = 0, ep: int = 1) -> list[TensorMap]:
    """The maps of HF layer `layer`, which is layer `local` of this pipeline stage (on expert-parallel rank
    `ep_rank` of `ep`, for a MoE layer)."""
    m, hf = f"decoder.layers.{local}.", f"model.layers.{layer}."
    maps = [
        _whole(m + "input_layernorm.weight", hf + "input_layernorm.weight", s.hidden),
        *_attention_maps(s, m + "self_attention.", hf + "self_attn."),
        _whole(m + "pre_mlp_layernorm.weight", hf + "post_attention_layernorm.weight", s.hidden),
    ]
    if s.is_moe_layer(layer):
        return maps + _moe_maps(s, m + "mlp.", hf, ep_rank, ep)
    return maps + _swiglu(m + "mlp.", hf + "mlp.", s.ffn)


def _vocab(name: str, source: str, vocab: int, padded: int) -> TensorMap:
    pieces = (Piece(source, 0, vocab),) + ((Piece(None, 0, padded - vocab),) if padded > vocab else ())
    return TensorMap(name, 0, (pieces,))


def model_maps(
    arch: dict[str, Any],
    vocab: int,
    padded: int,
    first_layer: int,
    num_layers: int,
    pre: bool,
    post: bool,
    ep_rank: int = 0,
    ep: int = 1,
) -> list[TensorMap]:
    """Every parameter of one pipeline stage: layers [first_layer, first_layer + num_layers), the embedding on
    the first stage (`pre`), the final norm and output layer on the last (`post`); of a MoE layer, the experts
    of expert-parallel rank `ep_rank` of `ep`."""
    s = Sizes.of(arch)
    maps: list[TensorMap] = []
    if pre:
        maps.append(_vocab("embedding.word_embeddings.weight", "model.embed_tokens.weight", vocab, padded))
    for local in range(num_layers):
        maps += layer_maps(s, first_layer + local, local, ep_rank, ep)
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
        if s.mla is not None:
            layer = _mla_shapes(s)
        else:
            layer = {
                "self_attn.q_proj.weight": (q, s.hidden),
                "self_attn.k_proj.weight": (kv, s.hidden),
                "self_attn.v_proj.weight": (kv, s.hidden),
                "self_attn.o_proj.weight": (s.hidden, q),
            }
        layer.update(_moe_shapes(s) if s.is_moe_layer(i) else _swiglu_shapes("mlp.", s.ffn, s.hidden))
        layer.update({"input_layernorm.weight": (s.hidden,), "post_attention_layernorm.weight": (s.hidden,)})
        if s.family == "qwen2":
            layer.update(
                {"self_attn.q_proj.bias": (q,), "self_attn.k_proj.bias": (kv,), "self_attn.v_proj.bias": (kv,)}
            )
        if s.family in ("qwen3", "qwen3_moe"):
            layer.update({"self_attn.q_norm.weight": (s.head_dim,), "self_attn.k_norm.weight": (s.head_dim,)})
        shapes.update({p + k: v for k, v in layer.items()})
    shapes["model.norm.weight"] = (s.hidden,)
    if not s.tied:
        shapes["lm_head.weight"] = (vocab, s.hidden)
    return shapes


def _swiglu_shapes(
    prefix: str, ffn: int, hidden: int, names: tuple[str, str, str] = _SWIGLU_NAMES
) -> dict[str, tuple[int, ...]]:
    gate, up, down = names
    return {
        f"{prefix}{gate}.weight": (ffn, hidden),
        f"{prefix}{up}.weight": (ffn, hidden),
        f"{prefix}{down}.weight": (hidden, ffn),
    }


def _moe_shapes(s: Sizes) -> dict[str, tuple[int, ...]]:
    moe, block = s.moe, s.mlp_prefix
    assert moe is not None
    shapes: dict[str, tuple[int, ...]] = {block + "gate.weight": (s.experts, s.hidden)}
    if moe["router_expert_bias"]:
        shapes[block + "gate.e_score_correction_bias"] = (s.experts,)
    names = _EXPERT_NAMES.get(s.family, _SWIGLU_NAMES)
    for j in range(s.experts):
        shapes.update(_swiglu_shapes(f"{block}experts.{j}.", moe["ffn_hidden_size"], s.hidden, names))
    if moe["shared_expert_ffn_hidden_size"]:
        shapes.update(_swiglu_shapes(block + "shared_experts.", moe["shared_expert_ffn_hidden_size"], s.hidden))
    return shapes


def _mla_shapes(s: Sizes) -> dict[str, tuple[int, ...]]:
    a = s.mla
    assert a is not None
    q_rows = s.heads * (a["qk_head_dim"] + a["qk_pos_emb_head_dim"])
    shapes: dict[str, tuple[int, ...]] = {}
    if a["q_lora_rank"] is None:
        shapes["self_attn.q_proj.weight"] = (q_rows, s.hidden)
    else:
        shapes.update(
            {
                "self_attn.q_a_proj.weight": (a["q_lora_rank"], s.hidden),
                "self_attn.q_a_layernorm.weight": (a["q_lora_rank"],),
                "self_attn.q_b_proj.weight": (q_rows, a["q_lora_rank"]),
            }
        )
    shapes.update(
        {
            "self_attn.kv_a_proj_with_mqa.weight": (a["kv_lora_rank"] + a["qk_pos_emb_head_dim"], s.hidden),
            "self_attn.kv_a_layernorm.weight": (a["kv_lora_rank"],),
            "self_attn.kv_b_proj.weight": (s.heads * (a["qk_head_dim"] + a["v_head_dim"]), a["kv_lora_rank"]),
            "self_attn.o_proj.weight": (s.hidden, s.heads * a["v_head_dim"]),
        }
    )
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
