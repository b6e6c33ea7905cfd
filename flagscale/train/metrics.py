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
