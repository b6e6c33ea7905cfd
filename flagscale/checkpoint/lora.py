"""`flagscale checkpoint export` of a LoRA run (`train.model.lora`): merged HF weights or a PEFT adapter folder.

The export streams as for any checkpoint (flagscale.checkpoint.worker.stream_export): the model is built on the
meta device with the adapters the checkpoint records (`flagscale_model.lora`), and parameters are read a layer at a
time at TP=1 (distributed checkpointing reshards adapters saved at any TP, fc1's B as [gate; up]).

* merged (`--lora merged`, the default): each weight with an adapter is read with its A and B and written as
  W + alpha / rank * B @ A (`merging`) through the ordinary export mapping: an HF folder of the base architecture.
* adapter (`--lora adapter`): adapter_config.json (peft's LoraConfig) and adapter_model.safetensors with PEFT's
  key names, for `peft.PeftModel.from_pretrained(base, folder)`; the base is the HF model the run started from
  (recorded as base_model_name_or_path). Megatron's fused layers map exactly onto PEFT's per-projection LoRAs:
  linear_qkv's A is q_proj's, k_proj's and v_proj's lora_A alike (one shared A), and its B's rows split into
  their lora_B by the same query-group layout as the weight; linear_fc1's B splits into gate_proj's and
  up_proj's lora_B, its A shared. Row-parallel linear_proj / linear_fc2 map onto o_proj / down_proj directly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from flagscale.checkpoint import mapping
from flagscale.errors import ConfigError
from flagscale.train import lora as train_lora

MODES = ("merged", "adapter")
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."


def export_adapter(loader, info: dict[str, Any], out: Path, root: str) -> dict[str, Any]:
    """`--lora adapter`: the PEFT folder of a LoRA checkpoint (`loader`: its parameters at TP=1); the export's
    result."""
    if not info.get("lora"):
        raise ConfigError(f"{root}: the checkpoint has no LoRA adapters (not a train.model.lora run): drop --lora")
    return write_adapter(adapters_of(loader), info, out)


def base_weights(named: dict[str, Any]) -> dict[str, Any]:
    """The parameters the export mapping covers: all but the adapters."""
    return {name: p for name, p in named.items() if not train_lora.is_adapter(name)}


def merged_weight(weight, a, b, scaling: float):
    """W + scaling * B @ A, computed in float64 and returned in W's dtype."""
    return (weight.double() + (b.double() @ a.double()) * scaling).to(weight.dtype)


class _Merging:
    """A parameter loader (worker._ParamLoader: `pending`, `take`) whose weights come with their adapters merged."""

    def __init__(self, loader, scaling: float) -> None:
        self.loader, self.scaling = loader, scaling

    @property
    def pending(self) -> set[str]:
        return self.loader.pending

    def take(self, name: str):
        value = self.loader.take(name)
        layer = name.removesuffix(".weight")
        if name.endswith(".weight") and f"{layer}.lora_A" in self.loader.pending:
            a, b = self.loader.take(f"{layer}.lora_A"), self.loader.take(f"{layer}.lora_B")
            value = merged_weight(value, a, b, self.scaling)
        return value


def merging(loader, info: dict[str, Any]):
    """`loader` for a checkpoint's export: merging its adapters into their weights when it has any."""
    record = info.get("lora")
    return _Merging(loader, record["alpha"] / record["rank"]) if record else loader


def adapters_of(loader) -> dict[str, Any]:
    """Only the adapters of a parameter loader (its base weights are never read)."""
    names = sorted(n for n in loader.shapes if train_lora.is_adapter(n))
    loader.pending = set(names)  # a layer's load then reads just its adapters
    return {name: loader.take(name) for name in names}


def peft_name(source: str, part: str) -> str:
    """PEFT's key for the `part` (lora_A / lora_B) of the HF weight `source` (`...q_proj.weight`)."""
    return f"{PEFT_PREFIX}{source.removesuffix('.weight')}.{part}.weight"


def hf_targets(megatron: list[str]) -> list[str]:
    return [hf for target in megatron for hf in train_lora.HF_NAMES[target]]


def adapter_tensors(adapters: dict[str, Any], info: dict[str, Any]) -> dict[str, Any]:
    """PEFT's tensors from a whole (TP=1) model's adapters, `{megatron param name: tensor}` (`...lora_A` /
    `...lora_B`), placed by the export mapping of the weights they adapt."""
    import torch

    arch, vocab = info["architecture"], info["vocab_size"]
    shapes = mapping.hf_shapes(arch, vocab)
    every = mapping.model_maps(arch, vocab, info["padded_vocab_size"], 0, arch["num_layers"], True, True)
    maps = {m.megatron: m for m in every}
    out: dict[str, Any] = {}
    covered: dict[str, int] = {}
    expected: dict[str, int] = {}  # rows each split tensor must receive
    with torch.no_grad():
        for name in sorted({n.rsplit(".", 1)[0] for n in adapters}):
            a, b = adapters[f"{name}.lora_A"], adapters[f"{name}.lora_B"]
            tmap = maps[f"{name}.weight"]
            pieces = [(p.source, p) for p in tmap.shard(0, 1) if p.source is not None]
            column = name.rsplit(".", 1)[-1] in train_lora.COLUMN
            shared, split = ("lora_A", "lora_B") if column else ("lora_B", "lora_A")
            for source in dict.fromkeys(source for source, _ in pieces):
                # the shared factor: one tensor for every projection of a fused layer
                out[peft_name(source, shared)] = (a if column else b).detach().clone()
                rows = shapes[source][tmap.dim]
                shape = (rows, b.shape[1]) if column else (a.shape[0], rows)
                out[peft_name(source, split)] = torch.empty(shape, dtype=a.dtype)
                expected[peft_name(source, split)] = rows
            renamed = [mapping.Piece(peft_name(source, split), p.start, p.stop) for source, p in pieces]
            mapping.scatter(b if column else a, renamed, tmap.dim, out, covered)
    short = sorted(n for n, rows in expected.items() if covered.get(n) != rows)
    if short:
        raise ValueError(f"the mapping leaves LoRA tensors incomplete: {short}")
    return out


def write_adapter(adapters: dict[str, Any], info: dict[str, Any], out: Path) -> dict[str, Any]:
    """adapter_config.json, adapter_model.safetensors and the tokenizer files in `out`, from a whole (TP=1) model's
    adapters `{megatron name: tensor}`."""
    from peft import LoraConfig
    from safetensors.torch import save_file

    record = info["lora"]
    tensors = adapter_tensors(adapters, info)
    save_file({k: v.contiguous() for k, v in sorted(tensors.items())}, str(out / ADAPTER_WEIGHTS), {"format": "pt"})
    alpha = record["alpha"]
    config = LoraConfig(
        r=record["rank"],
        lora_alpha=int(alpha) if float(alpha).is_integer() else alpha,
        lora_dropout=record["dropout"],
        target_modules=hf_targets(record["target_modules"]),
        bias="none",
        task_type="CAUSAL_LM",
        base_model_name_or_path=(info.get("hf") or {}).get("source"),
    )
    config.save_pretrained(str(out))  # adapter_config.json
    from flagscale.checkpoint.worker import _copy_tokenizer  # here: the worker imports this module

    copied, source = _copy_tokenizer(info, out)  # users load the tokenizer from the adapter folder too
    return {
        "family": info["architecture"]["family"],
        "files": [ADAPTER_CONFIG, ADAPTER_WEIGHTS, *copied],
        "tokenizer_from": source,
    }
