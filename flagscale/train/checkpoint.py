"""Checkpoints with Megatron's distributed checkpointing (megatron.core.dist_checkpointing).

Layout, as Megatron-LM's: `<save>/iter_0000010/` (one sharded checkpoint, any parallel layout can
read it) and `<save>/latest_checkpointed_iteration.txt`, written only after every rank finished the
save, so a run killed mid-save resumes from the previous complete checkpoint.
"""

from __future__ import annotations

from pathlib import Path

TRACKER = "latest_checkpointed_iteration.txt"


def iteration_dir(root: Path, iteration: int) -> Path:
    return Path(root) / f"iter_{iteration:07d}"


def latest_iteration(root: str | Path | None) -> int | None:
    if not root:
        return None
    try:
        return int((Path(root) / TRACKER).read_text().strip())
    except (FileNotFoundError, ValueError):
        return None


def _state(model, optimizer, scheduler, iteration: int, is_loading: bool) -> dict:
    model_sd = model.module.sharded_state_dict()
    return {
        "model": model_sd,
        "optimizer": optimizer.sharded_state_dict(model_sd, is_loading=is_loading),
        "scheduler": scheduler.state_dict(),
        "iteration": iteration,
    }


def save(root: str | Path, iteration: int, model, optimizer, scheduler) -> Path:
    import torch.distributed as dist
    from megatron.core import dist_checkpointing

    target = iteration_dir(root, iteration)
    if dist.get_rank() == 0:
        target.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    dist_checkpointing.save(_state(model, optimizer, scheduler, iteration, False), str(target))
    dist.barrier()
    if dist.get_rank() == 0:  # the tracker last: a half-written checkpoint is never "latest"
        tmp = Path(root) / f".{TRACKER}.tmp"
        tmp.write_text(f"{iteration}\n")
        tmp.replace(Path(root) / TRACKER)
    dist.barrier()
    return target


def load(root: str | Path, model, optimizer, scheduler) -> int:
    """Load the latest checkpoint under `root` into model, optimizer and scheduler; its iteration."""
    from megatron.core import dist_checkpointing

    iteration = latest_iteration(root)
    assert iteration is not None
    state = dist_checkpointing.load(_state(model, optimizer, scheduler, iteration, True),
                                    str(iteration_dir(root, iteration)))
    model.module.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    return int(state["iteration"])
