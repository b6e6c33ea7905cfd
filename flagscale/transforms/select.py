"""Module selectors: by type (class name or class), by qualified-name glob or regex, and `&`, `|`, `~` of them.

A selector is a predicate over `(qualified name, module)` pairs of `root.named_modules()` (the root's name is
""); `matches(root)` lists what it picks, in module order.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Iterable
from typing import Any

from flagscale.transforms.specs import Select


class Selector:
    """A predicate over (qualified name, module); combine with `&`, `|` and `~`."""

    def test(self, name: str, module: Any) -> bool:
        raise NotImplementedError

    def describe(self) -> str:
        raise NotImplementedError

    def matches(self, root: Any) -> list[tuple[str, Any]]:
        return [(name, module) for name, module in root.named_modules() if self.test(name, module)]

    def __and__(self, other: Selector) -> Selector:
        return All((self, other))

    def __or__(self, other: Selector) -> Selector:
        return AnyOf((self, other))

    def __invert__(self) -> Selector:
        return Not(self)

    def __repr__(self) -> str:
        return f"<select {self.describe()}>"


class ByType(Selector):
    """Instances of the classes named: a class, its `__name__` or its `module.qualname`, matched on the MRO (so
    `Linear` also picks subclasses of Linear)."""

    def __init__(self, *types: str | type):
        self.types = types

    def _hit(self, cls: type) -> bool:
        for want in self.types:
            if isinstance(want, type):
                if cls is want:
                    return True
            elif want in (cls.__name__, f"{cls.__module__}.{cls.__qualname__}"):
                return True
        return False

    def test(self, name: str, module: Any) -> bool:
        return any(self._hit(cls) for cls in type(module).__mro__)

    def describe(self) -> str:
        return "type=" + "|".join(t if isinstance(t, str) else t.__name__ for t in self.types)


class ByName(Selector):
    """Qualified names matching a glob (`*` also spans dots: `blocks.*` picks `blocks.0` and `blocks.0.attn`)."""

    def __init__(self, pattern: str):
        self.pattern = pattern

    def test(self, name: str, module: Any) -> bool:
        return fnmatch.fnmatchcase(name, self.pattern)

    def describe(self) -> str:
        return f"name={self.pattern}"


class ByRegex(Selector):
    """Qualified names a regular expression matches in full."""

    def __init__(self, pattern: str):
        self.pattern = re.compile(pattern)

    def test(self, name: str, module: Any) -> bool:
        return self.pattern.fullmatch(name) is not None

    def describe(self) -> str:
        return f"regex={self.pattern.pattern}"


class Root(Selector):
    """The module the transformations are applied to (the denoiser of a pipeline)."""

    def test(self, name: str, module: Any) -> bool:
        return name == ""

    def describe(self) -> str:
        return "root"


class Where(Selector):
    """Any predicate over (name, module), for the Python API."""

    def __init__(self, predicate: Callable[[str, Any], bool], label: str = "where"):
        self.predicate = predicate
        self.label = label

    def test(self, name: str, module: Any) -> bool:
        return bool(self.predicate(name, module))

    def describe(self) -> str:
        return self.label


class All(Selector):
    def __init__(self, parts: Iterable[Selector]):
        self.parts = tuple(parts)

    def test(self, name: str, module: Any) -> bool:
        return all(p.test(name, module) for p in self.parts)

    def describe(self) -> str:
        return "(" + " & ".join(p.describe() for p in self.parts) + ")"


class AnyOf(Selector):
    def __init__(self, parts: Iterable[Selector]):
        self.parts = tuple(parts)

    def test(self, name: str, module: Any) -> bool:
        return any(p.test(name, module) for p in self.parts)

    def describe(self) -> str:
        return "(" + " | ".join(p.describe() for p in self.parts) + ")"


class Not(Selector):
    def __init__(self, part: Selector):
        self.part = part

    def test(self, name: str, module: Any) -> bool:
        return not self.part.test(name, module)

    def describe(self) -> str:
        return f"~{self.part.describe()}"


def from_spec(select: Select) -> Selector:
    """The `select:` mapping of the YAML as a selector: the keys given, and-ed."""
    parts: list[Selector] = []
    if select.type:
        parts.append(ByType(*select.type))
    if select.name is not None:
        parts.append(ByName(select.name))
    if select.regex is not None:
        parts.append(ByRegex(select.regex))
    if select.root:
        parts.append(Root())
    if select.all:
        parts.append(All(from_spec(s) for s in select.all))
    if select.any:
        parts.append(AnyOf(from_spec(s) for s in select.any))
    if select.not_ is not None:
        parts.append(Not(from_spec(select.not_)))
    return parts[0] if len(parts) == 1 else All(parts)
