"""The shipped transformations: timestep tracking, state scopes, I/O logging, TaylorSeer caching, torch.compile."""

from __future__ import annotations

import inspect
import json
import logging
import math
import time
from typing import Any

from flagscale.transforms.core import Forward, Transformation
from flagscale.transforms.specs import CompileSpec, LogIOSpec, ScopesSpec, TaylorSeerSpec

log = logging.getLogger("flagscale.transforms")


def _timestep_index(module: Any) -> int | None:
    """Where `timestep` sits among the positional arguments of the module's forward (SD pipelines pass it
    positionally to the UNet, FLUX by keyword)."""
    try:
        params = list(inspect.signature(type(module).forward).parameters)
    except (TypeError, ValueError):
        return None
    return params.index("timestep") - 1 if "timestep" in params else None


def _scalar(value: Any) -> float | None:
    """The timestep of a call as one number (pipelines pass a tensor expanded to the batch, or a number)."""
    import torch

    if isinstance(value, torch.Tensor):
        return float(value.reshape(-1)[0]) if value.numel() else None
    if isinstance(value, (int, float)):
        return float(value)
    return None


class TimestepTracker(Transformation):
    """Feeds the context from the denoiser's `timestep` argument: a new value is a new step, a rising one a new
    generation (the state is dropped), the same one another call of the step (the CFG passes). A module
    without a timestep counts each call as a step."""

    kind = "timestep"

    def wrap(self, module: Any, name: str, inner: Forward) -> Forward:
        index = _timestep_index(module)
        context = self.context

        def forward(*args: Any, **kwargs: Any) -> Any:
            raw = kwargs.get("timestep")
            if raw is None and index is not None and index < len(args):
                raw = args[index]
            t = _scalar(raw)
            if t is None or context.timestep is None or t != context.timestep:
                if t is not None and context.timestep is not None and t > context.timestep:
                    context.reset()
                context.new_step(t)
            else:
                context.call += 1
            return inner(*args, **kwargs)

        return forward


class Scopes(Transformation):
    """Sets the state scope of what runs inside: the call within the step, each half of the batch, or one."""

    kind = "scopes"

    def wrap(self, module: Any, name: str, inner: Forward) -> Forward:
        assert isinstance(self.spec, ScopesSpec)
        by, context = self.spec.by, self.context

        def forward(*args: Any, **kwargs: Any) -> Any:
            if by == "batch":
                return _by_halves(inner, context, args, kwargs)
            with context.scoped(context.call if by == "call" else 0):
                return inner(*args, **kwargs)

        return forward


def _by_halves(inner: Forward, context: Any, args: tuple, kwargs: dict) -> Any:
    """Run each half of the batch (CFG's [uncond, cond]) as its own scope; tensors whose first dimension is the
    batch size of the first tensor argument are split, the outputs' tensors concatenated back."""
    import torch
    from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

    leaves, _ = tree_flatten((args, kwargs))
    batch = next((x.shape[0] for x in leaves if isinstance(x, torch.Tensor) and x.dim()), None)
    if batch is None or batch % 2:
        return inner(*args, **kwargs)

    def half(i: int) -> Any:
        return tree_map(
            lambda x: x.chunk(2)[i] if isinstance(x, torch.Tensor) and x.dim() and x.shape[0] == batch else x,
            (args, kwargs),
        )

    outs = []
    for i in range(2):
        a, k = half(i)
        with context.scoped(("batch", i)):
            outs.append(inner(*a, **k))
    first, spec = tree_flatten(outs[0])
    second, _ = tree_flatten(outs[1])
    pairs = zip(first, second, strict=True)
    joined = [torch.cat((x, y)) if isinstance(x, torch.Tensor) and x.dim() else x for x, y in pairs]
    return tree_unflatten(joined, spec)


def _describe(value: Any) -> Any:
    import torch

    if isinstance(value, torch.Tensor):
        return {"shape": list(value.shape), "dtype": str(value.dtype).removeprefix("torch.")}
    if isinstance(value, (list, tuple)):
        return [_describe(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _describe(v) for k, v in value.items()}
    return value if isinstance(value, (int, float, bool, str)) or value is None else type(value).__name__


class LogIO(Transformation):
    """One record per call of each selected module: name, class, step, timestep, scope, the shapes and dtypes
    of its inputs and outputs, and its wall time (ms), to a JSONL file or the `flagscale.transforms` logger."""

    kind = "log_io"

    def wrap(self, module: Any, name: str, inner: Forward) -> Forward:
        assert isinstance(self.spec, LogIOSpec)
        path, context, cls = self.spec.path, self.context, type(module).__name__

        def forward(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            out = inner(*args, **kwargs)
            record = {
                "module": name,
                "type": cls,
                "step": context.step,
                "timestep": context.timestep,
                "scope": str(context.scope),
                "inputs": _describe(list(args)),
                "kwargs": _describe(kwargs),
                "outputs": _describe(out),
                "ms": round((time.perf_counter() - start) * 1e3, 3),
            }
            if path is None:
                log.info("%s", json.dumps(record))
            else:
                with open(path, "a", encoding="utf-8") as f:
                    f.write(json.dumps(record) + "\n")
            return out

        return forward


class TaylorSeer(Transformation):
    """TaylorSeer feature caching (Liu et al., 2025, "From Reusing to Forecasting"): the selected modules run in
    full during the warm-up steps and every `interval`-th step after, and between those their outputs are
    predicted as F(x) = sum_i F_i (x - x0)^i / i! with F_i the i-th divided differences of the last full
    computations. Select whole transformer blocks or the denoiser itself: a skipped call skips all inside it.
    State is kept per scope, so the CFG passes each extrapolate their own features."""

    kind = "taylorseer"

    def full(self, step: int) -> bool:
        """Whether `step` computes: the warm-up, then one step in every `interval` (the others predicted)."""
        assert isinstance(self.spec, TaylorSeerSpec)
        warmup, interval = self.spec.warmup, self.spec.interval
        return step < warmup or (step - warmup + 1) % interval == 0

    def _x(self) -> float:
        assert isinstance(self.spec, TaylorSeerSpec)
        context = self.context
        if self.spec.x == "timestep" and context.timestep is not None:
            return context.timestep
        return float(context.step)

    def wrap(self, module: Any, name: str, inner: Forward) -> Forward:
        def forward(*args: Any, **kwargs: Any) -> Any:
            state = self.state(name)
            step = self.context.step
            if step < 0 or "factors" not in state or self.full(step):
                out = inner(*args, **kwargs)
                self._update(state, out)
                return out
            return self._predict(state)

        return forward

    def _update(self, state: dict[str, Any], out: Any) -> None:
        import torch
        from torch.utils._pytree import tree_flatten

        assert isinstance(self.spec, TaylorSeerSpec)
        x = self._x()
        leaves, treespec = tree_flatten(out)
        old, old_x = state.get("factors"), state.get("x")
        factors: list[list[Any] | None] = []
        for j, leaf in enumerate(leaves):
            if not (isinstance(leaf, torch.Tensor) and leaf.is_floating_point()):
                factors.append(None)
                continue
            new = [leaf.detach().clone()]  # the caller may change its output in place
            prev = old[j] if old is not None and j < len(old) else None
            if prev is not None and old_x is not None and x != old_x and prev[0].shape == leaf.shape:
                dx = x - old_x
                for i in range(min(self.spec.order, len(prev))):
                    new.append((new[i] - prev[i]) / dx)
            factors.append(new)
        kept = [leaf if f is None else None for leaf, f in zip(leaves, factors, strict=True)]  # not the tensors twice
        state.update(factors=factors, x=x, leaves=kept, treespec=treespec)

    def _predict(self, state: dict[str, Any]) -> Any:
        from torch.utils._pytree import tree_unflatten

        dx = self._x() - state["x"]
        leaves = []
        for leaf, factors in zip(state["leaves"], state["factors"], strict=True):
            if factors is None:
                leaves.append(leaf)
                continue
            value = factors[0].clone()
            for i, factor in enumerate(factors[1:], start=1):
                value.add_(factor, alpha=dx**i / math.factorial(i))
            leaves.append(value)
        return tree_unflatten(leaves, state["treespec"])


class Compile(Transformation):
    """`torch.compile` of the selected modules' forward (and of the transformations applied after it)."""

    kind = "compile"

    def wrap(self, module: Any, name: str, inner: Forward) -> Forward:
        import torch

        assert isinstance(self.spec, CompileSpec)
        spec = self.spec
        compiled: Forward = torch.compile(
            inner, backend=spec.backend, mode=spec.mode, fullgraph=spec.fullgraph, dynamic=spec.dynamic
        )
        return compiled


TRANSFORMATIONS: dict[str, type[Transformation]] = {
    cls.kind: cls for cls in (TimestepTracker, Scopes, LogIO, TaylorSeer, Compile)
}
