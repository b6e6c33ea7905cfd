"""Typed settings of `flagscale train`, validated once at the edge.

The composed Hydra config has two parts: `experiment` (where and how to launch: folders, launcher,
environment, commands) and `train` (what to train: model, data, optimizer, parallelism, checkpoints).
Both become frozen dataclasses here; an unknown key, a value of the wrong type or an impossible
combination fails with one line naming the dotted key, before anything is launched.

This module imports no torch, megatron or hydra: the launcher and the training driver both use it,
and the driver reads the `train` part back from the JSON the launcher writes.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from flagscale.errors import ConfigError

PRECISIONS = ("fp32", "bf16", "fp16")
DECAY_STYLES = ("constant", "linear", "cosine", "inverse-square-root")
OPTIMIZERS = ("adam", "sgd")
POSITION_EMBEDDINGS = ("rope", "learned_absolute")
TOKENIZERS = ("byte", "hf")


# --------------------------------------------------------------------------------- train (the task)
@dataclass(frozen=True)
class OptimizerSettings:
    name: str = "adam"
    lr: float = 1e-3
    min_lr: float = 0.0
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    warmup_iters: int = 0
    decay_style: str = "cosine"
    decay_iters: Optional[int] = None  # None: train_iters


@dataclass(frozen=True)
class ModelSettings:
    num_layers: int = 2
    hidden_size: int = 64
    num_attention_heads: int = 4
    ffn_hidden_size: Optional[int] = None  # None: 4 x hidden
    seq_length: int = 32
    max_position_embeddings: Optional[int] = None  # None: seq_length
    position_embedding_type: str = "rope"
    init_method_std: float = 0.02
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    make_vocab_size_divisible_by: int = 64
    micro_batch_size: int = 1
    global_batch_size: int = 8
    train_iters: int = 10
    optimizer: OptimizerSettings = field(default_factory=OptimizerSettings)


@dataclass(frozen=True)
class TokenizerSettings:
    type: str = "byte"  # byte: 256 byte values + end-of-document, offline; hf: a local tokenizer folder
    path: Optional[str] = None


@dataclass(frozen=True)
class DataSettings:
    data_path: str = ""  # prefix of the .bin/.idx pair written by tools/preprocess_data.py
    split: str = "100,0,0"
    tokenizer: TokenizerSettings = field(default_factory=TokenizerSettings)


@dataclass(frozen=True)
class CheckpointSettings:
    save: Optional[str] = None  # folder of iter_NNNNNNN/ checkpoints; None: no checkpoints
    load: Optional[str] = None  # None: resume from `save` when it holds one
    save_interval: int = 0  # 0: only at the end (when `save` is set)
    save_at_end: bool = True


@dataclass(frozen=True)
class LoggingSettings:
    log_interval: int = 1
    metrics_file: Optional[str] = None  # JSON lines, one per logged step; None: <exp_dir>/logs/metrics.jsonl


@dataclass(frozen=True)
class SystemSettings:
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    precision: str = "fp32"
    seed: int = 1234
    deterministic: bool = False  # torch.use_deterministic_algorithms: reproducible, and slower on GPUs
    logging: LoggingSettings = field(default_factory=LoggingSettings)
    checkpoint: CheckpointSettings = field(default_factory=CheckpointSettings)


@dataclass(frozen=True)
class TrainSettings:
    """`train:` of the experiment config (the task YAML, conf/train/<size>.yaml)."""

    system: SystemSettings = field(default_factory=SystemSettings)
    model: ModelSettings = field(default_factory=ModelSettings)
    data: DataSettings = field(default_factory=DataSettings)

    def check(self, world_size: int, where: str = "train") -> None:
        """The combinations no single field can catch; `world_size` is nnodes x nproc_per_node."""
        s, m = self.system, self.model
        tp, pp = s.tensor_model_parallel_size, s.pipeline_model_parallel_size
        if world_size % (tp * pp):
            raise ConfigError(f"{where}.system: tensor_model_parallel_size={tp} x pipeline_model_parallel_size={pp} "
                              f"does not divide the world size {world_size} (nnodes x nproc_per_node)")
        dp = world_size // (tp * pp)
        if m.global_batch_size % (m.micro_batch_size * dp):
            raise ConfigError(f"{where}.model.global_batch_size={m.global_batch_size} is not a multiple of "
                              f"micro_batch_size={m.micro_batch_size} x data-parallel size {dp}")
        if m.num_attention_heads % tp:
            raise ConfigError(f"{where}.model.num_attention_heads={m.num_attention_heads} is not a multiple of "
                              f"tensor_model_parallel_size={tp}")
        if m.hidden_size % m.num_attention_heads:
            raise ConfigError(f"{where}.model.hidden_size={m.hidden_size} is not a multiple of "
                              f"num_attention_heads={m.num_attention_heads}")
        if m.num_layers % pp:
            raise ConfigError(f"{where}.model.num_layers={m.num_layers} is not a multiple of "
                              f"pipeline_model_parallel_size={pp}")
        if (m.max_position_embeddings or m.seq_length) < m.seq_length:
            raise ConfigError(f"{where}.model.max_position_embeddings={m.max_position_embeddings} is below "
                              f"seq_length={m.seq_length}")

    @property
    def data_prefix(self) -> Path:
        return Path(self.data.data_path)


def _positive(value: int, key: str) -> None:
    if value < 1:
        raise ConfigError(f"{key}={value}: must be at least 1")


def _one_of(value: str, choices: tuple[str, ...], key: str) -> None:
    if value not in choices:
        raise ConfigError(f"{key}={value}: use one of {', '.join(choices)}{_nearest(value, choices)}")


def _validate_train(t: TrainSettings, where: str) -> None:
    s, m, o = t.system, t.model, t.model.optimizer
    for key, value in (("system.tensor_model_parallel_size", s.tensor_model_parallel_size),
                       ("system.pipeline_model_parallel_size", s.pipeline_model_parallel_size),
                       ("system.logging.log_interval", s.logging.log_interval),
                       ("model.num_layers", m.num_layers), ("model.hidden_size", m.hidden_size),
                       ("model.num_attention_heads", m.num_attention_heads), ("model.seq_length", m.seq_length),
                       ("model.micro_batch_size", m.micro_batch_size),
                       ("model.global_batch_size", m.global_batch_size), ("model.train_iters", m.train_iters),
                       ("model.make_vocab_size_divisible_by", m.make_vocab_size_divisible_by)):
        _positive(value, f"{where}.{key}")
    if s.checkpoint.save_interval < 0:
        raise ConfigError(f"{where}.system.checkpoint.save_interval={s.checkpoint.save_interval}: must be >= 0")
    _one_of(s.precision, PRECISIONS, f"{where}.system.precision")
    _one_of(m.position_embedding_type, POSITION_EMBEDDINGS, f"{where}.model.position_embedding_type")
    _one_of(o.name, OPTIMIZERS, f"{where}.model.optimizer.name")
    _one_of(o.decay_style, DECAY_STYLES, f"{where}.model.optimizer.decay_style")
    _one_of(t.data.tokenizer.type, TOKENIZERS, f"{where}.data.tokenizer.type")
    if not (0.0 <= o.min_lr <= o.lr):
        raise ConfigError(f"{where}.model.optimizer: need 0 <= min_lr ({o.min_lr}) <= lr ({o.lr})")
    if not t.data.data_path:
        raise ConfigError(f"{where}.data.data_path is not set: point it at the prefix of a .bin/.idx pair "
                          "made by tools/preprocess_data.py")
    if t.data.tokenizer.type == "hf" and not t.data.tokenizer.path:
        raise ConfigError(f"{where}.data.tokenizer.path: the hf tokenizer needs a local tokenizer folder")
    parts = t.data.split.split(",")
    try:
        weights = [float(p) for p in parts]
    except ValueError:
        weights = []
    if len(weights) != 3 or min(weights) < 0 or weights[0] <= 0:
        raise ConfigError(f"{where}.data.split={t.data.split!r}: three comma-separated weights "
                          "train,valid,test with train > 0 (e.g. 98,2,0)")


# ------------------------------------------------------------------------------- experiment (launch)
@dataclass(frozen=True)
class RunnerSettings:
    nnodes: int = 1
    nproc_per_node: int = 1
    hostfile: Optional[str] = None  # `host slots=N [type=device]` per line; needed when nnodes > 1
    master_addr: Optional[str] = None  # None: 127.0.0.1, or the first host of the hostfile
    master_port: Optional[int] = None  # None: a free port (single node) or 29500 (multi-node)
    rdzv_backend: str = "c10d"
    rdzv_id: Optional[str] = None  # None: derived from the experiment name
    device: Optional[str] = None  # device manifest (hardware/<device>); None: the installed build's device
    visible_devices: Optional[str] = None  # e.g. "0,1": exported as the device's visible-devices variable
    python: Optional[str] = None  # interpreter on every node; None: the one running flagscale
    ssh_port: int = 22
    ssh_options: tuple[str, ...] = ()  # extra `ssh -o` options, e.g. StrictHostKeyChecking=no
    foreground: bool = False
    stop_timeout: float = 15.0


@dataclass(frozen=True)
class CmdsSettings:
    before_start: Optional[str] = None  # a shell snippet run on every node before torchrun
    after_stop: Optional[str] = None  # a shell snippet run on every node after torchrun ends


@dataclass(frozen=True)
class TaskSettings:
    type: str = "train"
    backend: str = "megatron"
    entrypoint: Optional[str] = None  # None: flagscale.train.driver


@dataclass(frozen=True)
class ExperimentSettings:
    """`experiment:` of the experiment config (conf/train.yaml)."""

    exp_name: str = "experiment"
    exp_dir: str = "outputs"
    task: TaskSettings = field(default_factory=TaskSettings)
    runner: RunnerSettings = field(default_factory=RunnerSettings)
    envs: dict = field(default_factory=dict)  # every process on every node
    node_envs: dict = field(default_factory=dict)  # per host of the hostfile: {host: {VAR: value}}
    device_type_envs: dict = field(default_factory=dict)  # per hostfile type=: {type: {VAR: value}}
    cmds: CmdsSettings = field(default_factory=CmdsSettings)


def _validate_experiment(e: ExperimentSettings) -> None:
    if e.task.type != "train":
        raise ConfigError(f"experiment.task.type={e.task.type}: flagscale train runs train tasks only")
    _one_of(e.task.backend, ("megatron",), "experiment.task.backend")
    r = e.runner
    _positive(r.nnodes, "experiment.runner.nnodes")
    _positive(r.nproc_per_node, "experiment.runner.nproc_per_node")
    if not (0 < r.ssh_port < 65536):
        raise ConfigError(f"experiment.runner.ssh_port={r.ssh_port}: not a TCP port")
    if r.master_port is not None and not (0 < r.master_port < 65536):
        raise ConfigError(f"experiment.runner.master_port={r.master_port}: not a TCP port")
    if r.nnodes > 1 and not r.hostfile:
        raise ConfigError(f"experiment.runner.nnodes={r.nnodes} needs experiment.runner.hostfile "
                          "(lines of `host slots=N [type=device]`)")
    if not e.exp_name or "/" in e.exp_name:
        raise ConfigError(f"experiment.exp_name={e.exp_name!r}: must be a plain, non-empty name")
    _check_envs(e.envs, "experiment.envs")
    for table, key in ((e.node_envs, "experiment.node_envs"), (e.device_type_envs, "experiment.device_type_envs")):
        for name, envs in table.items():
            if not isinstance(envs, dict):
                raise ConfigError(f"{key}.{name}: expected a mapping of VARIABLE: value")
            _check_envs(envs, f"{key}.{name}")


def _check_envs(envs: dict, key: str) -> None:
    import re

    for name, value in envs.items():
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", str(name)):
            raise ConfigError(f"{key}.{name}: not an environment variable name")
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{key}.{name}: expected a plain value, got {type(value).__name__}")


# ------------------------------------------------------------------------------ conversion + entry
def _nearest(word: str, choices) -> str:
    near = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1)
    return f" (did you mean {near[0]!r}?)" if near else ""


def _convert(cls, data: Any, key: str):
    """`data` (plain dicts/lists from OmegaConf or JSON) as an instance of dataclass `cls`, strictly."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{key}: expected a mapping, got {type(data).__name__} {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [k for k in data if k not in fields]
    if unknown:
        hint = _nearest(unknown[0], fields) or f"; known keys: {', '.join(fields)}"
        raise ConfigError(f"{key}.{unknown[0]}: unknown key{hint}")
    hints = typing.get_type_hints(cls)
    values = {name: _value(hints[name], data[name], f"{key}.{name}") for name in data}
    return cls(**values)


def _value(hint, value: Any, key: str):
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None:
            return None
        return _value(args[0], value, key)
    if dataclasses.is_dataclass(hint):
        return _convert(hint, value, key)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}={value!r}: expected true or false")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}={value!r}: expected an integer")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}={value!r}: expected a number")
        return float(value)
    if hint is str:
        if isinstance(value, (dict, list)) or value is None:
            raise ConfigError(f"{key}={value!r}: expected a string")
        return str(value)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}={value!r}: expected a list")
        return tuple(str(v) for v in value)
    if hint is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}={value!r}: expected a mapping")
        return {str(k): v for k, v in value.items()}
    raise TypeError(f"unsupported settings type {hint!r}")  # a bug here, not the user's


def train_settings(data: Any, where: str = "train") -> TrainSettings:
    """The `train` part of a config (a plain dict) as validated settings."""
    settings = _convert(TrainSettings, data, where)
    _validate_train(settings, where)
    return settings


def experiment_settings(data: Any) -> ExperimentSettings:
    settings = _convert(ExperimentSettings, data, "experiment")
    _validate_experiment(settings)
    return settings


def to_plain(cfg) -> dict:
    """A composed DictConfig as plain, resolved Python data (interpolations resolved once, here)."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        return OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as exc:
        raise ConfigError(f"config: {str(exc).splitlines()[0]}") from None


def as_dict(settings) -> dict:
    return dataclasses.asdict(settings)
