"""A Hugging Face model folder as FlagScale reads and writes it: config.json <-> `train.model` settings, the
safetensors shards (their headers: names, dtypes, shapes, read without torch), and the files export copies.

Supported: the dense decoder families of flagscale/train/families.py. A config.json that asks for something
megatron.core's local spec does not compute the same way (another activation, biases on every linear, sliding
windows, a RoPE scaling other than Llama 3's with megatron.core's fixed factors) is refused with one line, so
an import never yields a model that silently computes something else.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flagscale.errors import ConfigError

CONFIG = "config.json"
INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
# HF architecture (config.json `architectures`) -> family, and back with its model_type
ARCHITECTURES = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3"}
HF_NAMES = {
    "llama": ("LlamaForCausalLM", "llama"),
    "qwen2": ("Qwen2ForCausalLM", "qwen2"),
    "qwen3": ("Qwen3ForCausalLM", "qwen3"),
}
# What export copies from the source folder besides weights and config.json
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)
# Llama 3's RoPE scaling as megatron.core computes it: only the factor is free
_LLAMA3_FIXED = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}


def supported() -> str:
    return ", ".join(f"{arch} ({family})" for arch, family in ARCHITECTURES.items())


# ------------------------------------------------------------------------------------- config.json
def read_config(folder: Path) -> dict[str, Any]:
    path = folder / CONFIG
    if not folder.is_dir():
        raise ConfigError(f"{folder}: no such folder (expected a Hugging Face model folder)")
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{folder}: no {CONFIG} (expected a Hugging Face model folder)") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: not JSON ({exc})") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    return config


def family_of(config: dict[str, Any], where: str, family: str | None = None) -> str:
    """The family of a config.json: its architecture's, or `family` when the caller names one."""
    if family is not None:
        if family not in HF_NAMES:
            raise ConfigError(f"--family {family}: use one of {', '.join(HF_NAMES)}")
        return family
    names = config.get("architectures") or []
    for name in names:
        if name in ARCHITECTURES:
            return ARCHITECTURES[name]
    found = ", ".join(map(str, names)) or "none"
    raise ConfigError(
        f"{where}: architecture {found} is not supported; supported: {supported()} "
        "(--family FAMILY imports a config.json of the same structure under another name)"
    )


def _required_int(config: dict[str, Any], key: str, where: str) -> int:
    value = config.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{where}: {key}={value!r}, expected a positive integer")
    return value


def _rope_scaling(scaling: Any, where: str) -> float | None:
    if scaling is None:
        return None
    if not isinstance(scaling, dict):
        raise ConfigError(f"{where}: rope_scaling={scaling!r} is not a mapping")
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "default":
        return None
    fixed = all(float(scaling.get(k, v)) == v for k, v in _LLAMA3_FIXED.items())
    if kind != "llama3" or not fixed:
        raise ConfigError(
            f"{where}: rope_scaling {scaling} is not supported: megatron.core computes Llama 3 scaling with "
            "low_freq_factor 1, high_freq_factor 4 and original_max_position_embeddings 8192 only"
        )
    return float(scaling["factor"])


def _refuse_unsupported(config: dict[str, Any], family: str, where: str) -> None:
    act = config.get("hidden_act", "silu")
    if act != "silu":
        raise ConfigError(f"{where}: hidden_act={act!r} is not supported: family {family} is SwiGLU (silu)")
    if config.get("attention_bias") and family != "qwen2":
        raise ConfigError(f"{where}: attention_bias=true (a bias on every attention projection) is not supported")
    if config.get("mlp_bias"):
        raise ConfigError(f"{where}: mlp_bias=true is not supported")
    if config.get("use_sliding_window"):
        raise ConfigError(f"{where}: use_sliding_window=true is not supported (megatron.core attends to all tokens)")


def model_settings(config: dict[str, Any], family: str, where: str) -> dict[str, Any]:
    """config.json as `train.model` settings (plain data: family, architecture, vocabulary, context)."""
    _refuse_unsupported(config, family, where)
    hidden = _required_int(config, "hidden_size", where)
    heads = _required_int(config, "num_attention_heads", where)
    groups = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or hidden // heads
    return {
        "family": family,
        "num_layers": _required_int(config, "num_hidden_layers", where),
        "hidden_size": hidden,
        "num_attention_heads": heads,
        "num_query_groups": groups,
        "kv_channels": head_dim,
        "ffn_hidden_size": _required_int(config, "intermediate_size", where),
        "max_position_embeddings": config.get("max_position_embeddings"),
        "position_embedding_type": "rope",
        "rotary_base": float(config.get("rope_theta", 10000.0)),
        "rotary_scaling_factor": _rope_scaling(config.get("rope_scaling"), where),
        "norm_epsilon": float(config.get("rms_norm_eps", 1e-6)),
        "share_embeddings_and_output_weights": bool(config.get("tie_word_embeddings", False)),
        "vocab_size": _required_int(config, "vocab_size", where),
    }


def _set(config: dict[str, Any], key: str, value: Any) -> None:
    """Set a value unless the config already holds an equal one (keeps the source's spelling, 10000 vs 1e4)."""
    if key not in config or config[key] != value:
        config[key] = value


def hf_config(info: dict[str, Any]) -> dict[str, Any]:
    """config.json for a checkpoint's model info (see flagscale.train.checkpoint): the HF source's config.json
    when it records one, with every architecture value set from the checkpoint."""
    arch, hf = info["architecture"], info.get("hf") or {}
    family = arch["family"]
    architecture, model_type = HF_NAMES[family]
    config = dict(hf.get("config") or {"torch_dtype": hf.get("dtype", "float32")})
    _set(config, "architectures", [architecture])
    _set(config, "model_type", model_type)
    _set(config, "hidden_act", "silu")
    _set(config, "vocab_size", info["vocab_size"])
    _set(config, "num_hidden_layers", arch["num_layers"])
    _set(config, "hidden_size", arch["hidden_size"])
    _set(config, "num_attention_heads", arch["num_attention_heads"])
    _set(config, "num_key_value_heads", arch["num_query_groups"])
    _set(config, "intermediate_size", arch["ffn_hidden_size"])
    if "head_dim" in config or arch["kv_channels"] != arch["hidden_size"] // arch["num_attention_heads"]:
        _set(config, "head_dim", arch["kv_channels"])
    _set(config, "rope_theta", arch["rotary_base"])
    _set(config, "rms_norm_eps", arch["norm_epsilon"])
    _set(config, "tie_word_embeddings", arch["share_embeddings_and_output_weights"])
    if "max_position_embeddings" not in config:
        config["max_position_embeddings"] = info.get("max_position_embeddings") or 4096
    factor = arch["rotary_scaling_factor"]
    if factor is None:
        if config.get("rope_scaling") is not None:
            config["rope_scaling"] = None
    elif _rope_scaling(config.get("rope_scaling"), "config.json") != factor:
        config["rope_scaling"] = {"rope_type": "llama3", "factor": factor, **_LLAMA3_FIXED}
    return config


# ------------------------------------------------------------------------------------ safetensors
@dataclass(frozen=True)
class TensorInfo:
    file: Path
    dtype: str  # safetensors' name: F32, BF16, ...
    shape: tuple[int, ...]


def read_header(path: Path) -> dict[str, TensorInfo]:
    """A safetensors file's tensors, from its JSON header (8 bytes of length, then the header)."""
    try:
        with path.open("rb") as f:
            raw = f.read(8)
            (size,) = struct.unpack("<Q", raw) if len(raw) == 8 else (None,)
            header = json.loads(f.read(size)) if size and size < 100_000_000 else None
    except (OSError, ValueError, UnicodeDecodeError):
        header = None
    if not isinstance(header, dict):
        raise ConfigError(f"{path}: not a safetensors file")
    header.pop("__metadata__", None)
    try:
        tensors = {name: TensorInfo(path, entry["dtype"], tuple(entry["shape"])) for name, entry in header.items()}
        data = max((entry["data_offsets"][1] for entry in header.values()), default=0)
    except (KeyError, TypeError, IndexError):
        raise ConfigError(f"{path}: not a safetensors file (a malformed header)") from None
    if 8 + size + data > path.stat().st_size:
        raise ConfigError(f"{path}: truncated: its header describes {data} bytes of tensors, the file is shorter")
    return tensors


def read_tensors(folder: Path) -> dict[str, TensorInfo]:
    """Every tensor of the folder's safetensors checkpoint (one file, or shards listed by the index)."""
    index = folder / INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise ConfigError(f"{index}: not a safetensors index (no weight_map)") from None
        files = sorted(set(weight_map.values()))
    elif (folder / SINGLE).is_file():
        weight_map, files = None, [SINGLE]
    else:
        raise ConfigError(f"{folder}: no {SINGLE} or {INDEX} (only safetensors checkpoints are read)")
    tensors: dict[str, TensorInfo] = {}
    for name in files:
        path = folder / name
        if "/" in name or not path.is_file():
            raise ConfigError(f"{index}: names the shard {name}, which is missing from {folder}")
        tensors.update(read_header(path))
    for tensor, name in (weight_map or {}).items():
        if tensor not in tensors or tensors[tensor].file.name != name:
            raise ConfigError(f"{index}: says {tensor} is in {name}, whose header does not list it")
    return tensors


def check_tensors(
    folder: Path, found: dict[str, TensorInfo], expected: dict[str, tuple[int, ...]], family: str
) -> dict[str, TensorInfo]:
    """The tensors an import reads, after checking them against the shapes config.json implies."""
    for name, shape in expected.items():
        if name not in found:
            raise ConfigError(f"{folder}: no tensor {name}, which a {family} model as config.json describes it has")
        if found[name].shape != shape:
            raise ConfigError(
                f"{found[name].file}: {name} has shape {list(found[name].shape)}, config.json implies {list(shape)}"
            )
        if found[name].dtype not in _DTYPES:
            raise ConfigError(f"{found[name].file}: {name} is {found[name].dtype}; import reads F32, BF16 and F16")
    for name in found:
        # a tied lm_head saved anyway, and the RoPE buffers older transformers versions saved, are not weights
        if name not in expected and name != "lm_head.weight" and not name.endswith("rotary_emb.inv_freq"):
            raise ConfigError(f"{found[name].file}: {name} is not part of a {family} model as config.json describes it")
    return {name: found[name] for name in expected}


def torch_dtype_name(tensors: dict[str, TensorInfo]) -> str:
    """The checkpoint's dtype as transformers names it (the most common one among its tensors)."""
    names = [_DTYPES[t.dtype] for t in tensors.values()]
    return max(sorted(set(names)), key=names.count)
