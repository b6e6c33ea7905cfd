"""LoRA for `flagscale train` (`train.model.lora`): low-rank adapters on megatron.core's tensor-parallel linears.

A targeted layer computes `W x + (alpha / rank) * B A dropout(x)`; W (and every other base weight) is frozen:
requires_grad False, so Megatron's DDP gives it no gradient buffer and its optimizer leaves it out. B starts at
zero (the adapted model starts as the base model), A as PEFT's default (Kaiming-uniform, a=sqrt(5)).

Tensor parallelism, as the base layer is split:
* column-parallel (linear_qkv, linear_fc1: output rows split): A [rank, in] replicated, B [out / TP, rank] split
  along the output like W. The adapter's hidden `A x` goes through megatron's copy-to-TP region, whose backward
  all-reduces its gradient: A's gradient and the input's then sum over every rank's output rows.
* row-parallel (linear_proj, linear_fc2: input columns split): A [rank, in / TP] split along the input like W,
  B [out, rank] replicated. `A x` is a partial sum on each rank, all-reduced (megatron's reduce-from-TP region)
  before B, as the base layer's output is.

The adapters are parameters `lora_A` / `lora_B` of the linear itself (its class is swapped for a subclass that
adds them), so the base weight keeps its name in checkpoints (`...linear_qkv.weight`) and a checkpoint made by
`flagscale checkpoint import` loads into an adapted model; the adapters save as `...linear_qkv.lora_A` /
`lora_B`, sharded like the weight (fc1's B as [gate; up], as megatron.core saves fc1's weight). Dense families
with the local layer spec only (no MoE/MLA: their experts and attention are other modules; sequence parallelism
would need the adapter's input gathered).

Only the standard library loads at import: the settings validation uses this module too.
"""

from __future__ import annotations

import math
from typing import Any

from flagscale.errors import ConfigError

ADAPTERS = ("lora_A", "lora_B")
# megatron.core's linear layers of a transformer layer (local spec) and how tensor parallelism splits them
COLUMN, ROW = ("linear_qkv", "linear_fc1"), ("linear_proj", "linear_fc2")
TARGETS = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")
# HF names of the same layers: megatron fuses q/k/v into linear_qkv and gate/up into linear_fc1
HF_NAMES = {
    "linear_qkv": ("q_proj", "k_proj", "v_proj"),
    "linear_proj": ("o_proj",),
    "linear_fc1": ("gate_proj", "up_proj"),
    "linear_fc2": ("down_proj",),
}
LORA_FAMILIES = ("gpt", "llama", "qwen2", "qwen3")


def megatron_targets(names: tuple[str, ...], where: str = "train.model.lora") -> tuple[str, ...]:
    """The megatron layers `target_modules` names, in megatron's order. HF names must cover a fused layer whole:
    an adapter on linear_qkv adapts q, k and v together."""
    hf_of = {hf: target for target, hfs in HF_NAMES.items() for hf in hfs}
    unknown = [n for n in names if n not in TARGETS and n not in hf_of]
    if unknown:
        available = ", ".join([*TARGETS, *hf_of])
        raise ConfigError(f"{where}.target_modules: {', '.join(unknown)} matches no module; available: {available}")
    if not names:
        raise ConfigError(f"{where}.target_modules is empty: name at least one of {', '.join(TARGETS)}")
    chosen = set(names)
    for target, hfs in HF_NAMES.items():
        given = [h for h in hfs if h in chosen]
        if given and len(given) < len(hfs):
            raise ConfigError(
                f"{where}.target_modules: {', '.join(given)} without {', '.join(h for h in hfs if h not in chosen)}: "
                f"megatron fuses {' + '.join(hfs)} into one layer ({target}); list all of them, or {target}"
            )
        if given:
            chosen.add(target)
    return tuple(t for t in TARGETS if t in chosen)


def validate(m: Any, where: str) -> None:
    """`train.model.lora` against the model settings (no torch)."""
    if m.family not in LORA_FAMILIES or m.moe is not None or m.mla is not None:
        raise ConfigError(
            f"{where}.model.lora: LoRA adapts the dense families ({', '.join(LORA_FAMILIES)}); "
            f"family {m.family} is not one of them"
        )
    megatron_targets(m.lora.target_modules, f"{where}.model.lora")


def record(lora: Any) -> dict[str, Any]:
    """What checkpoints record about the adapters (`flagscale_model.lora`): export rebuilds them from it."""
    return {
        "rank": lora.rank,
        "alpha": float(lora.alpha),
        "dropout": float(lora.dropout),
        "target_modules": list(megatron_targets(tuple(lora.target_modules))),
    }


def is_adapter(name: str) -> bool:
    """A parameter or checkpoint key of an adapter."""
    return name.rsplit(".", 1)[-1] in ADAPTERS


# ------------------------------------------------------------------------------------ torch side
_CLASSES: dict[type, type] = {}


def _adapted_class(base: Any) -> type:
    """`base` (a megatron linear class) with adapters: forward adds the low-rank term, the sharded state dict
    holds the adapters sharded like the weight."""
    if base in _CLASSES:
        return _CLASSES[base]

    def forward(self, input_, *args, **kwargs):
        output, bias = base.forward(self, input_, *args, **kwargs)
        return output + _low_rank(self, input_), bias

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        return _sharded_state_dict(self, prefix, sharded_offsets, metadata)

    cls = type(f"LoRA{base.__name__}", (base,), {"forward": forward, "sharded_state_dict": sharded_state_dict})
    _CLASSES[base] = cls
    return cls


def _low_rank(layer, x):
    from megatron.core.tensor_parallel.mappings import (
        copy_to_tensor_model_parallel_region,
        reduce_from_tensor_model_parallel_region,
    )

    h = layer.lora_dropout(x) @ layer.lora_A.t()
    if layer.lora_parallel == "column":
        h = copy_to_tensor_model_parallel_region(h)  # backward: A's and x's gradients summed over output shards
    else:
        h = reduce_from_tensor_model_parallel_region(h)  # the partial sums of the input shards
    return (h @ layer.lora_B.t()) * layer.lora_scaling


def _sharded_state_dict(layer, prefix, sharded_offsets, metadata):
    from megatron.core.transformer.mlp import apply_swiglu_sharded_factory
    from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

    column = layer.lora_parallel == "column"
    axes = {"weight": 0, "bias": 0, "lora_B": 0} if column else {"weight": 1, "lora_A": 1}
    state = layer.state_dict(prefix="", keep_vars=True)
    kwargs = {}
    if metadata is not None and "dp_cp_group" in metadata:
        kwargs = {"tp_group": layer.tp_group, "dp_cp_group": metadata["dp_cp_group"]}
    sharded = make_sharded_tensors_for_checkpoint(state, prefix, axes, sharded_offsets, **kwargs)
    if layer.lora_swiglu:  # as megatron's MLP saves fc1's weight: [gate; up] whatever the TP
        singleton = (metadata or {}).get("singleton_local_shards", False)
        key = f"{prefix}lora_B"
        sharded[key] = apply_swiglu_sharded_factory(sharded[key], sharded_offsets, singleton)
    return sharded


def _attach(layer, name: str, rank: int, alpha: float, dropout: float, swiglu: bool) -> None:
    import torch

    column = name in COLUMN
    weight = layer.weight  # [out / TP, in] (column) or [out, in / TP] (row)
    out_features, in_features = weight.shape
    layer.__class__ = _adapted_class(type(layer))
    layer.lora_parallel = "column" if column else "row"
    layer.lora_swiglu = swiglu and name == "linear_fc1"
    layer.lora_scaling = alpha / rank
    layer.lora_dropout = torch.nn.Dropout(dropout) if dropout > 0 else torch.nn.Identity()
    a = torch.empty(rank, in_features, dtype=weight.dtype, device=weight.device)
    if column:
        # A is replicated: every TP rank draws the same one (torch's RNG is seeded alike on every rank)
        torch.nn.init.kaiming_uniform_(a, a=math.sqrt(5))
    else:  # A is split along the input: each rank its columns of one TP=1 draw, so any TP starts alike
        from megatron.core import parallel_state as ps

        tp, r = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
        whole = torch.empty(rank, in_features * tp, dtype=weight.dtype, device=weight.device)
        torch.nn.init.kaiming_uniform_(whole, a=math.sqrt(5))
        a.copy_(whole[:, r * in_features : (r + 1) * in_features])
    layer.lora_A = torch.nn.Parameter(a)
    layer.lora_B = torch.nn.Parameter(torch.zeros(out_features, rank, dtype=weight.dtype, device=weight.device))
    for param in (layer.lora_A, layer.lora_B):
        # megatron's grad-norm and checkpoint code read these attributes of tensor-parallel parameters
        split = (param is layer.lora_B) if column else (param is layer.lora_A)
        param.tensor_model_parallel = split
        param.partition_dim = (0 if column else 1) if split else -1
        param.partition_stride = 1


def apply(model, lora: dict[str, Any]) -> list[str]:
    """Freeze every parameter of `model` (a GPTModel stage) and attach adapters to the targeted linears;
    `lora` is `record(...)`'s dict. Returns the adapted layers' names; a target that matches no layer of this
    model fails with one line naming the layers it has."""
    targets = set(lora["target_modules"])
    swiglu = model.config.gated_linear_unit
    for param in model.parameters():
        param.requires_grad = False
    found: set[str] = set()
    adapted = []
    for name, module in list(model.named_modules()):
        leaf = name.rsplit(".", 1)[-1]
        if leaf in TARGETS and getattr(module, "weight", None) is not None:
            found.add(leaf)
            if leaf in targets:
                _attach(module, leaf, lora["rank"], lora["alpha"], lora["dropout"], swiglu)
                adapted.append(name)
    missing = targets - found
    # a pipeline stage may hold no layers of a kind only when it holds no transformer layers at all
    if missing and found:
        raise ConfigError(
            f"train.model.lora.target_modules: {', '.join(sorted(missing))} matches no module of this model; "
            f"available: {', '.join(t for t in TARGETS if t in found)}"
        )
    return adapted
