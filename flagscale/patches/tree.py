"""Patched trees: pinned source + common series + device series, cached by a key over all inputs."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from flagscale.patches.patchfile import Patch
from flagscale.patches.series import series_for
from flagscale.upstream.project import Project
from flagscale.upstream.sources import Source, materialize, submodule_state
from flagscale.upstream.target import Target

if TYPE_CHECKING:
    from flagscale.patches.apply import Plan

log = logging.getLogger(__name__)

# Bump when the engine's output for the same inputs could change: it is part of every cache key.
ENGINE_VERSION = "1"


@dataclass(frozen=True)
class AppliedPatch:
    series: str  # common | device:<name>
    name: str
    sha256: str


@dataclass(frozen=True)
class PatchedTree:
    backend: str
    device: str | None
    source: Source
    path: Path
    key: str
    patches: tuple[AppliedPatch, ...]
    cache_hit: bool

    def manifest(self) -> dict:
        pin = self.source.pin
        return {
            "backend": self.backend,
            "device": self.device,
            "source": {
                "kind": self.source.kind,
                "key": self.source.key,
                "layout": self.source.layout,
                "origin": self.source.origin,
            },
            "pin": {
                "git": pin.git,
                "tag": pin.tag,
                "commit": pin.commit,
                "sdist": pin.sdist.name,
                "version": pin.sdist.version,
                "sha256": pin.sdist.sha256,
            },
            "patches": [vars(p) for p in self.patches],
            "key": self.key,
            "engine": ENGINE_VERSION,
        }


def load_series_patches(project: Project, backend: str, device: str | None) -> list[tuple[str, Patch]]:
    return [(series.label, patch) for series in series_for(project, backend, device) for patch in series.load()]


def hint_for(backend: str, device: str | None) -> str:
    dev = f" --device {device}" if device else ""
    return (
        f"; refresh the patch with `tools/patch.py checkout {backend}{dev} DIR` (edit, then `export`), "
        f"or after a pin change run `tools/patch.py rebase {backend} --to VERSION`"
    )


def plan_series(source: Source, labelled: list[tuple[str, Patch]], backend: str, device: str | None) -> Plan:
    from flagscale.patches.apply import plan_patches  # lazy: a cache hit never plans (see flagscale.fastpath)

    return plan_patches(
        source.tree,
        [p for _, p in labelled],
        to_tree=source.to_tree_path,
        pin_label=source.pin.label,
        hint=hint_for(backend, device),
    )


def tree_key(source: Source, device: str | None, applied: list[AppliedPatch]) -> str:
    blob = json.dumps(
        {
            "engine": ENGINE_VERSION,
            "source": source.key,
            "layout": source.layout,
            "device": device,
            "patches": [vars(p) for p in applied],
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()


def patched_tree(target: Target, progress=None) -> PatchedTree:
    """The target's pin with its common and device series applied, from the cache when possible."""
    pin, device = target.pin, target.device
    src = materialize(target, progress)
    labelled = load_series_patches(target.project, pin.backend, device)
    applied = [AppliedPatch(label, p.name, p.sha256) for label, p in labelled]
    key = tree_key(src, device, applied)

    def build(tmp: Path) -> None:
        plan = plan_series(src, labelled, pin.backend, device)
        log.info("applying %d patches to %s", len(labelled), pin.label)
        from flagscale.patches.apply import apply_to_new_tree

        apply_to_new_tree(plan, src.tree, tmp / "tree", link=True)
        result = PatchedTree(pin.backend, device, src, tmp / "tree", key, tuple(applied), False)
        manifest = result.manifest()
        manifest["offsets"] = [f"{o.patch}: {o.path} hunk {o.hunk} {o.offset:+d}" for o in plan.offsets()]
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")

    entry, hit = target.cache.get_or_create("trees", key, build)
    return PatchedTree(pin.backend, device, src, entry / "tree", key, tuple(applied), hit)


def cached_patched_tree(target: Target) -> PatchedTree | None:
    """The patched tree of the pin's sdist if it is cached already, else None; never downloads or builds.

    Submodule and local-path sources are not looked up here (their keys need the tree itself).
    """
    project, pin, device, cache = target.project, target.pin, target.device, target.cache
    sdist = target.source == "sdist" or (target.source == "auto" and submodule_state(project, pin)[0] is None)
    if not sdist or not cache.path("sources", f"sdist-{pin.sdist.sha256}").exists():
        return None  # only the sdist source is known from the pin alone; the full path handles the rest
    src = materialize(replace(target, source="sdist"))  # a cache hit
    applied = [AppliedPatch(label, p.name, p.sha256) for label, p in load_series_patches(project, pin.backend, device)]
    key = tree_key(src, device, applied)
    entry = cache.path("trees", key)
    if not entry.exists():
        return None
    return PatchedTree(pin.backend, device, src, entry / "tree", key, tuple(applied), True)
