"""What the conversion processes run (`python -m flagscale.checkpoint.worker import PLAN.json`),
started by flagscale.checkpoint.bridge under torchrun with the plan it validated.

import: every rank of the TP x PP layout builds its pipeline stage of the model with megatron.core (the same
TransformerConfig and GPTModel as `flagscale train`, without initializing the weights), fills each parameter
with its own slices of the HF tensors, and all ranks save one distributed checkpoint.

Errors are reported as one `error:` line (the bridge passes it on) and a non-zero exit.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from flagscale.checkpoint import mapping
from flagscale.errors import ConversionError, FlagScaleError, reported
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=f"python -m {__name__}")
    parser.add_argument("action", choices=["import"])
    parser.add_argument("plan", type=Path)
    args = parser.parse_args(argv)
    plan = json.loads(args.plan.read_text())
    with reported(sys.stdout):
        try:
            run_import(plan)
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
