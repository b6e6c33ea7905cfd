"""Checkpoints with Megatron's distributed checkpointing (megatron.core.dist_checkpointing).

Layout, as Megatron-LM's: `<save>/iter_0000010/` (one sharded checkpoint, any parallel layout can
read it) and `<save>/latest_checkpointed_iteration.txt`, the tracker: the resume point. A save is atomic:
every rank writes its shards, a barrier, then one rank replaces the tracker (temp file, fsync, rename), so
a run killed mid-save resumes from the previous complete checkpoint. Only the tracker vouches for a
checkpoint: folders beyond it are what killed saves left, ignored by resume and removed by the next save
(renamed aside first, so a kill during removal leaves nothing that looks like a checkpoint). Every folder up
to the tracker's is complete, which is what `keep_last` counts: after a save completes, all but the newest
`keep_last` of them are removed.

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

import os
import random
import re
import shutil
import time
from pathlib import Path
from typing import Any

from flagscale.errors import ConfigError

TRACKER = "latest_checkpointed_iteration.txt"
LAYOUT = "parallel_layout"
RNG = "rng_state"
MODEL_INFO = "flagscale_model"
_ITER = re.compile(r"iter_(\d{7})")
# Tests only: a save of this iteration stalls the last rank before it writes (the others block in the save's
# collectives), after touching `<save>/.stalled`, so a test can SIGKILL the job mid-save deterministically.
STALL_ENV = "FLAGSCALE_TEST_STALL_SAVE"


def iteration_dir(root: str | Path, iteration: int) -> Path:
    return Path(root) / f"iter_{iteration:07d}"


def latest_iteration(root: str | Path | None) -> int | None:
    if not root:
        return None
    try:
        return int((Path(root) / TRACKER).read_text().strip())
    except (FileNotFoundError, ValueError):
        return None


def parallel_layout() -> dict[str, Any]:
    from megatron.core import parallel_state as ps

    from flagscale.train import hetero

    if (rt := hetero.active()) is not None:  # meshes of other layouts: the same on every rank, RNG shards by rank
        return {"hetero": rt.describe(), "world": rt.layout.world_size}
    return {
        "TP": ps.get_tensor_model_parallel_world_size(),
        "PP": ps.get_pipeline_model_parallel_world_size(),
        "DP": ps.get_data_parallel_world_size(),
    }


def _describe(layout: dict[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in layout.items())


def _device_rng() -> Any:
    """The accelerator's generator accessor (get/set_rng_state), or None on the CPU, where it is torch's."""
    import torch

    try:
        from megatron.core import device_utils  # the patched megatron-core's device accessor

        return None if device_utils.is_cpu() else device_utils
    except ImportError:
        return torch.cuda if torch.cuda.is_available() else None


def _rng_shard(layout: dict[str, Any]) -> Any:
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
    if "world" in layout:  # hetero: one shard per global rank
        import torch.distributed as dist

        return ShardedObject(RNG, state, (layout["world"],), (dist.get_rank(),), replica_id=0)
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
    from flagscale.train import hetero

    model_sd = model.module.sharded_state_dict()
    if hetero.active() is not None:  # layers split over other TP sizes per mesh: one key per layer
        model_sd = hetero.unstack_layers(model_sd)
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
    root: str | Path,
    iteration: int,
    model,
    optimizer,
    scheduler,
    model_info: dict[str, Any] | None = None,
    keep_last: int | None = None,
) -> Path:
    state = _state(model, optimizer, scheduler, iteration, False)
    if model_info is not None:
        state[MODEL_INFO] = model_info
    return save_state(root, iteration, state, keep_last=keep_last)


def save_state(
    root: str | Path, iteration: int, state: dict[str, Any], strategy: Any = None, keep_last: int | None = None
) -> Path:
    """Save a sharded state as `iter_NNNNNNN/` under `root`, the tracker last (every rank calls this). `strategy`:
    a megatron.core save strategy of the torch_dist format other than its default (checkpoint import's).
    `keep_last`: then remove all but the newest `keep_last` complete checkpoints."""
    import torch.distributed as dist
    from megatron.core import dist_checkpointing

    root, rank = Path(root), dist.get_rank()
    target = iteration_dir(root, iteration)
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        _clear_for(root, iteration)
        target.mkdir()
    dist.barrier()
    if os.environ.get(STALL_ENV) == str(iteration) and rank == dist.get_world_size() - 1:
        _stall(root)
    dist_checkpointing.save(state, str(target), sharded_strategy=strategy)
    dist.barrier()  # every rank has written its shards: only now may the tracker name this checkpoint
    if rank == 0:
        _write_tracker(root, iteration)
        if keep_last:
            _prune(root, keep_last)
    dist.barrier()
    return target


def iterations(root: str | Path) -> list[int]:
    """The iterations of the `iter_NNNNNNN` folders under `root`, ascending (complete or not)."""
    found = (_ITER.fullmatch(p.name) for p in Path(root).iterdir() if p.is_dir()) if Path(root).is_dir() else ()
    return sorted(int(m.group(1)) for m in found if m)


def complete_iterations(root: str | Path) -> list[int]:
    """The complete checkpoints under `root`: the tracker's and the folders before it."""
    tracked = latest_iteration(root)
    return [] if tracked is None else [i for i in iterations(root) if i <= tracked]


def _clear_for(root: Path, iteration: int) -> None:
    """Before saving `iteration`: remove what no tracker vouches for (folders beyond the tracker's: a killed
    save's) and the target folder itself. Saving the tracked iteration again first moves the tracker back to
    the previous complete checkpoint, so that a kill during this save still leaves a resume point."""
    for leftover in root.glob(".iter_*.discarded"):  # a removal that was killed half-way
        shutil.rmtree(leftover, ignore_errors=True)
    tracker = root / TRACKER
    tracked = latest_iteration(root)
    if tracker.exists() and tracked is None:  # not ours to judge (e.g. Megatron-LM's "release"): only the target
        stale = [iteration] if iteration_dir(root, iteration).exists() else []
    else:
        stale = [i for i in iterations(root) if tracked is None or i > tracked or i == iteration]
    if tracked == iteration:
        earlier = [i for i in iterations(root) if i < iteration]
        if earlier:
            _write_tracker(root, earlier[-1])
        else:
            tracker.unlink()
    for i in stale:
        _discard(iteration_dir(root, i))


def _discard(folder: Path) -> None:
    """Remove a checkpoint folder: renamed aside first (atomic), so a kill mid-way leaves no partial iter_*."""
    aside = folder.with_name(f".{folder.name}.discarded")
    shutil.rmtree(aside, ignore_errors=True)
    folder.rename(aside)
    shutil.rmtree(aside)


def _write_tracker(root: Path, iteration: int) -> None:
    """The tracker, atomically and durably: a temp file written and fsynced, renamed over the old one."""
    tmp = root / f".{TRACKER}.tmp"
    with open(tmp, "w") as f:
        f.write(f"{iteration}\n")
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(root / TRACKER)
    fd = os.open(root, os.O_RDONLY)
    try:  # the rename itself survives a crash of the node once the folder is synced
        os.fsync(fd)
    finally:
        os.close(fd)


def _prune(root: Path, keep_last: int) -> None:
    """Remove all but the newest `keep_last` complete checkpoints (called once a newer one is complete)."""
    for i in complete_iterations(root)[:-keep_last]:
        _discard(iteration_dir(root, i))


def _stall(root: Path) -> None:
    (root / ".stalled").write_text(f"{os.getpid()}\n")
    while True:
        time.sleep(60)


def latest_dir(root: str | Path) -> Path:
    """The latest complete checkpoint under `root`; a ConfigError when there is none."""
    iteration = latest_iteration(root)
    if iteration is None:
        raise ConfigError(f"{root}: no checkpoint there (no readable {TRACKER})")
    path = iteration_dir(root, iteration)
    if not path.is_dir():
        raise ConfigError(f"{root}: {TRACKER} names iteration {iteration} but {path.name}/ is missing; restore it")
    return path


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

    path = str(latest_dir(root))  # only the checkpoint the tracker vouches for, never a newer folder
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
    iteration = int(common["iteration"])
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
