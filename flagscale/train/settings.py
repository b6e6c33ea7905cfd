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
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from flagscale.errors import ConfigError
from flagscale.runner.slurm import SlurmSettings
from flagscale.settings import convert, nonempty, plain, setting
from flagscale.train.hetero import HeteroSettings


# Per-field checks: `convert` reports their ValueError as `<dotted key>=<value>: <message>`.
def _positive(value: int) -> int:
    if value < 1:
        raise ValueError("must be at least 1")
    return value


def _not_negative(value: int) -> int:
    if value < 0:
        raise ValueError("must be >= 0")
    return value


def _port(value: int) -> int:
    if not (0 < value < 65536):
        raise ValueError("not a TCP port")
    return value


def _split(value: str) -> str:
    try:
        weights = [float(part) for part in value.split(",")]
    except ValueError:
        weights = []
    if len(weights) != 3 or min(weights) < 0 or weights[0] <= 0:
        raise ValueError("three comma-separated weights train,valid,test with train > 0 (e.g. 98,2,0)")
    return value


def _plain_name(value: str) -> str:
    if not value or "/" in value or not value.isprintable():  # it names folders, jobs and script comments
        raise ValueError("must be a plain, non-empty name (no / and no control characters)")
    return value


def _train_task(value: str) -> str:
    if value != "train":
        raise ValueError("flagscale train runs train tasks only")
    return value


# --------------------------------------------------------------------------------- train (the task)
@dataclass(frozen=True)
class OptimizerSettings:
    name: Literal["adam", "sgd"] = "adam"
    lr: float = 1e-3
    min_lr: float = 0.0
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    warmup_iters: int = 0
    decay_style: Literal["constant", "linear", "cosine", "inverse-square-root"] = "cosine"
    decay_iters: int | None = None  # None: train_iters


def _positive_number(value: float) -> float:
    if value <= 0:
        raise ValueError("must be > 0")
    return value


def _scaling_factor(value: float) -> float:
    if value < 1:
        raise ValueError("must be >= 1 (1: no scaling)")
    return value


# What `train.model.family` builds (flagscale/train/families.py): gpt is megatron.core's GPT (LayerNorm, GeLU,
# biases); the others are the dense decoder families of Hugging Face checkpoints (flagscale checkpoint import).
Family = Literal["gpt", "llama", "qwen2", "qwen3", "qwen3_moe", "mixtral", "deepseek_v3"]


@dataclass(frozen=True)
class MoESettings:
    """`train.model.moe`: the mixture-of-experts MLP of the MoE families (megatron.core's moe_* settings)."""

    num_experts: int = setting(check=_positive)
    router_topk: int = setting(2, check=_positive)  # experts each token goes to
    ffn_hidden_size: int | None = setting(None, check=_positive)  # one expert's; None: model.ffn_hidden_size
    shared_expert_ffn_hidden_size: int | None = setting(None, check=_positive)  # DeepSeek's shared experts
    dense_layers: int = setting(0, check=_not_negative)  # the first layers keep a dense MLP (DeepSeek-V3: 3)
    # softmax (Mixtral, Qwen3-MoE) or sigmoid (DeepSeek-V3) router scores
    router_score_function: Literal["softmax", "sigmoid"] = "softmax"
    router_pre_softmax: bool = False  # softmax over all experts before the top-k (true) or over the k (false)
    router_expert_bias: bool = False  # DeepSeek-V3's aux-loss-free load balancing bias
    router_num_groups: int | None = setting(None, check=_positive)  # group-limited routing: expert groups
    router_group_topk: int | None = setting(None, check=_positive)  # and how many of them a token may use
    router_topk_scaling_factor: float | None = None  # routed output scale (DeepSeek-V3: 2.5)
    aux_loss_coeff: float = 1e-2
    token_dispatcher: Literal["allgather", "alltoall"] = "alltoall"


@dataclass(frozen=True)
class MLASettings:
    """`train.model.mla`: multi-latent attention (DeepSeek-V2/V3): low-rank queries and keys/values."""

    kv_lora_rank: int = setting(check=_positive)
    qk_head_dim: int = setting(check=_positive)  # the part of a query/key head without RoPE
    qk_pos_emb_head_dim: int = setting(check=_positive)  # the decoupled RoPE part
    v_head_dim: int = setting(check=_positive)
    q_lora_rank: int | None = setting(None, check=_positive)  # None: queries are not compressed


def _probability(value: float) -> float:
    if not (0.0 <= value < 1.0):
        raise ValueError("must be in [0, 1)")
    return value


@dataclass(frozen=True)
class LoRASettings:
    """`train.model.lora`: low-rank adapters on the linear layers (flagscale/train/lora.py); base weights frozen."""

    rank: int = setting(8, check=_positive)
    alpha: float = setting(16.0, check=_positive_number)  # the adapter's output is scaled by alpha / rank
    dropout: float = setting(0.0, check=_probability)  # on the adapter's input, as PEFT
    # megatron names (linear_qkv, linear_proj, linear_fc1, linear_fc2) or HF ones (q_proj+k_proj+v_proj together,
    # o_proj, gate_proj+up_proj together, down_proj): megatron fuses q/k/v and gate/up into one layer
    target_modules: tuple[str, ...] = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")


@dataclass(frozen=True)
class ModelSettings:
    family: Family = "gpt"
    num_layers: int = setting(2, check=_positive)
    hidden_size: int = setting(64, check=_positive)
    num_attention_heads: int = setting(4, check=_positive)
    num_query_groups: int | None = setting(None, check=_positive)  # key/value heads (GQA); None: one per head
    kv_channels: int | None = setting(None, check=_positive)  # head dim; None: hidden_size / num_attention_heads
    ffn_hidden_size: int | None = None  # None: 4 x hidden
    seq_length: int = setting(32, check=_positive)
    max_position_embeddings: int | None = None  # None: seq_length
    position_embedding_type: Literal["rope", "learned_absolute"] = "rope"
    rotary_base: float = setting(10000.0, check=_positive_number)
    # Llama-3 RoPE scaling by this factor (megatron.core's: low/high frequency factors 1 and 4, original
    # context 8192); None: no scaling.
    rotary_scaling_factor: float | None = setting(None, check=_scaling_factor)
    norm_epsilon: float = setting(1e-5, check=_positive_number)
    share_embeddings_and_output_weights: bool = False  # tied input embedding and output layer
    vocab_size: int | None = setting(None, check=_positive)  # None: the tokenizer's; an HF model's config.json
    init_method_std: float = 0.02
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    make_vocab_size_divisible_by: int = setting(64, check=_positive)
    micro_batch_size: int = setting(1, check=_positive)
    global_batch_size: int = setting(8, check=_positive)
    train_iters: int = setting(10, check=_positive)
    optimizer: OptimizerSettings = field(default_factory=OptimizerSettings)
    moe: MoESettings | None = None  # the MoE families' experts
    mla: MLASettings | None = None  # deepseek_v3's attention
    lora: LoRASettings | None = None  # None: train every weight


@dataclass(frozen=True)
class TokenizerSettings:
    # byte: 256 byte values + end-of-document, offline; hf: a local tokenizer folder
    type: Literal["byte", "hf"] = "byte"
    path: str | None = None


@dataclass(frozen=True)
class SFTSettings:
    """`train.data.sft`: chat-format JSONL for supervised fine-tuning (flagscale/train/sft.py)."""

    path: str = ""  # JSON lines of {"messages": [{"role": ..., "content": ...}, ...]}
    # packed: records end to end in seq_length, each attending only to itself; padded: one record per sequence
    packing: Literal["packed", "padded"] = "packed"


@dataclass(frozen=True)
class DataSettings:
    format: Literal["pretrain", "sft"] = "pretrain"  # sft: chat records, loss on assistant tokens only
    data_path: str = ""  # prefix of the .bin/.idx pair written by tools/preprocess_data.py (pretrain)
    sft: SFTSettings = field(default_factory=SFTSettings)
    split: str = setting("100,0,0", check=_split)
    tokenizer: TokenizerSettings = field(default_factory=TokenizerSettings)


@dataclass(frozen=True)
class CheckpointSettings:
    save: str | None = None  # folder of iter_NNNNNNN/ checkpoints; None: no checkpoints
    load: str | None = None  # None: resume from `save` when it holds one
    save_interval: int = setting(0, check=_not_negative)  # 0: only at the end (when `save` is set)
    save_at_end: bool = True
    # true: start from `load`'s model weights only (iteration 0, a fresh optimizer and schedule), e.g. a
    # checkpoint made by `flagscale checkpoint import`; once `save` holds a checkpoint, resume from that.
    finetune: bool = False
    # a Hugging Face folder (config.json, safetensors, tokenizer) to start from: its architecture and tokenizer
    # become train.model's and train.data.tokenizer's, and it is imported at this run's layout into the flagscale
    # cache once (flagscale/train/hf_start.py), then loaded with finetune semantics. Excludes `load`.
    hf_model: str | None = None
    # keep only the newest N complete checkpoints under `save` (older ones removed once a newer one is
    # complete); None: keep all
    keep_last: int | None = setting(None, check=_positive)


@dataclass(frozen=True)
class WandbSettings:
    project: str = setting(check=nonempty)  # a W&B project: configured means this is set
    name: str | None = None  # the run's name; None: the experiment folder's name
    mode: Literal["online", "offline", "disabled"] = "online"  # offline: files under <exp_dir>/logs/wandb only


@dataclass(frozen=True)
class LoggingSettings:
    log_interval: int = setting(1, check=_positive)
    metrics_file: str | None = None  # JSON lines, one per logged step; None: <exp_dir>/logs/metrics.jsonl
    # TensorBoard event files in <metrics file's folder>/tensorboard: None: when `tensorboard` is installed
    # (the train extra installs it); true: required; false: off
    tensorboard: bool | None = None
    wandb: WandbSettings | None = None  # Weights & Biases (needs `pip install wandb`); None: off


@dataclass(frozen=True)
class SystemSettings:
    tensor_model_parallel_size: int = setting(1, check=_positive)
    pipeline_model_parallel_size: int = setting(1, check=_positive)
    expert_model_parallel_size: int = setting(1, check=_positive)  # MoE: experts split over this many ranks
    # Only 1 runs today: megatron's context parallelism needs TransformerEngine's attention, which the local
    # layer spec (what flagscale train builds on every device) does not have.
    context_parallel_size: int = setting(1, check=_positive)
    # Megatron's interleaved 1F1B schedule: model chunks per pipeline rank. None or 1: the plain 1F1B schedule
    # (values above 1 are refused until the driver builds and checkpoints several chunks per rank).
    virtual_pipeline_model_parallel_size: int | None = setting(None, check=_positive)
    # Activations split along the sequence over TP ranks outside attention/MLP (needs TP > 1). None: on exactly
    # where megatron requires it (a MoE family with TP > 1), off otherwise.
    sequence_parallel: bool | None = None
    use_distributed_optimizer: bool = False  # optimizer states (and fp32 main weights) sharded over DP ranks
    # Activation recomputation: selective recomputes core attention (softmax(QK^T)V) in the backward pass; full
    # recomputes whole layers from their input, `recompute_method` picking which: uniform (chunks of
    # recompute_num_layers layers, default 1, i.e. every layer) or block (the first recompute_num_layers layers
    # of each stage, default all of them).
    recompute_granularity: Literal["selective", "full"] | None = None
    recompute_method: Literal["uniform", "block"] | None = None
    recompute_num_layers: int | None = setting(None, check=_positive)
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    seed: int = 1234
    deterministic: bool = False  # torch.use_deterministic_algorithms: reproducible, and slower on GPUs
    # heterogeneous training: ordered meshes with their own TP/DP/PP (flagscale/train/hetero.py, docs/hetero.md)
    hetero: HeteroSettings | None = None
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
        if s.hetero is not None:  # the meshes set the layout: their own rules
            from flagscale.train import hetero

            hetero.check(self, world_size, where)
            return
        tp, pp = s.tensor_model_parallel_size, s.pipeline_model_parallel_size
        if world_size % (tp * pp):
            raise ConfigError(
                f"{where}.system: tensor_model_parallel_size={tp} x pipeline_model_parallel_size={pp} "
                f"does not divide the world size {world_size} (nnodes x nproc_per_node)"
            )
        dp = world_size // (tp * pp)
        if m.global_batch_size % (m.micro_batch_size * dp):
            raise ConfigError(
                f"{where}.model.global_batch_size={m.global_batch_size} is not a multiple of "
                f"micro_batch_size={m.micro_batch_size} x data-parallel size {dp}"
            )
        if m.num_attention_heads % tp:
            raise ConfigError(
                f"{where}.model.num_attention_heads={m.num_attention_heads} is not a multiple of "
                f"tensor_model_parallel_size={tp}"
            )
        if m.kv_channels is None and m.hidden_size % m.num_attention_heads:
            raise ConfigError(
                f"{where}.model.hidden_size={m.hidden_size} is not a multiple of "
                f"num_attention_heads={m.num_attention_heads} (or set kv_channels, the head dim)"
            )
        groups = m.num_query_groups or m.num_attention_heads
        if m.num_attention_heads % groups:
            raise ConfigError(
                f"{where}.model.num_attention_heads={m.num_attention_heads} is not a multiple of "
                f"num_query_groups={groups}"
            )
        if groups % tp:
            raise ConfigError(
                f"{where}.model.num_query_groups={groups} is not a multiple of tensor_model_parallel_size={tp}: "
                "every tensor-parallel rank needs whole key/value heads"
            )
        self._check_moe(dp, where)
        if m.num_layers % pp:
            raise ConfigError(
                f"{where}.model.num_layers={m.num_layers} is not a multiple of pipeline_model_parallel_size={pp}"
            )
        self._check_system(where)
        if (m.max_position_embeddings or m.seq_length) < m.seq_length:
            raise ConfigError(
                f"{where}.model.max_position_embeddings={m.max_position_embeddings} is below seq_length={m.seq_length}"
            )

    def _check_moe(self, dp: int, where: str) -> None:
        m, ep = self.model, self.system.expert_model_parallel_size
        if m.moe is None:
            if ep > 1:
                raise ConfigError(
                    f"{where}.system.expert_model_parallel_size={ep} needs a MoE family (train.model.moe)"
                )
            return
        if m.moe.num_experts % ep:
            raise ConfigError(
                f"{where}.model.moe.num_experts={m.moe.num_experts} is not a multiple of "
                f"expert_model_parallel_size={ep}"
            )
        if dp % ep:
            raise ConfigError(
                f"{where}.system.expert_model_parallel_size={ep} does not divide the data-parallel size {dp}: experts "
                "are split over data-parallel ranks"
            )

    def _check_system(self, where: str) -> None:
        """The memory/speed knobs of train.system against the layout."""
        s, m = self.system, self.model
        tp, pp = s.tensor_model_parallel_size, s.pipeline_model_parallel_size
        if s.context_parallel_size != 1:
            raise ConfigError(
                f"{where}.system.context_parallel_size={s.context_parallel_size}: only 1 is supported (megatron's "
                "context parallelism needs TransformerEngine attention; flagscale train builds the local layer spec)"
            )
        vpp = s.virtual_pipeline_model_parallel_size
        if vpp is not None and vpp > 1:
            if pp == 1 or m.num_layers % (pp * vpp):
                raise ConfigError(
                    f"{where}.system.virtual_pipeline_model_parallel_size={vpp} needs pipeline_model_parallel_size > 1"
                    f" and num_layers ({m.num_layers}) a multiple of pipeline x virtual ({pp} x {vpp})"
                )
            raise ConfigError(
                f"{where}.system.virtual_pipeline_model_parallel_size={vpp}: the interleaved pipeline schedule is not "
                "supported yet (the driver builds one model chunk per pipeline rank); use null or 1"
            )
        if s.sequence_parallel and tp == 1:
            raise ConfigError(
                f"{where}.system.sequence_parallel=true needs tensor_model_parallel_size > 1 (it splits activations "
                "over TP ranks)"
            )
        if s.sequence_parallel is False and m.moe is not None and tp > 1:
            raise ConfigError(
                f"{where}.system.sequence_parallel=false: megatron trains MoE with tensor parallelism only with "
                "sequence parallelism (set it true or null)"
            )
        c = s.checkpoint
        if s.use_distributed_optimizer and (c.save or (c.load and not c.finetune)):
            # megatron-core 0.16.1 without TransformerEngine/Apex (torch's Adam) saves the sharded optimizer states
            # in no format it can load back (measured: KeyError 'step', in-place copy into a leaf view)
            raise ConfigError(
                f"{where}.system.use_distributed_optimizer=true cannot save or resume optimizer checkpoints on this "
                "build yet: set system.checkpoint.save=null (e.g. for tuning trials) or use_distributed_optimizer=false"
            )
        self._check_recompute(where)

    def _check_recompute(self, where: str) -> None:
        s = self.system
        g, method, n = s.recompute_granularity, s.recompute_method, s.recompute_num_layers
        if g == "full" and method is None:
            raise ConfigError(f"{where}.system.recompute_granularity=full needs recompute_method: uniform or block")
        if g != "full" and (method is not None or n is not None):
            raise ConfigError(
                f"{where}.system.recompute_method and recompute_num_layers need recompute_granularity=full "
                f"(it is {g or 'null'}; selective recomputes core attention in every layer)"
            )
        per_stage = self.model.num_layers // s.pipeline_model_parallel_size
        if n is not None and n > per_stage:
            raise ConfigError(
                f"{where}.system.recompute_num_layers={n} exceeds the {per_stage} layer(s) of a pipeline stage"
            )

    @property
    def sequence_parallel(self) -> bool:
        """Whether the run uses sequence parallelism (`system.sequence_parallel`, None resolved)."""
        s = self.system
        if s.sequence_parallel is None:
            return self.model.moe is not None and s.tensor_model_parallel_size > 1
        return s.sequence_parallel

    @property
    def recompute_layers(self) -> int | None:
        """megatron's recompute_num_layers of full recompute (None: no full recompute), defaults resolved:
        uniform: 1 (every layer its own unit: all layers recomputed); block: every layer of the stage."""
        s = self.system
        if s.recompute_granularity != "full":
            return None
        if s.recompute_num_layers is not None:
            return s.recompute_num_layers
        return 1 if s.recompute_method == "uniform" else self.model.num_layers // s.pipeline_model_parallel_size

    @property
    def data_prefix(self) -> Path:
        return Path(self.data.data_path)


def _validate_family_parts(m: ModelSettings, where: str) -> None:
    """MoE and MLA settings belong to the families that have them, and those families need them."""
    from flagscale.train.families import structure

    s = structure(m.family)
    for part, wanted in (("moe", s.moe), ("mla", s.mla)):
        given = getattr(m, part) is not None
        if wanted and not given:
            raise ConfigError(f"{where}.model.{part}: family {m.family} needs it (see docs/train.md, model families)")
        if given and not wanted:
            raise ConfigError(f"{where}.model.{part}: family {m.family} has none; remove it or pick a family with it")
    if m.moe is not None:
        if m.moe.router_topk > m.moe.num_experts:
            raise ConfigError(f"{where}.model.moe.router_topk={m.moe.router_topk} exceeds num_experts")
        if m.moe.dense_layers >= m.num_layers:
            raise ConfigError(f"{where}.model.moe.dense_layers={m.moe.dense_layers}: leave at least one MoE layer")
        if (m.moe.router_num_groups is None) != (m.moe.router_group_topk is None):
            raise ConfigError(f"{where}.model.moe: set router_num_groups and router_group_topk together")


def _validate_train(t: TrainSettings, where: str) -> None:
    """The combinations of fields the per-field checks cannot see."""
    o = t.model.optimizer
    if not (0.0 <= o.min_lr <= o.lr):
        raise ConfigError(f"{where}.model.optimizer: need 0 <= min_lr ({o.min_lr}) <= lr ({o.lr})")
    if t.data.format == "sft":
        from flagscale.train.sft import validate

        validate(t, where)
    elif not t.data.data_path:
        raise ConfigError(
            f"{where}.data.data_path is not set: point it at the prefix of a .bin/.idx pair "
            "made by tools/preprocess_data.py"
        )
    if t.data.tokenizer.type == "hf" and not t.data.tokenizer.path:
        raise ConfigError(f"{where}.data.tokenizer.path: the hf tokenizer needs a local tokenizer folder")
    m = t.model
    if m.family != "gpt" and m.position_embedding_type != "rope":
        raise ConfigError(
            f"{where}.model.position_embedding_type={m.position_embedding_type}: family {m.family} uses rope"
        )
    _validate_family_parts(m, where)
    if m.lora is not None:
        from flagscale.train.lora import validate as validate_lora

        validate_lora(m, where)
    if m.rotary_scaling_factor is not None and m.position_embedding_type != "rope":
        raise ConfigError(f"{where}.model.rotary_scaling_factor needs position_embedding_type=rope")
    c = t.system.checkpoint
    if c.hf_model and c.load:
        raise ConfigError(
            f"{where}.system.checkpoint: set load or hf_model, not both (hf_model imports the folder and loads that)"
        )
    if c.finetune and not (c.load or c.hf_model):
        raise ConfigError(
            f"{where}.system.checkpoint.finetune=true needs checkpoint.load: the checkpoint whose weights to start from"
        )


# ------------------------------------------------------------------------------- experiment (launch)
def _non_negative_number(value: float) -> float:
    if value < 0:
        raise ValueError("must be >= 0")
    return value


@dataclass(frozen=True)
class FaultToleranceSettings:
    """`experiment.runner.fault_tolerance`: what the job monitor (flagscale.runner.monitor) does on a fault."""

    max_restarts: int = setting(3, check=_not_negative)  # restarts after a crash or hang; then the job is failed
    # No heartbeat progress for this long is a hang. Generous by default: it also covers a checkpoint save, which
    # on a large job takes minutes, and start-up unless start_timeout is set.
    hang_timeout: float = setting(1800.0, check=_positive_number)
    # Start-up (imports, rendezvous, model build, checkpoint load: until a rank's first training heartbeat) may
    # take this long; None: hang_timeout. Lets a short hang_timeout catch hangs in training quickly.
    start_timeout: float | None = setting(None, check=_positive_number)
    restart_backoff: float = setting(10.0, check=_non_negative_number)  # seconds; doubles per restart, max 300 s
    heartbeat_interval: float = setting(1.0, check=_non_negative_number)  # min seconds between a rank's heartbeats


@dataclass(frozen=True)
class RunnerSettings:
    # local: this machine; ssh: the hostfile's nodes; slurm: sbatch (flagscale/train/slurm.py).
    # None: ssh with a hostfile, else local.
    launcher: Literal["local", "ssh", "slurm"] | None = None
    slurm: SlurmSettings = field(default_factory=SlurmSettings)  # the allocation, with launcher slurm
    nnodes: int = setting(1, check=_positive)
    nproc_per_node: int = setting(1, check=_positive)
    hostfile: str | None = None  # `host slots=N [type=device]` per line; needed when nnodes > 1
    master_addr: str | None = None  # None: 127.0.0.1, or the first host of the hostfile
    master_port: int | None = setting(None, check=_port)  # None: a free port (single node) or 29500 (multi-node)
    rdzv_backend: str = "c10d"
    rdzv_id: str | None = None  # None: derived from the experiment name
    device: str | None = None  # device manifest (hardware/<device>); None: the installed build's device
    visible_devices: str | None = None  # e.g. "0,1": exported as the device's visible-devices variable
    python: str | None = None  # interpreter on every node; None: the one running flagscale
    ssh_port: int = setting(22, check=_port)
    ssh_options: tuple[str, ...] = ()  # extra `ssh -o` options, e.g. StrictHostKeyChecking=no
    foreground: bool = False
    stop_timeout: float = 15.0
    fault_tolerance: FaultToleranceSettings = field(default_factory=FaultToleranceSettings)
    json: bool = False  # action=status prints the status record as JSON (`--json`)


@dataclass(frozen=True)
class CmdsSettings:
    before_start: str | None = None  # a shell snippet run on every node before torchrun
    after_stop: str | None = None  # a shell snippet run on every node after torchrun ends


@dataclass(frozen=True)
class TaskSettings:
    type: str = setting("train", check=_train_task)
    backend: Literal["megatron"] = "megatron"
    entrypoint: str | None = None  # None: flagscale.train.driver


@dataclass(frozen=True)
class ExperimentSettings:
    """`experiment:` of the experiment config (conf/train.yaml)."""

    exp_name: str = setting("experiment", check=_plain_name)
    exp_dir: str = "outputs"
    task: TaskSettings = field(default_factory=TaskSettings)
    runner: RunnerSettings = field(default_factory=RunnerSettings)
    envs: dict = field(default_factory=dict)  # every process on every node
    node_envs: dict = field(default_factory=dict)  # per host of the hostfile: {host: {VAR: value}}
    device_type_envs: dict = field(default_factory=dict)  # per hostfile type=: {type: {VAR: value}}
    cmds: CmdsSettings = field(default_factory=CmdsSettings)
    auto_tuner: dict | None = None  # action=auto_tune's space and limits (flagscale.tune.settings, docs/auto_tune.md)


def _validate_experiment(e: ExperimentSettings) -> None:
    r = e.runner
    _check_launcher(r)
    if r.nnodes > 1 and not r.hostfile and r.launcher != "slurm":
        raise ConfigError(
            f"experiment.runner.nnodes={r.nnodes} needs experiment.runner.hostfile "
            "(lines of `host slots=N [type=device]`)"
        )
    _check_envs(e.envs, "experiment.envs")
    for table, key in ((e.node_envs, "experiment.node_envs"), (e.device_type_envs, "experiment.device_type_envs")):
        for name, envs in table.items():
            if not isinstance(envs, dict):
                raise ConfigError(f"{key}.{name}: expected a mapping of VARIABLE: value")
            _check_envs(envs, f"{key}.{name}")


def _check_launcher(r: RunnerSettings) -> None:
    if r.launcher == "slurm":
        if r.hostfile:
            raise ConfigError(
                "experiment.runner.hostfile: with launcher slurm, Slurm picks the nodes; remove the hostfile "
                "(a node list goes in experiment.runner.slurm.extra_sbatch, e.g. --nodelist=...)"
            )
        if r.slurm.nodes is not None and r.nnodes not in (1, r.slurm.nodes):
            raise ConfigError(
                f"experiment.runner.slurm.nodes={r.slurm.nodes} but experiment.runner.nnodes={r.nnodes}: set one"
            )
        if r.slurm.gpus_per_node is not None and r.nproc_per_node > r.slurm.gpus_per_node:
            raise ConfigError(
                f"experiment.runner.nproc_per_node={r.nproc_per_node} is more than "
                f"experiment.runner.slurm.gpus_per_node={r.slurm.gpus_per_node}: one process per device"
            )
    elif r.launcher == "local" and r.hostfile:
        raise ConfigError("experiment.runner.launcher=local runs on this machine: remove the hostfile or use ssh")
    elif r.launcher == "ssh" and not r.hostfile:
        raise ConfigError("experiment.runner.launcher=ssh needs experiment.runner.hostfile (the nodes to reach)")


def _check_envs(envs: dict, key: str) -> None:
    for name, value in envs.items():
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", str(name)):
            raise ConfigError(f"{key}.{name}: not an environment variable name")
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{key}.{name}: expected a plain value, got {type(value).__name__}")


# ------------------------------------------------------------------------------------------ entry
def train_settings(data: Any, where: str = "train") -> TrainSettings:
    """The `train` part of a config (a plain dict) as validated settings."""
    settings = convert(TrainSettings, data, where, from_yaml=True)
    _validate_train(settings, where)
    return settings


def experiment_settings(data: Any) -> ExperimentSettings:
    settings = convert(ExperimentSettings, data, "experiment", from_yaml=True)
    _validate_experiment(settings)
    return settings


to_plain = plain  # a composed DictConfig as plain, resolved Python data


def as_dict(settings) -> dict:
    return dataclasses.asdict(settings)
