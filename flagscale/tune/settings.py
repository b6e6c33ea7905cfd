"""`experiment.auto_tuner`: the tuners' settings, parsed by flagscale.settings.convert into frozen dataclasses.

A dimension of a space is a list of values or `auto` (the tuner's own choice, see flagscale.tune.space); a
dimension left out keeps the config's own value. An unknown dimension fails with the nearest valid name.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from flagscale.errors import ConfigError
from flagscale.settings import at_least, convert, setting

AUTO = "auto"


def _values(kind: type | tuple, allow_none: bool = False):
    """A check: `auto`, or a non-empty list (one value alone is a list of one) of `kind` values (None too
    when `allow_none`)."""

    def check(value: Any) -> Any:
        if value == AUTO:
            return AUTO
        items = list(value) if isinstance(value, (list, tuple)) else [value]
        if not items:
            raise ValueError("expected auto or a non-empty list of values")
        for item in items:
            if item is None and allow_none:
                continue
            if isinstance(item, bool) and kind is not bool:
                raise ValueError(f"{item!r} is not {_what(kind)}")
            if not isinstance(item, kind if isinstance(kind, type) else tuple(type(k) for k in kind)):
                raise ValueError(f"{item!r} is not {_what(kind)}")
            if isinstance(kind, tuple) and item not in kind:
                raise ValueError(f"{item!r}: use {', '.join(map(str, kind))}")
            if isinstance(item, int) and not isinstance(item, bool) and item < 1:
                raise ValueError(f"{item!r}: sizes are at least 1")
        return tuple(dict.fromkeys(items))  # in the given order, each once

    return check


def _what(kind: type | tuple) -> str:
    if isinstance(kind, tuple):
        return "one of " + ", ".join(map(str, kind))
    return {int: "an integer", bool: "true or false"}.get(kind, str(kind))


def _space(kind: type | tuple, allow_none: bool = False) -> Any:
    return setting(None, check=_values(kind, allow_none))


@dataclass(frozen=True)
class TrainSpace:
    """`experiment.auto_tuner.space` of `flagscale train`: None (left out) keeps the config's value."""

    tp: Any = _space(int)  # tensor_model_parallel_size
    pp: Any = _space(int)  # pipeline_model_parallel_size
    dp: Any = _space(int)  # data-parallel size (world size / (tp x pp x cp)): a filter, it is derived
    ep: Any = _space(int)  # expert_model_parallel_size (MoE families)
    cp: Any = _space(int)  # context_parallel_size
    vpp: Any = _space(int, allow_none=True)  # virtual_pipeline_model_parallel_size
    micro_batch_size: Any = _space(int)
    sequence_parallel: Any = _space(bool, allow_none=True)
    use_distributed_optimizer: Any = _space(bool)
    recompute_granularity: Any = _space(("selective", "full"), allow_none=True)
    recompute_method: Any = _space(("uniform", "block"), allow_none=True)
    recompute_num_layers: Any = _space(int, allow_none=True)


def _fraction(value: float) -> float:
    if not (0 < value <= 1):
        raise ValueError("must be in (0, 1]")
    return value


@dataclass(frozen=True)
class TrainTunerSettings:
    """`experiment.auto_tuner` of `flagscale train` (docs/auto_tune.md)."""

    space: TrainSpace = field(default_factory=TrainSpace)
    # per-rank memory budget; None: the device manifest's memory_gib, else (cpu) host memory / processes per node
    memory_budget_gib: float | None = setting(None, check=at_least(0.001, "a number"))
    memory_fraction: float = setting(1.0, check=_fraction)  # of the budget a candidate may be predicted to use
    metric: Literal["tokens_per_sec"] = "tokens_per_sec"  # from the trial's own logs/metrics.jsonl
    strategy: Literal["tuned", "exhaustive"] = "tuned"  # exhaustive: every valid candidate, no dominance skips
    iterations: int = setting(10, check=at_least(1, "an integer"))  # train_iters of a trial
    warmup_iterations: int = setting(2, check=at_least(0, "an integer"))  # not measured
    trial_timeout: float = setting(600.0, check=at_least(1, "a number"))  # seconds; a trial is stopped then
    total_timeout: float | None = setting(None, check=at_least(1, "a number"))  # seconds for the whole search
    max_trials: int | None = setting(None, check=at_least(1, "an integer"))  # launched trials (resumed ones count)
    # strategy tuned: once every layout had a trial, stop after this many trials in a row without a new best
    patience: int | None = setting(None, check=at_least(1, "an integer"))
    run_best: bool = False  # launch the best configuration when the search ends
    dir: str | None = None  # history and best.yaml; None: <experiment.exp_dir>/auto_tune


@dataclass(frozen=True)
class LoadProfile:
    """`experiment.auto_tuner.load` of `flagscale serve`: the closed-loop load every trial is measured with."""

    concurrency: int = setting(4, check=at_least(1, "an integer"))  # clients, each sending when answered
    prompt_tokens: int = setting(16, check=at_least(1, "an integer"))  # about this many prompt tokens
    output_tokens: int = setting(32, check=at_least(1, "an integer"))  # max_tokens (EOS ignored)
    requests: int = setting(32, check=at_least(1, "an integer"))  # per trial, over all clients
    warmup_requests: int = setting(2, check=at_least(0, "an integer"))  # sent first, not measured


@dataclass(frozen=True)
class ServeTunerSettings:
    """`experiment.auto_tuner` of `flagscale serve` (docs/auto_tune.md)."""

    # engine argument -> list of values (validated against the engine's own flags), plus `replicas`
    space: dict = field(default_factory=dict)
    model: str | None = None  # serve_id of the model to tune; None: the config's only model
    load: LoadProfile = field(default_factory=LoadProfile)
    slo_p99_ms: float = setting(5000.0, check=at_least(0.001, "a number"))  # p99 request latency
    max_trials: int | None = setting(None, check=at_least(1, "an integer"))
    trial_timeout: float = setting(300.0, check=at_least(1, "a number"))
    total_timeout: float | None = setting(None, check=at_least(1, "a number"))
    run_best: bool = False
    dir: str | None = None  # None: <experiment.exp_dir>/auto_tune


WHERE = "experiment.auto_tuner"


def train_tuner_settings(data: Any) -> TrainTunerSettings:
    if data is None:
        raise ConfigError(f"action=auto_tune needs {WHERE}: its search space and limits (see docs/auto_tune.md)")
    settings = convert(TrainTunerSettings, data, WHERE, from_yaml=True)
    if settings.warmup_iterations >= settings.iterations:
        raise ConfigError(
            f"{WHERE}.warmup_iterations={settings.warmup_iterations} leaves nothing to measure of "
            f"iterations={settings.iterations}: raise iterations"
        )
    return settings


def serve_tuner_settings(data: Any) -> ServeTunerSettings:
    if data is None:
        raise ConfigError(f"action=auto_tune needs {WHERE}: its search space and load (see docs/auto_tune.md)")
    settings = convert(ServeTunerSettings, data, WHERE, from_yaml=True)
    for key, values in settings.space.items():
        if not isinstance(values, (list, tuple)) or not values:
            raise ConfigError(f"{WHERE}.space.{key}={values!r}: expected a non-empty list of values")
    return settings
