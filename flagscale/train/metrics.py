"""What the training driver records per logged iteration, on the rank that has the loss.

* `metrics.jsonl` (train.system.logging.metrics_file): one JSON line per logged iteration, flushed at once;
* TensorBoard event files in `tensorboard/` next to it (train.system.logging.tensorboard: None = when the
  `tensorboard` package is installed, as the train extra does; true = required; false = off), scalars under
  `train/`: loss, lr, grad_norm, tokens_per_sec, step_time, memory_gib;
* Weights & Biases when `train.system.logging.wandb` is set (the `wandb` package is then required).

A resumed run writes a new event file whose first event purges the killed run's steps from the resume point
on (`purge_step`), so TensorBoard's reader shows each iteration once, as the resumed run logged it; every
record is flushed, so a crash loses nothing that was logged.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from flagscale.errors import ConfigError
from flagscale.train.settings import LoggingSettings

SCALARS = ("loss", "lr", "grad_norm", "tokens_per_sec", "step_time", "memory_gib")
_NO_TENSORBOARD = (
    "train.system.logging.tensorboard=true needs the tensorboard package: pip install tensorboard "
    "(or flagscale[train]), or set it to false"
)
_NO_WANDB = "train.system.logging.wandb is set but wandb is not installed: pip install wandb, or remove the setting"


def check_installed(logging: LoggingSettings) -> None:
    """At launch, when the nodes run this interpreter: the loggers asked for are installed (one line, before
    anything starts; a run would otherwise fail on every rank, and restart, for a missing package)."""
    from importlib.util import find_spec

    if logging.tensorboard and find_spec("tensorboard") is None:
        raise ConfigError(_NO_TENSORBOARD)
    if logging.wandb is not None and logging.wandb.mode != "disabled" and find_spec("wandb") is None:
        raise ConfigError(_NO_WANDB)


def tensorboard_dir(metrics_file: str | Path) -> Path:
    return Path(metrics_file).parent / "tensorboard"


def memory_gib() -> float:
    """Peak accelerator memory this process allocated, or on the CPU its resident memory (GiB)."""
    import torch

    accelerator = getattr(torch, "accelerator", None)
    if accelerator is not None and accelerator.current_accelerator() is not None:
        return accelerator.max_memory_allocated() / 2**30
    import psutil

    return psutil.Process().memory_info().rss / 2**30


def peak_rss_bytes() -> int:
    """This process's resident-memory high-water mark (Linux VmHWM; elsewhere getrusage's ru_maxrss). The CPU has
    no allocator counter like the accelerators' max_memory_allocated: the kernel's peak of resident pages is the
    honest measure of what a rank needed at its worst moment (allocator caching and fragmentation included)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def rss_bytes() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def allocated_bytes(model, optimizer) -> dict[str, int]:
    """The bytes of the training state this rank really allocated, counted from the tensors (after the first
    step, when torch's Adam has made its states): `parameters` (megatron DDP's contiguous param buffer when it has
    one, as the distributed optimizer does, padding included; else every parameter), `gradients` (DDP's main_grad
    buffers, padding included) and `optimizer` (state tensors such as Adam's exp_avg/exp_avg_sq, and fp32 main
    copies of bf16/fp16 weights; not the 4-byte scalar `step` per tensor, nor views of the model's own weights)."""

    def nbytes(t) -> int:
        return t.numel() * t.element_size()

    buffers = list(getattr(model, "buffers", [])) + list(getattr(model, "expert_parallel_buffers", []))
    params = list(model.parameters())
    if buffers and all(b.param_data is not None for b in buffers):
        parameters = sum(nbytes(b.param_data) for b in buffers)
        parameters += sum(nbytes(p) for p in params if not p.requires_grad)  # frozen ones are in no buffer
    else:
        parameters = sum(nbytes(p) for p in params)
    gradients = sum(nbytes(b.grad_data) for b in buffers)
    model_storage = {p.untyped_storage().data_ptr() for p in params}
    model_storage |= {b.param_data.untyped_storage().data_ptr() for b in buffers if b.param_data is not None}
    seen: set[int] = set()
    total = 0
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = opt.optimizer
        tensors = [p for group in inner.param_groups for p in group["params"]]
        tensors += [v for state in inner.state.values() for v in state.values() if hasattr(v, "dim") and v.dim() > 0]
        for t in tensors:
            ptr = t.untyped_storage().data_ptr()
            key = t.data_ptr()
            if ptr in model_storage or key in seen:
                continue
            seen.add(key)
            total += nbytes(t)
    return {"parameters": parameters, "gradients": gradients, "optimizer": total}


class MemoryRecord:
    """`<exp_dir>/logs/memory/rank<R>.json`: what this rank allocated for its training state and its measured peak
    (the resident high-water mark less the resident memory just before the model was built: what building and
    training the model added, beside the imported libraries). Written after the first iteration and at the end."""

    def __init__(self, exp_dir: Path, rank: int, layout: dict[str, int]) -> None:
        self.path = exp_dir / "logs" / "memory" / f"rank{rank}.json"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.record: dict[str, Any] = {"rank": rank, **layout, "baseline_rss": rss_bytes()}

    def write(self, iteration: int, model, optimizer) -> None:
        if "parameters" not in self.record:
            self.record.update(allocated_bytes(model, optimizer))
        peak = peak_rss_bytes()
        self.record.update(iteration=iteration, peak_rss=peak, peak=peak - self.record["baseline_rss"])
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.record, indent=1) + "\n")
        tmp.replace(self.path)


class MetricsLog:
    """The reporting rank's metrics writers; `write` one record per logged iteration, `close` at the end."""

    def __init__(self, logging: LoggingSettings, exp_dir: Path, start_iter: int, config: dict[str, Any]) -> None:
        path = Path(logging.metrics_file or exp_dir / "logs" / "metrics.jsonl")  # the launcher sets it
        path.parent.mkdir(parents=True, exist_ok=True)
        self.jsonl = open(path, "a")
        self.tensorboard = _tensorboard(logging, tensorboard_dir(path), start_iter)
        self.wandb = _wandb(logging, exp_dir, config)

    def write(self, record: dict[str, Any]) -> None:
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        step = record["iteration"]
        scalars = {f"train/{k}": record[k] for k in SCALARS if k in record}
        if self.tensorboard is not None:
            for tag, value in scalars.items():
                self.tensorboard.add_scalar(tag, value, step)
            self.tensorboard.flush()
        if self.wandb is not None:
            self.wandb.log(scalars, step=step)

    def close(self) -> None:
        self.jsonl.close()
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()


def _tensorboard(logging: LoggingSettings, folder: Path, start_iter: int) -> Any:
    if logging.tensorboard is False:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # torch's writer needs the tensorboard package
        if logging.tensorboard:
            raise ConfigError(_NO_TENSORBOARD) from None
        return None
    # the first event purges any earlier attempt's steps from here on: this run logs them again
    return SummaryWriter(str(folder), purge_step=start_iter + 1)


def _wandb(logging: LoggingSettings, exp_dir: Path, config: dict[str, Any]) -> Any:
    settings = logging.wandb
    if settings is None or settings.mode == "disabled":
        return None
    try:
        import wandb
    except ImportError:
        raise ConfigError(_NO_WANDB) from None
    return wandb.init(
        project=settings.project,
        name=settings.name or exp_dir.name,
        mode=settings.mode,
        dir=str(exp_dir / "logs"),
        config=config,
    )
