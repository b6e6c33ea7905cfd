"""Transformations: change a loaded model's behaviour without editing it (issue 14, docs/transforms.md).

    specs = parse(cfg.transformations)     # once, when the config is read: ConfigError on a bad item
    handle = apply(pipeline, specs)        # a diffusers pipeline (its transformer/unet) or a torch module
    ...                                    # generate
    handle.remove()                        # the model is exactly as before

Torch is imported only when something is applied; diffusers never (the hooks see plain modules).
"""

from __future__ import annotations

from typing import Any

from flagscale.errors import ConfigError
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


def _spec_of(item: Spec | Transformation) -> Spec | None:
    return item if isinstance(item, Spec) else item.spec


def _with_tracker(items: list[Any], labels: list[str], where: str) -> tuple[list[Any], list[str]]:
    """A step-reading transformation needs the step: track it on the denoiser first, unless the list does (then
    before anything that reads it: a tracker inside them would tell them the step too late)."""
    specs = [_spec_of(item) for item in items]
    needs = [i for i, spec in enumerate(specs) if spec is not None and spec.needs_steps]
    trackers = [i for i, spec in enumerate(specs) if isinstance(spec, TimestepSpec)]
    if needs and trackers and trackers[0] > needs[0]:
        reader = items[needs[0]]
        kind = reader.kind if isinstance(reader, (Spec, Transformation)) else "?"
        raise ConfigError(
            f"{labels[trackers[0]]}: put `timestep` before {labels[needs[0]]} ({kind}), "
            "which reads the step it tracks (or leave it out: it is added first by itself)"
        )
    if needs and not trackers:
        return [TimestepSpec(), *items], [f"{where}(timestep, added)", *labels]
    return items, labels


def apply(target: Any, specs: Any, where: str = "transformations") -> Handle:
    """Attach the transformations `specs` (from `parse`, or the raw YAML list, or `Transformation` objects) to
    `target` in order; `handle.remove()` detaches them all. A transformation whose selector matches no module
    is a ConfigError naming it, and then nothing is attached."""
    if isinstance(specs, (Spec, Transformation)):
        specs = [specs]
    if isinstance(specs, (list, tuple)) and any(isinstance(s, Transformation) for s in specs):
        items = [
            s if isinstance(s, (Spec, Transformation)) else parse([s], f"{where}[{i}]")[0] for i, s in enumerate(specs)
        ]
    else:
        items = list(parse(specs, where))
    items, labels = _with_tracker(items, [f"{where}[{i}]" for i in range(len(items))], where)
    transformations = [s if isinstance(s, Transformation) else build(s) for s in items]
    return apply_transformations(target, transformations, labels)
