"""A Hugging Face model folder as FlagScale reads and writes it: config.json <-> `train.model` settings, the
safetensors shards (their headers: names, dtypes, shapes, read without torch), and the files export copies.

Supported: the decoder families of flagscale/train/families.py that Hugging Face has (llama, qwen2, qwen3, and the
MoE families qwen3_moe, mixtral, deepseek_v3). A config.json that asks for something megatron.core's local spec
does not compute the same way (another activation, biases on every linear, sliding windows, a RoPE scaling other
than Llama 3's with megatron.core's fixed factors; for MoE, routing megatron.core's router does not compute, MoE
layers other than "every layer after the first k", YaRN or non-interleaved RoPE in multi-latent attention) is
refused with one line, so an import never yields a model that silently computes something else.
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
HF_NAMES = {
    "llama": ("LlamaForCausalLM", "llama"),
    "qwen2": ("Qwen2ForCausalLM", "qwen2"),
    "qwen3": ("Qwen3ForCausalLM", "qwen3"),
    "qwen3_moe": ("Qwen3MoeForCausalLM", "qwen3_moe"),
    "mixtral": ("MixtralForCausalLM", "mixtral"),
    "deepseek_v3": ("DeepseekV3ForCausalLM", "deepseek_v3"),
}
ARCHITECTURES = {architecture: family for family, (architecture, _) in HF_NAMES.items()}
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
    window = config.get("sliding_window") if family == "mixtral" else None
    if window is not None and window < (config.get("max_position_embeddings") or 0):
        raise ConfigError(
            f"{where}: sliding_window={window} is not supported (megatron.core attends to all tokens): set it to "
            "null or to max_position_embeddings"
        )


def model_settings(config: dict[str, Any], family: str, where: str) -> dict[str, Any]:
    """config.json as `train.model` settings (plain data: family, architecture, vocabulary, context; `moe` and
    `mla` for the families with them)."""
    _refuse_unsupported(config, family, where)
    mla = _mla(config, where) if family == "deepseek_v3" else None  # before the generic RoPE scaling check
    hidden = _required_int(config, "hidden_size", where)
    heads = _required_int(config, "num_attention_heads", where)
    groups = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or hidden // heads
    if family == "deepseek_v3":  # MLA: head sizes are model.mla's; key/value heads are the query heads
        if groups != heads:
            raise ConfigError(
                f"{where}: num_key_value_heads={groups} is not supported: multi-latent attention has one key/value "
                f"head per query head ({heads})"
            )
        head_dim = hidden // heads
    settings = {
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
    if family in _MOE:
        settings["moe"] = _MOE[family](config, where)
    if mla is not None:
        settings["mla"] = mla
    return settings


# ------------------------------------------------------------------------------ MoE and MLA (config.json)
def _moe_common(config: dict[str, Any], where: str, experts_key: str, ffn_key: str) -> dict[str, Any]:
    experts = _required_int(config, experts_key, where)
    topk = _required_int(config, "num_experts_per_tok", where)
    if topk > experts:
        raise ConfigError(f"{where}: num_experts_per_tok={topk} exceeds {experts_key}={experts}")
    moe: dict[str, Any] = {"num_experts": experts, "router_topk": topk}
    moe["ffn_hidden_size"] = _required_int(config, ffn_key, where)
    if isinstance(config.get("router_aux_loss_coef"), (int, float)):  # a training setting, carried along
        moe["aux_loss_coeff"] = float(config["router_aux_loss_coef"])
    return moe


def _qwen3_moe(config: dict[str, Any], where: str) -> dict[str, Any]:
    """Softmax over all experts, then the top k; renormalized over the k when norm_topk_prob (megatron.core:
    top k of the logits, softmax over those k, which is the same), else kept (router_pre_softmax)."""
    if config.get("decoder_sparse_step", 1) != 1:
        raise ConfigError(
            f"{where}: decoder_sparse_step={config['decoder_sparse_step']} is not supported: every layer after the "
            "dense first ones must be a MoE layer"
        )
    dense = list(config.get("mlp_only_layers") or [])
    if dense != list(range(len(dense))):
        raise ConfigError(
            f"{where}: mlp_only_layers={dense} is not supported: only the first layers may be dense (e.g. [0, 1])"
        )
    moe = _moe_common(config, where, "num_experts", "moe_intermediate_size")
    return {**moe, "dense_layers": len(dense), "router_pre_softmax": not config.get("norm_topk_prob", False)}


def _mixtral(config: dict[str, Any], where: str) -> dict[str, Any]:
    """Softmax over all experts, top k, renormalized over the k: megatron.core's softmax over the top-k logits."""
    return _moe_common(config, where, "num_local_experts", "intermediate_size")


def _deepseek_v3_moe(config: dict[str, Any], where: str) -> dict[str, Any]:
    """Sigmoid scores; the top k of scores + e_score_correction_bias within the top topk_group of n_group groups;
    the k scores normalized, times routed_scaling_factor; shared experts beside them; dense first layers."""
    moe = _moe_common(config, where, "n_routed_experts", "moe_intermediate_size")
    topk, experts = moe["router_topk"], moe["num_experts"]
    if bool(config.get("norm_topk_prob", True)) != (topk > 1):
        raise ConfigError(
            f"{where}: norm_topk_prob={config.get('norm_topk_prob')} with num_experts_per_tok={topk} is not "
            "supported: megatron.core's sigmoid router normalizes the top-k scores exactly when k > 1"
        )
    groups, group_topk = config.get("n_group") or 1, config.get("topk_group") or 1
    if groups > 1 and (experts % groups or topk % group_topk or topk // group_topk != 2):
        raise ConfigError(
            f"{where}: n_group={groups}, topk_group={group_topk} with num_experts_per_tok={topk} is not supported: "
            "megatron.core scores a group by its top num_experts_per_tok/topk_group experts, transformers by its "
            "top 2 (they agree when num_experts_per_tok = 2 x topk_group and n_group divides n_routed_experts)"
        )
    shared = config.get("n_shared_experts") or 0
    if shared < 1:
        raise ConfigError(f"{where}: n_shared_experts={shared} is not supported: deepseek_v3 has shared experts")
    scale = float(config.get("routed_scaling_factor") or 1.0)
    return {
        **moe,
        "shared_expert_ffn_hidden_size": moe["ffn_hidden_size"] * shared,
        "dense_layers": int(config.get("first_k_dense_replace") or 0),
        "router_score_function": "sigmoid",
        "router_expert_bias": True,
        "router_num_groups": groups if groups > 1 else None,
        "router_group_topk": group_topk if groups > 1 else None,
        "router_topk_scaling_factor": scale if scale != 1.0 else None,
    }


_MOE = {"qwen3_moe": _qwen3_moe, "mixtral": _mixtral, "deepseek_v3": _deepseek_v3_moe}


def _mla(config: dict[str, Any], where: str) -> dict[str, Any]:
    """Multi-latent attention as megatron.core's MLASelfAttention computes it: RoPE on interleaved rows (as
    transformers with rope_interleave), no YaRN, the latents' RMSNorms with rms_norm_eps (transformers: 1e-6)."""
    if not config.get("rope_interleave", True):
        raise ConfigError(
            f"{where}: rope_interleave=false is not supported: megatron.core's multi-latent attention reads the "
            "RoPE rows interleaved"
        )
    if config.get("rope_scaling") is not None:
        raise ConfigError(
            f"{where}: rope_scaling {config['rope_scaling']} is not supported for deepseek_v3 (no YaRN in "
            "flagscale's multi-latent attention yet)"
        )
    if float(config.get("rms_norm_eps", 1e-6)) != 1e-6:
        raise ConfigError(
            f"{where}: rms_norm_eps={config['rms_norm_eps']} is not supported for deepseek_v3: transformers "
            "normalizes the query/key-value latents with 1e-6, megatron.core with rms_norm_eps"
        )
    q_lora = config.get("q_lora_rank")
    return {
        "q_lora_rank": _required_int(config, "q_lora_rank", where) if q_lora is not None else None,
        "kv_lora_rank": _required_int(config, "kv_lora_rank", where),
        "qk_head_dim": _required_int(config, "qk_nope_head_dim", where),
        "qk_pos_emb_head_dim": _required_int(config, "qk_rope_head_dim", where),
        "v_head_dim": _required_int(config, "v_head_dim", where),
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
    if family == "deepseek_v3":
        pass  # its head_dim is the RoPE head dim (_set_mla)
    elif (
        config.get("head_dim") is not None or arch["kv_channels"] != arch["hidden_size"] // arch["num_attention_heads"]
    ):
        _set(config, "head_dim", arch["kv_channels"])
    if arch.get("moe"):
        _set_moe(config, family, arch["moe"])
    if arch.get("mla"):
        _set_mla(config, arch["mla"])
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


def _set_moe(config: dict[str, Any], family: str, moe: dict[str, Any]) -> None:
    _set(config, "num_experts_per_tok", moe["router_topk"])
    if family == "mixtral":
        _set(config, "num_local_experts", moe["num_experts"])
        _set(config, "intermediate_size", moe["ffn_hidden_size"])  # Mixtral's experts are its MLP
        return
    _set(config, "moe_intermediate_size", moe["ffn_hidden_size"])
    if family == "qwen3_moe":
        _set(config, "num_experts", moe["num_experts"])
        _set(config, "norm_topk_prob", not moe["router_pre_softmax"])
        _set(config, "decoder_sparse_step", 1)
        _set(config, "mlp_only_layers", list(range(moe["dense_layers"])))
        return
    groups = moe["router_num_groups"]
    _set(config, "n_routed_experts", moe["num_experts"])
    _set(config, "n_shared_experts", moe["shared_expert_ffn_hidden_size"] // moe["ffn_hidden_size"])
    _set(config, "first_k_dense_replace", moe["dense_layers"])
    _set(config, "n_group", groups or 1)
    _set(config, "topk_group", moe["router_group_topk"] if groups else 1)
    _set(config, "routed_scaling_factor", moe["router_topk_scaling_factor"] or 1.0)
    _set(config, "norm_topk_prob", moe["router_topk"] > 1)


def _set_mla(config: dict[str, Any], mla: dict[str, Any]) -> None:
    _set(config, "q_lora_rank", mla["q_lora_rank"])
    _set(config, "kv_lora_rank", mla["kv_lora_rank"])
    _set(config, "qk_nope_head_dim", mla["qk_head_dim"])
    _set(config, "qk_rope_head_dim", mla["qk_pos_emb_head_dim"])
    _set(config, "v_head_dim", mla["v_head_dim"])
    _set(config, "qk_head_dim", mla["qk_head_dim"] + mla["qk_pos_emb_head_dim"])
    _set(config, "head_dim", mla["qk_pos_emb_head_dim"])
    _set(config, "rope_interleave", True)


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
