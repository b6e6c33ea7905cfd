"""Checkpoints with Megatron's distributed checkpointing (megatron.core.dist_checkpointing).

Layout, as Megatron-LM's: `<save>/iter_0000010/` (one sharded checkpoint, any parallel layout can
read it) and `<save>/latest_checkpointed_iteration.txt`, written only after every rank finished the
save, so a run killed mid-save resumes from the previous complete checkpoint.

RNG state, as Megatron-LM keeps it: every rank's Python, numpy, torch (and accelerator) generator states
and Megatron's tensor-parallel RNG tracker states go into the same checkpoint, one `ShardedObject`
shard per rank at (pp_rank, tp_rank, dp_rank), and the common state records the layout. With dropout
on, a resumed run then draws the same masks as an uninterrupted one. A checkpoint from another layout
has other ranks, so its RNG shards fit none of ours: then, and for checkpoints saved without RNG
state, only weights, optimizer and schedule load.

The common state also records the model (`flagscale_model`: family, architecture, vocabulary, and for a
model that came from Hugging Face the source's config.json), so that a run or an export that loads the
checkpoint can say at once when its settings do not fit, and `flagscale checkpoint export` can write an
HF folder from any checkpoint. `flagscale checkpoint import` writes checkpoints with model weights only
(no optimizer or schedule): a run starts from those with `checkpoint.finetune=true` (`load_weights`).
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from flagscale.errors import ConfigError

TRACKER = "latest_checkpointed_iteration.txt"
LAYOUT = "parallel_layout"
RNG = "rng_state"
MODEL_INFO = "flagscale_model"


def iteration_dir(root: str | Path, iteration: int) -> Path:
    return Path(root) / f"iter_{iteration:07d}"


def latest_iteration(root: str | Path | None) -> int | None:
    if not root:
        return None
    try:
        return int((Path(root) / TRACKER).read_text().strip())
    except (FileNotFoundError, ValueError):
        return None


def parallel_layout() -> dict[str, int]:
    from megatron.core import parallel_state as ps

    return {
        "TP": ps.get_tensor_model_parallel_world_size(),
        "PP": ps.get_pipeline_model_parallel_world_size(),
        "DP": ps.get_data_parallel_world_size(),
    }


def _describe(layout: dict[str, int]) -> str:
    return " ".join(f"{k}={v}" for k, v in layout.items())


def _device_rng() -> Any:
    """The accelerator's generator accessor (get/set_rng_state), or None on the CPU, where it is torch's."""
    import torch

    try:
        from megatron.core import device_utils  # the patched megatron-core's device accessor

        return None if device_utils.is_cpu() else device_utils
    except ImportError:
        return torch.cuda if torch.cuda.is_available() else None


def _rng_shard(layout: dict[str, int]) -> Any:
    """This rank's RNG states as its own shard of the (PP, TP, DP) grid."""
    import numpy as np
    import torch
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    state = {
        "random": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }
    if (device := _device_rng()) is not None:
        state["device"] = device.get_rng_state()
    return ShardedObject(
        RNG,
        state,
        (layout["PP"], layout["TP"], layout["DP"]),
        (ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank(), ps.get_data_parallel_rank()),
        replica_id=0,
    )


def _set_rng(state: dict[str, Any]) -> None:
    import numpy as np
    import torch
    from megatron.core import tensor_parallel

    random.setstate(state["random"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "device" in state and (device := _device_rng()) is not None:
        device.set_rng_state(state["device"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _state(model, optimizer, scheduler, iteration: int, is_loading: bool, rng: bool = True) -> dict:
    model_sd = model.module.sharded_state_dict()
    layout = parallel_layout()
    state = {
        "model": model_sd,
        "optimizer": optimizer.sharded_state_dict(model_sd, is_loading=is_loading),
        "scheduler": scheduler.state_dict(),
        "iteration": iteration,
        LAYOUT: layout,
    }
    if rng:
        state[RNG] = _rng_shard(layout)
    return state


def save(
    root: str | Path, iteration: int, model, optimizer, scheduler, model_info: dict[str, Any] | None = None
) -> Path:
    state = _state(model, optimizer, scheduler, iteration, False)
    if model_info is not None:
        state[MODEL_INFO] = model_info
    return save_state(root, iteration, state)


def save_state(root: str | Path, iteration: int, state: dict[str, Any], strategy: Any = None) -> Path:
    """Save a sharded state as `iter_NNNNNNN/` under `root`, the tracker last (every rank calls this). `strategy`:
    a megatron.core save strategy of the torch_dist format other than its default (checkpoint import's)."""
    import torch.distributed as dist
    from megatron.core import dist_checkpointing

    target = iteration_dir(root, iteration)
    if dist.get_rank() == 0:
        target.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    dist_checkpointing.save(state, str(target), sharded_strategy=strategy)
    dist.barrier()
    if dist.get_rank() == 0:  # the tracker last: a half-written checkpoint is never "latest"
        tmp = Path(root) / f".{TRACKER}.tmp"
        tmp.write_text(f"{iteration}\n")
        tmp.replace(Path(root) / TRACKER)
    dist.barrier()
    return target


def latest_dir(root: str | Path) -> Path:
    """The latest complete checkpoint under `root`; a ConfigError when there is none."""
    iteration = latest_iteration(root)
    if iteration is None:
        raise ConfigError(f"{root}: no checkpoint there (no readable {TRACKER})")
    return iteration_dir(root, iteration)


def common_state(root: str | Path) -> dict[str, Any]:
    """The latest checkpoint's common (rank-independent) state: iteration, layout, model info, ..."""
    from megatron.core import dist_checkpointing

    return dist_checkpointing.load_common_state_dict(str(latest_dir(root)))


def model_info(common: dict[str, Any]) -> dict[str, Any] | None:
    """What the checkpoint records about its model (None for checkpoints saved before it did)."""
    return common.get(MODEL_INFO)


def load_weights(root: str | Path, model) -> Path:
    """Load only the model weights of the latest checkpoint under `root` (any layout) into `model`, a
    Megatron module (DDP and Float16Module wrappers are looked through)."""
    from megatron.core import dist_checkpointing

    path = latest_dir(root)
    module = _unwrapped(model)
    wanted = module.sharded_state_dict()
    # LoRA adapters a base checkpoint (an import) has none of keep their fresh initialization
    fresh = _adapters_absent(wanted, path)
    state = dist_checkpointing.load({"model": {k: v for k, v in wanted.items() if k not in fresh}}, str(path))
    state["model"].update({k: v for k, v in module.state_dict(keep_vars=True).items() if k in fresh})
    module.load_state_dict(state["model"])
    return path


def _adapters_absent(sharded: dict[str, Any], path: Path) -> set[str]:
    from megatron.core import dist_checkpointing

    from flagscale.train.lora import is_adapter

    adapters = {k for k in sharded if is_adapter(k)}
    if not adapters:
        return set()
    saved = set(dist_checkpointing.load_tensors_metadata(str(path)))
    return {k for k in adapters if getattr(sharded[k], "key", k) not in saved}


def _unwrapped(model):
    from megatron.core.distributed import DistributedDataParallel

    return model.module if isinstance(model, DistributedDataParallel) else model


def load(root: str | Path, model, optimizer, scheduler) -> tuple[int, str | None]:
    """Load the latest checkpoint under `root` into model, optimizer and scheduler, and the RNG state when
    it was saved in this run's layout. Returns its iteration and, when the RNG state stayed as seeded,
    why (one line for the log)."""
    from megatron.core import dist_checkpointing

    iteration = latest_iteration(root)
    assert iteration is not None
    path = str(iteration_dir(root, iteration))
    # The layout decides which shards to ask for, so it is read (common state, rank-independent) first.
    common = dist_checkpointing.load_common_state_dict(path)
    if "optimizer" not in common:
        raise ConfigError(
            f"checkpoint {path} holds model weights only (as `flagscale checkpoint import` writes them): "
            "set train.system.checkpoint.finetune=true to start training from them"
        )
    saved = common.get(LAYOUT)
    current = parallel_layout()
    with_rng = saved == current
    state = dist_checkpointing.load(_state(model, optimizer, scheduler, iteration, True, rng=with_rng), path)
    model.module.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if with_rng:
        _set_rng(state[RNG])
        note = None
    elif saved is None:
        note = (
            "RNG state not restored: the checkpoint has none (saved before FlagScale kept it); "
            "dropout masks differ from the original run's"
        )
    else:
        note = (
            f"RNG state not restored: the checkpoint was saved with {_describe(saved)}, this run is "
            f"{_describe(current)}; weights and optimizer loaded, dropout masks differ from the original run's"
        )
    return int(state["iteration"]), note
