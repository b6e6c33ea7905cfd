"""The `transformations:` list of an infer/serve config, parsed once into frozen dataclasses (flagscale/settings.py).

Each item names a transformation and its parameters; `select:` picks the modules it applies to (omitted: the
denoiser itself)::

    transformations:
      - {name: timestep}                                    # added first by itself when a later one needs steps
      - {name: log_io, select: {type: FluxTransformerBlock}, path: io.jsonl}
      - {name: taylorseer, select: {type: FluxTransformer2DModel}, warmup: 3, interval: 3, order: 2}
      - {name: compile, select: {name: "transformer_blocks.*"}}

Only the standard library is imported here: a config is checked before torch loads.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from flagscale.errors import ConfigError
from flagscale.settings import at_least, convert, nearest, plain, setting


def _names(value: Any) -> tuple[str, ...]:
    """`type:` is one class name or a list of them."""
    if isinstance(value, str) and value.strip():
        return (value,)
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, str) and v.strip() for v in value):
        return tuple(value)
    raise ValueError("expected a class name or a list of class names")


@dataclass(frozen=True)
class Select:
    """Which modules: every key given must hold (and); `any`/`all`/`not` combine nested selectors.

    type: class name(s) (`Linear`, or qualified `torch.nn.Linear`), matched against the module's class and
    its bases; name: a glob on the module's qualified name (`transformer_blocks.*`, `*.attn`); regex: the
    same as a full-match regular expression; root: the denoiser itself.
    """

    type: Any = setting(None, check=_names)
    name: str | None = None
    regex: str | None = None
    root: bool = False
    all: tuple[Select, ...] = ()
    any: tuple[Select, ...] = ()
    not_: Select | None = setting(None, key="not")

    def describe(self) -> str:
        """Short and readable, for errors: `type=FluxTransformerBlock name=blocks.*`."""
        parts = []
        if self.type:
            parts.append("type=" + "|".join(self.type))
        parts += [f"{key}={value}" for key, value in (("name", self.name), ("regex", self.regex)) if value]
        if self.root:
            parts.append("root")
        for op, subs in (("all", self.all), ("any", self.any)):
            if subs:
                parts.append(f"{op}({', '.join(s.describe() for s in subs)})")
        if self.not_ is not None:
            parts.append(f"not({self.not_.describe()})")
        return " ".join(parts) if parts else "{}"

    def empty(self) -> bool:
        return not (self.type or self.name or self.regex or self.root or self.all or self.any or self.not_)


ROOT = Select(root=True)


@dataclass(frozen=True)
class Spec:
    """What every transformation takes; `kind` is its `name:` in the YAML."""

    kind: ClassVar[str] = ""
    needs_steps: ClassVar[bool] = False  # reads the denoising step: a `timestep` tracker is added before it
    select: Select = ROOT


@dataclass(frozen=True)
class TimestepSpec(Spec):
    """Track the denoising step from the denoiser's `timestep` argument (a new step when it changes, a new
    generation when it rises); calls with the same timestep count as the step's calls 0, 1, ... (CFG passes)."""

    kind: ClassVar[str] = "timestep"


@dataclass(frozen=True)
class ScopesSpec(Spec):
    """Which state scope inner transformations see: `call` (the call within the step: the conditional and
    unconditional passes of CFG run as separate calls), `batch` (split the batch into halves and run each as
    its own scope: CFG batched as [uncond, cond]), `none` (one scope)."""

    kind: ClassVar[str] = "scopes"
    needs_steps: ClassVar[bool] = True
    by: Literal["call", "batch", "none"] = "call"


@dataclass(frozen=True)
class LogIOSpec(Spec):
    """Log the shapes, dtypes and wall time of each selected module's calls, with the step and scope."""

    kind: ClassVar[str] = "log_io"
    needs_steps: ClassVar[bool] = True
    path: str | None = None  # JSONL, appended; None: the `flagscale.transforms` logger at INFO


@dataclass(frozen=True)
class TaylorSeerSpec(Spec):
    """TaylorSeer feature caching: compute the selected modules fully during `warmup` steps and every
    `interval`-th step after, and predict their outputs in between by a Taylor expansion of `order` from the
    divided differences of the full computations (x = the step index, or the timestep value)."""

    kind: ClassVar[str] = "taylorseer"
    needs_steps: ClassVar[bool] = True
    warmup: int = setting(3, check=at_least(1, "an integer"))
    interval: int = setting(3, check=at_least(1, "an integer"))
    order: int = setting(2, check=at_least(0, "an integer"))
    x: Literal["step", "timestep"] = "step"


@dataclass(frozen=True)
class CompileSpec(Spec):
    """`torch.compile` the selected modules' forward (put it last: what comes after it in the list is inside the
    compiled region)."""

    kind: ClassVar[str] = "compile"
    backend: str = "inductor"
    mode: str | None = None
    fullgraph: bool = False
    dynamic: bool | None = None


SPECS: dict[str, type[Spec]] = {
    cls.kind: cls for cls in (TimestepSpec, ScopesSpec, LogIOSpec, TaylorSeerSpec, CompileSpec)
}


def parse_one(raw: Any, where: str) -> Spec:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping with a `name:` (one of {', '.join(SPECS)}), got {raw!r}")
    data = dict(raw)
    name = data.pop("name", None)
    if name is None:
        raise ConfigError(f"{where}: missing `name:` (one of {', '.join(SPECS)})")
    if name not in SPECS:
        hint = nearest(name, SPECS)
        raise ConfigError(f"{where}.name={name}: unknown transformation{hint}; use one of {', '.join(SPECS)}")
    spec = convert(SPECS[name], data, f"{where}({name})", from_yaml=True)
    _check_select(spec.select, f"{where}({name}).select")
    return spec


def _check_select(select: Select, where: str) -> None:
    """An empty `select: {}` would silently mean nothing; a bad regex fails here, not at apply time."""
    import re

    if select.empty():
        raise ConfigError(f"{where}: empty; give type, name, regex, root, all, any or not (omit it: the denoiser)")
    if select.regex is not None:
        try:
            re.compile(select.regex)
        except re.error as exc:
            raise ConfigError(f"{where}.regex={select.regex!r}: not a regular expression ({exc})") from None
    for i, sub in enumerate((*select.all, *select.any)):
        _check_select(sub, f"{where}[{i}]")
    if select.not_ is not None:
        _check_select(select.not_, f"{where}.not")


def parse(raw: Any, where: str = "transformations") -> tuple[Spec, ...]:
    """The YAML list (plain data or OmegaConf) as specs, checked once; None or [] is no transformation."""
    raw = plain(raw)
    if raw is None:
        return ()
    if isinstance(raw, tuple) and all(isinstance(s, Spec) for s in raw):
        return raw
    if not isinstance(raw, (list, tuple)):
        raise ConfigError(f"{where}: expected a list of transformations, got {type(raw).__name__}")
    return tuple(s if isinstance(s, Spec) else parse_one(s, f"{where}[{i}]") for i, s in enumerate(raw))


def _data(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.metadata.get("key", f.name): _data(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, tuple):
        return [_data(v) for v in value]
    return value


def to_data(spec: Spec) -> dict[str, Any]:
    """The spec back as YAML data (e.g. to record in a run's resolved settings): `parse([to_data(s)])[0] == s`."""
    return {"name": spec.kind, **_data(spec)}
