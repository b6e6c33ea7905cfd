"""The framework: forward wrappers that chain and detach, a runtime context, a per-scope state store.

A transformation wraps the `forward` of each module its selector picks: `wrap(inner)` returns the new forward,
which may call `inner` (wrap) or not (replace). Several on one module chain in the order applied: the first
applied sees the call first, and each wraps the ones applied after it (so `compile`, put last, compiles only
the module's own forward). The chain lives in the module's `forward` instance attribute and is rebuilt from
the class's forward whenever a link is removed, so a removed transformation leaves nothing behind: with all
removed, the module computes exactly what it did before (bit-identical outputs).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from flagscale.errors import ConfigError
from flagscale.settings import closest
from flagscale.transforms.select import Selector, from_spec
from flagscale.transforms.specs import Spec

_CHAIN = "_flagscale_transforms"  # the module attribute holding its chain of links


# ------------------------------------------------------------------------------------------ context
@dataclass
class Context:
    """The runtime state shared by the transformations of one `apply`: the denoising step (0, 1, ...; -1 before
    the first), its timestep, the call within the step (the CFG passes when run as separate calls), and the
    state store, split by scope (the call within the step unless a `scopes` transformation says otherwise)."""

    step: int = -1
    timestep: float | None = None
    call: int = 0
    _scopes: list[Hashable] = field(default_factory=list)
    _store: dict[tuple[Hashable, Hashable], dict[str, Any]] = field(default_factory=dict)

    @property
    def scope(self) -> Hashable:
        return self._scopes[-1] if self._scopes else self.call

    @contextmanager
    def scoped(self, key: Hashable) -> Iterator[None]:
        """Run what is inside as scope `key` (each scope has its own state)."""
        self._scopes.append(key)
        try:
            yield
        finally:
            self._scopes.pop()

    def state(self, owner: Hashable) -> dict[str, Any]:
        """The mutable state of `owner` (a transformation and module) in the current scope."""
        return self._store.setdefault((owner, self.scope), {})

    def new_step(self, timestep: float | None) -> None:
        self.step += 1
        self.timestep = timestep
        self.call = 0

    def reset(self) -> None:
        """A new generation: step -1 and every state dropped."""
        self.step, self.timestep, self.call = -1, None, 0
        self._store.clear()


# -------------------------------------------------------------------------------------------- links
Forward = Callable[..., Any]


@dataclass(eq=False)
class Link:
    """One transformation on one module: `wrap(inner)` builds its forward around the rest of the chain."""

    transformation: Transformation
    module: Any
    name: str

    def wrap(self, inner: Forward) -> Forward:
        return self.transformation.wrap(self.module, self.name, inner)


@dataclass(eq=False)
class _Chain:
    """A module's links, outermost first, and the `forward` instance attribute it had before (usually none)."""

    module: Any
    had_forward: bool
    saved_forward: Any
    links: list[Link] = field(default_factory=list)

    def rebuild(self) -> None:
        base = self.saved_forward if self.had_forward else type(self.module).forward.__get__(self.module)
        forward = base
        for link in reversed(self.links):
            forward = link.wrap(forward)
        self.module.__dict__["forward"] = forward

    def restore(self) -> None:
        if self.had_forward:
            self.module.__dict__["forward"] = self.saved_forward
        else:
            self.module.__dict__.pop("forward", None)
        self.module.__dict__.pop(_CHAIN, None)


def _chain(module: Any) -> _Chain:
    chain = module.__dict__.get(_CHAIN)
    if chain is None:
        had = "forward" in module.__dict__
        chain = _Chain(module, had, module.__dict__.get("forward"))
        module.__dict__[_CHAIN] = chain
    return chain


def attach(link: Link) -> None:
    chain = _chain(link.module)
    chain.links.append(link)
    chain.rebuild()


def detach(link: Link) -> None:
    chain = link.module.__dict__.get(_CHAIN)
    if chain is None or link not in chain.links:
        return
    chain.links.remove(link)
    if chain.links:
        chain.rebuild()
    else:
        chain.restore()


def links_of(module: Any) -> list[Link]:
    """The transformations on `module`, outermost first."""
    chain = module.__dict__.get(_CHAIN)
    return list(chain.links) if chain else []


# ----------------------------------------------------------------------------------- transformation
class Transformation:
    """Base class: pick modules with `selector`, change their forward in `wrap`.

    Subclasses built from a YAML spec take it as `spec` (its `select:` becomes the selector); the Python API
    may pass a `Selector` instead. `self.context` is the runtime context of the `apply` that attached it.
    """

    kind = "transformation"

    def __init__(self, spec: Spec | None = None, *, select: Selector | None = None, label: str | None = None):
        self.spec = spec
        if select is None:
            select = from_spec(spec.select) if spec is not None else from_spec(Spec().select)
        self.selector = select
        self.label = label or self.kind
        self.context = Context()

    def wrap(self, module: Any, name: str, inner: Forward) -> Forward:
        """The new forward of `module` (qualified name `name`) around `inner`; by default `inner` itself."""
        return inner

    def state(self, name: str) -> dict[str, Any]:
        """This transformation's state for module `name` in the current scope."""
        return self.context.state((id(self), name))

    def __repr__(self) -> str:
        return f"<{self.label} select {self.selector.describe()}>"


# ------------------------------------------------------------------------------------------- handle
class Handle:
    """What `apply` attached: `remove()` detaches all of it (idempotent); also a context manager."""

    def __init__(self, root: Any, context: Context, links: list[Link]):
        self.root = root
        self.context = context
        self.links = links

    @property
    def transformations(self) -> list[Transformation]:
        seen: dict[int, Transformation] = {}
        for link in self.links:
            seen.setdefault(id(link.transformation), link.transformation)
        return list(seen.values())

    def modules(self, transformation: Transformation) -> list[str]:
        """The qualified names of the modules `transformation` is attached to."""
        return [link.name for link in self.links if link.transformation is transformation]

    def reset(self) -> None:
        """Forget the step and every cached state (the next call starts a new generation)."""
        self.context.reset()

    def remove(self) -> None:
        for link in reversed(self.links):
            detach(link)
        self.links = []

    def __enter__(self) -> Handle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def denoiser(target: Any) -> Any:
    """The module to transform: a diffusers pipeline's `transformer` (DiT) or `unet`, or the module given."""
    import torch

    if isinstance(target, torch.nn.Module):
        return target
    for attr in ("transformer", "unet"):
        module = getattr(target, attr, None)
        if isinstance(module, torch.nn.Module):
            return module
    raise ConfigError(
        f"transformations: cannot apply to a {type(target).__name__}: give a torch module or a diffusers pipeline "
        "with a `transformer` or `unet`"
    )


def _nothing_matched(transformation: Transformation, root: Any, where: str) -> ConfigError:
    types = sorted({type(m).__name__ for m in root.modules()})
    hint = ""
    for want in getattr(transformation.selector, "types", ()):
        if isinstance(want, str) and (near := closest(want.rsplit(".", 1)[-1], types)):
            hint = f" (did you mean type {near!r}?)"
            break
    shown = ", ".join(types[:12]) + (", ..." if len(types) > 12 else "")
    return ConfigError(
        f"{where}: transformation {transformation.label!r} selects {transformation.selector.describe()}, which "
        f"matches no module of the {type(root).__name__}{hint}; its module types: {shown}"
    )


def apply_transformations(target: Any, transformations: list[Transformation], labels: list[str]) -> Handle:
    """Attach each transformation to the modules it selects, in order, sharing one context. All selectors are
    resolved first: one that matches nothing is an error naming it, and nothing is attached."""
    root = denoiser(target)
    context = Context()
    plan: list[Link] = []
    for transformation, where in zip(transformations, labels, strict=True):
        matched = transformation.selector.matches(root)
        if not matched:
            raise _nothing_matched(transformation, root, where)
        transformation.context = context
        plan.extend(Link(transformation, module, name) for name, module in matched)
    attached: list[Link] = []
    try:
        for link in plan:
            attach(link)
            attached.append(link)
    except BaseException:
        for link in reversed(attached):
            detach(link)
        raise
    return Handle(root, context, attached)
