"""What the conversion processes run (`python -m flagscale.checkpoint.worker import|export PLAN.json`),
started by flagscale.checkpoint.bridge under torchrun with the plan it validated.

import: every rank of the TP x PP layout builds its pipeline stage of the model with megatron.core (the same
TransformerConfig and GPTModel as `flagscale train`, without initializing the weights), fills each parameter
with its own slices of the HF tensors, and all ranks save one distributed checkpoint.

export: one process builds the whole model (TP=1, PP=1), loads the checkpoint's model weights (distributed
checkpointing reshards any layout), and writes each parameter's rows back into the HF tensors they map to.

Errors are reported as one `error:` line (the bridge passes it on) and a non-zero exit.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import traceback
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from flagscale.checkpoint import hf, mapping
from flagscale.errors import ConfigError, ConversionError, FlagScaleError, reported
from flagscale.settings import convert
from flagscale.train.settings import TrainSettings


def _settings(model: dict[str, Any], tp: int, pp: int) -> TrainSettings:
    data = {
        "model": model,
        "system": {"tensor_model_parallel_size": tp, "pipeline_model_parallel_size": pp},
    }
    return convert(TrainSettings, data, "model")


def start(tp: int, pp: int) -> None:
    """torch.distributed (gloo; torchrun's rendezvous, or a world of one) and megatron's parallel state."""
    import torch.distributed as dist
    from megatron.core import parallel_state, tensor_parallel

    if "MASTER_ADDR" in os.environ:
        dist.init_process_group("gloo", rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]))
    else:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    tensor_parallel.model_parallel_cuda_manual_seed(0)  # megatron's layers expect the RNG tracker to exist


def stop() -> None:
    import torch.distributed as dist
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


def _model(t: TrainSettings, padded_vocab: int):
    """This rank's stage of the model, its weights left uninitialized (every one is then loaded)."""
    from flagscale.train import driver

    return driver.gpt_model(t, padded_vocab, driver.transformer_config(t, perform_initialization=False))


def model_of(info: dict[str, Any], tp: int = 1, pp: int = 1):
    """This rank's stage of the model a checkpoint's model info describes (weights uninitialized)."""
    from flagscale.train import families

    fields = {k: v for k, v in info["architecture"].items() if k in families.ARCHITECTURE_FIELDS}
    return _model(_settings({**fields, "vocab_size": info["vocab_size"]}, tp, pp), info["padded_vocab_size"])


def _check_maps(maps: list[mapping.TensorMap], params: dict[str, Any]) -> None:
    named = {m.megatron for m in maps}
    if named != set(params):
        raise ConversionError(
            f"the mapping and megatron.core's model disagree: parameters without a mapping "
            f"{sorted(set(params) - named)}, mappings without a parameter {sorted(named - set(params))}"
        )


class _Reader:
    """Slices of HF tensors from their safetensors shards, one tensor at a time; each shard opened once."""

    def __init__(self, files: dict[str, str], stack: ExitStack) -> None:
        self.files, self.stack = files, stack
        self.handles: dict[str, Any] = {}

    def read(self, piece: mapping.Piece, dim: int):
        from safetensors import safe_open

        assert piece.source is not None
        path = self.files[piece.source]
        try:
            if path not in self.handles:
                self.handles[path] = self.stack.enter_context(safe_open(path, framework="pt"))
            tensor = self.handles[path].get_slice(piece.source)
            return tensor[piece.start : piece.stop] if dim == 0 else tensor[:, piece.start : piece.stop]
        except Exception as exc:  # safetensors' own errors: a truncated or damaged file
            raise ConversionError(f"{path}: cannot read {piece.source} ({_first_line(exc)})") from None


# ------------------------------------------------------------------------------------------- import
def run_import(plan: dict[str, Any]) -> None:
    import torch
    from megatron.core import parallel_state as ps

    from flagscale.train import checkpoint

    tp, pp, info = plan["tp"], plan["pp"], plan["info"]
    start(tp, pp)
    t = _settings(plan["model"], tp, pp)
    model = _model(t, info["padded_vocab_size"])
    per_stage = t.model.num_layers // pp
    maps = mapping.model_maps(
        info["architecture"],
        info["vocab_size"],
        info["padded_vocab_size"],
        ps.get_pipeline_model_parallel_rank() * per_stage,
        per_stage,
        ps.is_pipeline_first_stage(),
        ps.is_pipeline_last_stage(),
    )
    params = dict(model.named_parameters())
    _check_maps(maps, params)
    tp_rank = ps.get_tensor_model_parallel_rank()
    with torch.no_grad(), ExitStack() as stack:
        reader = _Reader(plan["files"], stack)
        for tmap in maps:
            mapping.fill(params[tmap.megatron], tmap.shard(tp_rank, tp), tmap.dim, reader.read)
    state = {
        "model": model.sharded_state_dict(),
        "iteration": 0,
        checkpoint.LAYOUT: checkpoint.parallel_layout(),
        checkpoint.MODEL_INFO: info,
    }
    checkpoint.save_state(plan["out"], 0, state)
    stop()


# ------------------------------------------------------------------------------------------- export
def _export_info(root: str) -> dict[str, Any]:
    from flagscale.train import checkpoint

    info = checkpoint.model_info(checkpoint.common_state(root))
    if info is None:
        raise ConfigError(
            f"{root}: the checkpoint records no model (saved before flagscale train recorded it): nothing to "
            "build a config.json from"
        )
    family = info["architecture"]["family"]
    if family not in hf.HF_NAMES:
        raise ConfigError(
            f"{root}: family {family} has no Hugging Face architecture; export writes {', '.join(hf.HF_NAMES)}"
        )
    return info


def _dtype(info: dict[str, Any]):
    import torch

    source = info.get("hf") or {}
    config = source.get("config") or {}
    name = config.get("torch_dtype") or config.get("dtype") or source.get("dtype") or "float32"
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(name, torch.float32)


def hf_tensors(model, info: dict[str, Any]) -> dict[str, Any]:
    """The HF tensors of a whole (TP=1, PP=1) model, in the order transformers saves them."""
    import torch

    arch, vocab, padded = info["architecture"], info["vocab_size"], info["padded_vocab_size"]
    shapes = mapping.hf_shapes(arch, vocab)
    dtype = _dtype(info)
    out = {name: torch.empty(shape, dtype=dtype) for name, shape in shapes.items()}
    maps = mapping.model_maps(arch, vocab, padded, 0, arch["num_layers"], True, True)
    params = dict(model.named_parameters())
    _check_maps(maps, params)
    covered: dict[str, int] = {}
    dims: dict[str, int] = {}
    with torch.no_grad():
        for tmap in maps:
            pieces = tmap.shard(0, 1)
            mapping.scatter(params[tmap.megatron], pieces, tmap.dim, out, covered)
            dims.update({p.source: tmap.dim for p in pieces if p.source})
    short = [name for name, shape in shapes.items() if covered.get(name) != shape[dims.get(name, 0)]]
    if short:
        raise ConversionError(f"the mapping leaves HF tensors incomplete: {short}")
    return out


def write_shards(tensors: dict[str, Any], folder: Path, max_shard_size: int) -> list[str]:
    """model.safetensors, or model-0000i-of-0000n.safetensors + model.safetensors.index.json above the size."""
    from safetensors.torch import save_file

    shards: list[dict[str, Any]] = [{}]
    size = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_size:
            shards.append({})
            size = 0
        shards[-1][name] = tensor.contiguous()
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], str(folder / hf.SINGLE), metadata={"format": "pt"})
        return [hf.SINGLE]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for name, shard in zip(names, shards, strict=True):
        save_file(shard, str(folder / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / hf.INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return [*names, hf.INDEX]


def _copy_tokenizer(info: dict[str, Any], folder: Path) -> tuple[list[str], str | None]:
    source = (info.get("hf") or {}).get("source")
    if not source or not Path(source).is_dir():
        return [], None
    copied = []
    for name in hf.TOKENIZER_FILES:
        if (Path(source) / name).is_file():
            shutil.copyfile(Path(source) / name, folder / name)
            copied.append(name)
    return copied, source if copied else None


def run_export(plan: dict[str, Any]) -> None:
    from flagscale.train import checkpoint

    root, out = plan["checkpoint"], Path(plan["out"])
    start(1, 1)
    info = _export_info(root)
    arch = info["architecture"]
    model = model_of(info)
    checkpoint.load_weights(root, model)
    files = write_shards(hf_tensors(model, info), out, plan["max_shard_size"])
    (out / hf.CONFIG).write_text(json.dumps(hf.hf_config(info), indent=2, sort_keys=True) + "\n")
    copied, source = _copy_tokenizer(info, out)
    result = {"family": arch["family"], "files": [hf.CONFIG, *files, *copied], "tokenizer_from": source}
    Path(plan["result"]).write_text(json.dumps(result))
    stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=f"python -m {__name__}")
    parser.add_argument("action", choices=["import", "export"])
    parser.add_argument("plan", type=Path)
    args = parser.parse_args(argv)
    plan = json.loads(args.plan.read_text())
    with reported(sys.stdout):
        try:
            (run_import if args.action == "import" else run_export)(plan)
        except (FlagScaleError, SystemExit, KeyboardInterrupt):
            raise
        except Exception as exc:  # unforeseen: the traceback for a bug report, and one line for the user
            traceback.print_exc()
            raise ConversionError(f"{args.action} failed: {type(exc).__name__}: {_first_line(exc)}") from None
    return 0


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [""])[0]


if __name__ == "__main__":
    sys.exit(main())
