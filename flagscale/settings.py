"""One converter from plain data to typed settings: every configuration FlagScale reads goes through `convert`.

The train/serve/infer configs (YAML through Hydra and OmegaConf), the device manifests (device.toml), the
upstream pins (upstreams.toml) and the PEP 517 settings (`-C key=value`) are declared as frozen dataclasses
and read here, so they all fail alike: one `ConfigError` line naming the dotted key, the value, what is
wrong with it and, for a mistyped name, the nearest valid one.

A field's type says what it takes: a nested dataclass (a mapping), `X | None`, `bool`, `int` (a bool is not
one), `float` (an int too), `str`, `typing.Literal[...]` (a choice), `tuple[X, ...]` (a list),
`tuple[tuple[K, V], ...]` (a mapping kept as hashable, sorted pairs), `dict` or `Any`. Its metadata (see
`setting`) adds a check and another spelling of its key.

Only the standard library is imported at the top: this runs inside pip's isolated build environment and on
the `flagscale --help` start-up path.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from flagscale.errors import ConfigError

T = TypeVar("T")

_SCALARS = {
    bool: ("true or false", "true or false values"),
    int: ("an integer", "integers"),
    float: ("a number", "numbers"),
    str: ("a string", "strings"),
}


# ----------------------------------------------------------------------------------- hints, checks
def closest(word: Any, choices: Iterable[Any], cutoff: float = 0.6) -> str | None:
    """The valid choice nearest to a mistyped `word`, or None when none is close enough."""
    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1, cutoff=cutoff)
    return close[0] if close else None


def nearest(word: Any, choices: Iterable[Any]) -> str:
    """` (did you mean 'x'?)` for the valid choice nearest to `word`, or ''."""
    near = closest(word, choices)
    return f" (did you mean {near!r}?)" if near else ""


def setting(
    default: Any = dataclasses.MISSING, *, check: Callable[[Any], Any] | None = None, key: str | None = None
) -> Any:
    """A dataclass field with a `check` (value -> value; its ValueError becomes a ConfigError naming the key)
    and/or read from a differently spelled `key` (e.g. `upstream-source`)."""
    metadata = {name: value for name, value in (("check", check), ("key", key)) if value is not None}
    return dataclasses.field(default=default, metadata=metadata)


def at_least(low: float, what: str = "a number") -> Callable[[Any], Any]:
    """A check: the value is `low` or more."""

    def check(value):
        if value < low:
            raise ValueError(f"expected {what} >= {low}")
        return value

    return check


def nonempty(value: str) -> str:
    """A check: the string holds more than white space."""
    if not value.strip():
        raise ValueError("must not be empty")
    return value


def data_keys(cls: type) -> tuple[str, ...]:
    """The keys the data of dataclass `cls` may hold, in declaration order."""
    return tuple(_key(f) for f in dataclasses.fields(cls))


def plain(node: Any) -> Any:
    """An OmegaConf config as plain, resolved Python data (interpolations resolved once, here); other data as is."""
    from omegaconf import DictConfig, ListConfig, OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    if not isinstance(node, (DictConfig, ListConfig)):
        return node
    try:
        return OmegaConf.to_container(node, resolve=True)
    except OmegaConfBaseException as exc:
        raise ConfigError(f"config: {str(exc).splitlines()[0]}") from None


# -------------------------------------------------------------------------------------- converting
def convert(
    cls: type[T],
    data: Any,
    where: str,
    *,
    from_yaml: bool = False,
    unknown: str | None = None,
    given: dict[str, Any] | None = None,
) -> T:
    """`data` (plain dicts and lists) as an instance of dataclass `cls`, strictly; errors name `where`.key.

    from_yaml: a `str` field takes any scalar too, since YAML and Hydra overrides type a scalar by its look
    (`visible_devices=3` is a number there); TOML, JSON and `-C` values are taken as typed.
    unknown: the message of an unknown key, a str.format template of where, key, hint (the nearest valid key)
    and valid (all of them), for a file format whose messages predate this module; by default
    `<where>.<key>: unknown key` and the nearest valid key, else the valid keys.
    given: fields the caller fills (a file's path, a table read on its own); the data cannot set them.
    """
    return _Converter(from_yaml, unknown).table(cls, data, where, given or {})


def _key(f: dataclasses.Field) -> str:
    return f.metadata.get("key", f.name)


def _join(where: str, key: Any) -> str:
    return f"{where}.{key}" if where else str(key)


def _scalar(value: Any) -> bool:
    return isinstance(value, (str, int, float))


def _fixed(hint: Any) -> bool:
    """tuple[A, B]: a fixed-length tuple, such as one (key, value) pair."""
    return typing.get_origin(hint) is tuple and typing.get_args(hint)[-1] is not Ellipsis


def _pairs(hint: Any) -> bool:
    """tuple[tuple[K, V], ...]: a mapping kept as hashable (key, value) pairs."""
    return typing.get_origin(hint) is tuple and _fixed(typing.get_args(hint)[0])


def _describe(hint: Any, plural: bool = False) -> str:
    """What a type takes, for `expected ...` messages."""
    if hint in _SCALARS:
        return _SCALARS[hint][plural]
    if typing.get_origin(hint) is not tuple or _pairs(hint):
        return "mappings" if plural else "a mapping"  # a dataclass, a dict, or pairs read from a mapping
    item = typing.get_args(hint)[0]
    if plural or item is Any or _fixed(hint):
        return "lists" if plural else "a list"
    return f"a list of {_describe(item, plural=True)}"


@dataclasses.dataclass(frozen=True)
class _Converter:
    from_yaml: bool
    unknown: str | None

    def table(self, cls: Any, data: Any, where: str, given: dict[str, Any]) -> Any:
        if isinstance(data, cls):  # converted on its own, e.g. to name it in errors its own way
            return data
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__} {data!r}")
        fields = {_key(f): f for f in dataclasses.fields(cls) if f.name not in given}
        for key in data:
            if key not in fields:
                raise ConfigError(self.unknown_key(where, key, list(fields)))
        hints = typing.get_type_hints(cls)
        values = dict(given)
        for key, f in fields.items():
            if key in data:
                values[f.name] = self.field(f, hints[f.name], data[key], _join(where, key))
            elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(f"{where}: missing required field {key!r}")
        return cls(**values)

    def unknown_key(self, where: str, key: Any, valid: list[str]) -> str:
        hint = nearest(key, valid)
        if self.unknown is not None:
            return self.unknown.format(where=where, key=key, hint=hint, valid=", ".join(valid))
        # one line a terminal does not wrap when a name is near: the whole list only when none is
        return f"{_join(where, key)}: unknown key{hint or '; valid keys: ' + ', '.join(valid)}"

    def field(self, f: dataclasses.Field, hint: Any, raw: Any, key: str) -> Any:
        value = self.value(hint, raw, key)
        check = f.metadata.get("check")
        if check is None or value is None:
            return value
        try:
            return check(value)
        except ValueError as exc:  # the check knows what is wrong, the converter knows where
            raise ConfigError(f"{key}={raw!r}: {exc}" if _scalar(raw) else f"{key}: {exc}") from None

    def value(self, hint: Any, value: Any, key: str) -> Any:
        origin = typing.get_origin(hint)
        if origin in (typing.Union, types.UnionType):  # X | None
            if value is None:
                return None
            (inner,) = [arg for arg in typing.get_args(hint) if arg is not type(None)]
            return self.value(inner, value, key)
        if hint is Any:
            return value
        if dataclasses.is_dataclass(hint):
            return self.table(hint, value, key, {})
        if origin is typing.Literal:
            return self.choice(typing.get_args(hint), value, key)
        if origin is tuple:
            return self.sequence(hint, value, key)
        if hint is dict or origin is dict:
            if not isinstance(value, dict):
                raise ConfigError(f"{key}={value!r}: expected a mapping")
            return {str(k): v for k, v in value.items()}
        if hint in _SCALARS:
            return self.scalar(hint, value, key)
        raise TypeError(f"unsupported settings type {hint!r}")  # a bug in a dataclass, not the user's

    def choice(self, choices: tuple, value: Any, key: str) -> Any:
        if value not in choices:
            raise ConfigError(f"{key}={value}: use one of {', '.join(map(str, choices))}{nearest(value, choices)}")
        return value

    def sequence(self, hint: Any, value: Any, key: str) -> tuple:
        items = typing.get_args(hint)
        if _pairs(hint) and isinstance(value, dict):
            key_hint, value_hint = typing.get_args(items[0])
            pairs = [(self.value(key_hint, k, key), self.value(value_hint, v, f"{key}.{k}")) for k, v in value.items()]
            return tuple(sorted(pairs, key=lambda pair: pair[0]))
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}={value!r}: expected {_describe(hint)}")
        if not _fixed(hint):  # tuple[X, ...]
            items = (items[0],) * len(value)
        elif len(value) != len(items):
            raise ConfigError(f"{key}={value!r}: expected {len(items)} items")
        return tuple(
            self.value(item, v, f"{key}[{index}]") for index, (item, v) in enumerate(zip(items, value, strict=True))
        )

    def scalar(self, hint: type, value: Any, key: str) -> Any:
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if hint is bool:
            ok = isinstance(value, bool)
        elif hint is int:
            ok = number and isinstance(value, int)
        elif hint is float:
            ok = number
        else:
            ok = isinstance(value, str) or (self.from_yaml and _scalar(value))
        if not ok:
            raise ConfigError(f"{key}={value!r}: expected {_describe(hint)}")
        return hint(value)
