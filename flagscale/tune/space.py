"""The training tuner's candidates: the space enumerated, every divisibility rule applied by the train task's
own check (`TrainSettings.check`, the rules `flagscale train` itself enforces), memory predicted by the
memory model (flagscale.train.memory), and a heuristic order of what to try first.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from dataclasses import dataclass, replace
from typing import Any

from flagscale.errors import ConfigError
from flagscale.train.settings import TrainSettings
from flagscale.tune.settings import AUTO, TrainSpace

# (space dimension, train.system key); micro_batch_size lives in train.model, dp is derived
SYSTEM_KEYS = {
    "tp": "tensor_model_parallel_size",
    "pp": "pipeline_model_parallel_size",
    "ep": "expert_model_parallel_size",
    "cp": "context_parallel_size",
    "vpp": "virtual_pipeline_model_parallel_size",
    "sequence_parallel": "sequence_parallel",
    "use_distributed_optimizer": "use_distributed_optimizer",
    "recompute_granularity": "recompute_granularity",
    "recompute_method": "recompute_method",
    "recompute_num_layers": "recompute_num_layers",
}
RECOMPUTE_ORDER = {None: 0, "selective": 1, "full": 2}
# A micro-batch's fixed cost per stage (launches, communication latency, Python), relative to one sample's work
# on the whole model: measured on the tiny Llama at world size 4, a larger micro-batch won in every layout.
OVERHEAD = 1.0


@dataclass(frozen=True)
class Candidate:
    """One point of the space: the train.system knobs and the micro-batch size (dp follows from them)."""

    tp: int
    pp: int
    ep: int
    cp: int
    vpp: int | None
    micro_batch_size: int
    sequence_parallel: bool | None
    use_distributed_optimizer: bool
    recompute_granularity: str | None
    recompute_method: str | None
    recompute_num_layers: int | None
    dp: int = 0  # filled by `enumerate_space`

    @property
    def key(self) -> str:
        """A stable name: the history's key of this candidate, across restarts."""
        rc = self.recompute_granularity or "none"
        if self.recompute_granularity == "full":
            rc += f"-{self.recompute_method}-{self.recompute_num_layers or 'all'}"
        sp = {None: "auto", True: "on", False: "off"}[self.sequence_parallel]
        return (
            f"tp{self.tp}-pp{self.pp}-dp{self.dp}-ep{self.ep}-cp{self.cp}-vpp{self.vpp or 1}-mbs{self.micro_batch_size}"
            f"-sp_{sp}-do_{'on' if self.use_distributed_optimizer else 'off'}-rc_{rc}"
        )

    @property
    def layout(self) -> tuple[int, int, int, int, int]:
        """The parallel layout: candidates of one layout differ only in memory/speed knobs and micro-batch."""
        return (self.tp, self.pp, self.dp, self.ep, self.cp)

    def settings(self) -> dict[str, Any]:
        """The values as `train.system` / `train.model` keys (for history and the best YAML)."""
        out: dict[str, Any] = {SYSTEM_KEYS[k]: getattr(self, k) for k in SYSTEM_KEYS}
        out["micro_batch_size"] = self.micro_batch_size
        out["data_parallel_size"] = self.dp
        return out

    def apply(self, train: TrainSettings) -> TrainSettings:
        system = {SYSTEM_KEYS[k]: getattr(self, k) for k in SYSTEM_KEYS}
        return replace(
            train,
            system=replace(train.system, **system),
            model=replace(train.model, micro_batch_size=self.micro_batch_size),
        )

    def apply_plain(self, train: dict) -> dict:
        """The config's `train` section (plain data) with this candidate's values."""
        out = {**train, "system": dict(train.get("system") or {}), "model": dict(train.get("model") or {})}
        out["system"].update({SYSTEM_KEYS[k]: getattr(self, k) for k in SYSTEM_KEYS})
        out["model"]["micro_batch_size"] = self.micro_batch_size
        return out


@dataclass(frozen=True)
class Rejected:
    candidate: Candidate
    reason: str


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _powers_of_two(limit: int) -> list[int]:
    return [2**i for i in range(int(math.log2(limit)) + 1)] if limit >= 1 else [1]


def dimension_values(space: TrainSpace, train: TrainSettings, world_size: int, nproc_per_node: int) -> dict[str, tuple]:
    """Every dimension's values: the listed ones, `auto`'s, or (left out) the config's own."""
    s, m = train.system, train.model
    auto: dict[str, tuple] = {
        # tensor parallelism stays within a node: its all-reduces are per layer
        "tp": tuple(d for d in _divisors(world_size) if d <= nproc_per_node),
        "pp": tuple(d for d in _divisors(world_size) if m.num_layers % d == 0),
        "dp": (),  # any
        "ep": tuple(_divisors(world_size)) if m.moe is not None else (1,),
        "cp": (1,),
        "vpp": (None,),
        "micro_batch_size": tuple(_powers_of_two(m.global_batch_size)),
        "sequence_parallel": (None, True),
        "use_distributed_optimizer": (False, True),
        "recompute_granularity": (None, "selective", "full"),
        "recompute_method": ("uniform",),
        "recompute_num_layers": (None,),
    }
    own: dict[str, tuple] = {
        "dp": (),
        "micro_batch_size": (m.micro_batch_size,),
        **{k: (getattr(s, key),) for k, key in SYSTEM_KEYS.items()},
    }
    values = {}
    for f in dataclasses.fields(TrainSpace):
        given = getattr(space, f.name)
        values[f.name] = auto[f.name] if given == AUTO else own[f.name] if given is None else tuple(given)
    return values


def _normalized(c: Candidate) -> Candidate:
    """Knobs that mean nothing in this candidate take their neutral value, so equal runs are one candidate."""
    if c.tp == 1:
        c = replace(c, sequence_parallel=None)
    if c.dp == 1:
        c = replace(c, use_distributed_optimizer=False)
    if c.recompute_granularity != "full":
        c = replace(c, recompute_method=None, recompute_num_layers=None)
    elif c.recompute_method is None:
        c = replace(c, recompute_method="uniform")
    if c.pp == 1 or c.vpp == 1:
        c = replace(c, vpp=None)
    return c


def enumerate_space(
    space: TrainSpace, train: TrainSettings, world_size: int, nproc_per_node: int
) -> tuple[list[Candidate], list[Rejected]]:
    """(valid candidates, rejected ones with the train task's own reason), each once, in enumeration order."""
    values = dimension_values(space, train, world_size, nproc_per_node)
    names = [n for n in values if n != "dp"]
    valid: list[Candidate] = []
    rejected: list[Rejected] = []
    seen: set[str] = set()
    for combo in itertools.product(*(values[n] for n in names)):
        c = Candidate(**dict(zip(names, combo, strict=True)))
        c = _normalized(replace(c, dp=max(1, world_size // (c.tp * c.pp * c.cp))))
        if c.key in seen:
            continue
        seen.add(c.key)
        reason = _reason(c, train, world_size, values["dp"])
        if reason:
            rejected.append(Rejected(c, reason))
        else:
            valid.append(c)
    return valid, rejected


def _reason(c: Candidate, train: TrainSettings, world_size: int, dps: tuple) -> str | None:
    if world_size % (c.tp * c.pp * c.cp):
        return f"tp x pp x cp = {c.tp * c.pp * c.cp} does not divide the world size {world_size}"
    if dps and c.dp not in dps:
        return f"data-parallel size {c.dp} is not in the space's dp {list(dps)}"
    try:
        c.apply(train).check(world_size)
    except ConfigError as exc:
        return str(exc)
    return None


def nothing_divides(rejected: list[Rejected], world_size: int) -> ConfigError:
    first = rejected[0].reason if rejected else "the space is empty"
    return ConfigError(
        f"experiment.auto_tuner.space: none of its {len(rejected)} candidate(s) runs at world size {world_size}; "
        f"the first: {first}"
    )


# ------------------------------------------------------------------------------------------ memory
def vocab_size(train: TrainSettings) -> int | None:
    from flagscale.train.tokenizer import ByteTokenizer

    m = train.model
    return m.vocab_size or (ByteTokenizer.vocab_size if train.data.tokenizer.type == "byte" else None)


def predicted_bytes(c: Candidate, train: TrainSettings, world_size: int, vocab: int) -> int | None:
    """The memory model's largest per-rank total of this candidate (flagscale.train.memory.estimate); None
    without a memory model (nothing is then pruned)."""
    try:
        from flagscale.train.memory import estimate
    except ImportError:
        return None
    return max(rank.total for rank in estimate(c.apply(train), world_size, vocab))


# ------------------------------------------------------------------------------------------ order
def cost(c: Candidate, train: TrainSettings) -> float:
    """A relative step-time guess, lower first: the order to try candidates in, never a reason to skip one.

    A step is (micro-batches + pipeline fill) x a stage's time per micro-batch; that time is a fixed overhead
    (kernel launches, communication latency) plus the micro-batch's share of the model's work, grown by the
    tensor-parallel all-reduces, recompute's second forward, and the distributed optimizer's extra gather."""
    micro_batches = max(1, train.model.global_batch_size // (c.micro_batch_size * c.dp))
    fill = (c.pp - 1) / (c.vpp or 1)
    recompute = {None: 0.0, "selective": 0.1, "full": 0.33}[c.recompute_granularity]
    comm = 1 + 0.15 * (c.tp - 1) + 0.1 * (c.cp - 1) + 0.05 * (c.ep - 1)
    work = c.micro_batch_size * (1 + recompute) * comm / (c.tp * c.pp * c.cp)
    optimizer = 1.03 if c.use_distributed_optimizer else 1.0
    return (micro_batches + fill) * (OVERHEAD + work) * optimizer


def differs_only_in_recompute(slow: Candidate, fast: Candidate) -> bool:
    """`slow` is `fast` with more recomputation: the same work plus a second forward, never faster."""
    same = replace(slow, recompute_granularity=None, recompute_method=None, recompute_num_layers=None) == replace(
        fast, recompute_granularity=None, recompute_method=None, recompute_num_layers=None
    )
    return same and RECOMPUTE_ORDER[slow.recompute_granularity] > RECOMPUTE_ORDER[fast.recompute_granularity]
