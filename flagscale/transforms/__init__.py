"""Transformations: change a loaded model's behaviour without editing it (issue 14, docs/transforms.md).

    specs = parse(cfg.transformations)     # once, when the config is read: ConfigError on a bad item
    handle = apply(pipeline, specs)        # a diffusers pipeline (its transformer/unet) or a torch module
    ...                                    # generate
    handle.remove()                        # the model is exactly as before

Torch is imported only when something is applied; diffusers never (the hooks see plain modules).
"""

from __future__ import annotations

from typing import Any

from flagscale.transforms.core import Context, Handle, Transformation, apply_transformations, denoiser, links_of
from flagscale.transforms.select import All, AnyOf, ByName, ByRegex, ByType, Not, Root, Selector, Where
from flagscale.transforms.specs import SPECS, Select, Spec, TimestepSpec, parse, to_data

__all__ = [
    "All",
    "AnyOf",
    "ByName",
    "ByRegex",
    "ByType",
    "Context",
    "Handle",
    "Not",
    "Root",
    "SPECS",
    "Select",
    "Selector",
    "Spec",
    "Transformation",
    "Where",
    "apply",
    "build",
    "denoiser",
    "links_of",
    "parse",
    "to_data",
]


def build(spec: Spec) -> Transformation:
    """The transformation a spec describes."""
    from flagscale.transforms.builtin import TRANSFORMATIONS

    return TRANSFORMATIONS[spec.kind](spec)


def _with_tracker(specs: tuple[Spec, ...]) -> tuple[Spec, ...]:
    """A step-reading transformation needs the step: track it on the denoiser first unless the list does."""
    if any(s.needs_steps for s in specs) and not any(isinstance(s, TimestepSpec) for s in specs):
        return (TimestepSpec(), *specs)
    return specs


def apply(target: Any, specs: Any, where: str = "transformations") -> Handle:
    """Attach the transformations `specs` (from `parse`, or the raw YAML list, or `Transformation` objects) to
    `target` in order; `handle.remove()` detaches them all. A transformation whose selector matches no module
    is a ConfigError naming it, and then nothing is attached."""
    if isinstance(specs, Transformation):
        specs = [specs]
    items = (
        list(specs)
        if isinstance(specs, (list, tuple)) and all(isinstance(s, (Spec, Transformation)) for s in specs)
        else list(parse(specs, where))
    )
    labels = [f"{where}[{i}]" for i in range(len(items))]
    plain_specs = tuple(s for s in items if isinstance(s, Spec))
    if len(_with_tracker(plain_specs)) > len(plain_specs):
        items, labels = [TimestepSpec(), *items], [f"{where}(timestep, added)", *labels]
    transformations = [s if isinstance(s, Transformation) else build(s) for s in items]
    return apply_transformations(target, transformations, labels)
