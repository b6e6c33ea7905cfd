"""The FlagScale wheel for a (device, backends) selection: `X+<device>`, pinned to the patched backend
wheels, carrying the device's runtime requirements, its provenance and the project data (pins,
patch series, device manifests) that `flagscale install` and `flagscale doctor` need once installed."""

from __future__ import annotations

import json
import sys
import tempfile
from dataclasses import dataclass
from collections.abc import Callable
from pathlib import Path

from flagscale import __version__
from flagscale.wheels.backend_wheel import (PROVENANCE_FILE, BackendWheel, build_backend_wheel, build_requires, device_settings,
                             local_segment)
from flagscale.upstream.index import sha256_file
from flagscale.upstream.project import PINS_FILE, Project
from flagscale.patches.tree import patched_tree
from flagscale.wheels.wheelfile import WheelEdit, rewrite_wheel

PROJECT_DATA = "flagscale/_project"


@dataclass(frozen=True)
class BuildSettings:
    """What to build: parsed once from -C settings / environment (build_backend.settings) or the CLI."""

    device: str | None  # None: the plain toolchain wheel
    backends: tuple[str, ...]
    upstream_source: str = "auto"  # auto | submodule | sdist | a path


def backend_build_requires(settings: BuildSettings) -> list[str]:
    """What pip must install into the build environment for the selected backends."""
    project = Project.find()
    requires: list[str] = []
    for backend in settings.backends:
        try:  # a cached backend wheel needs no build environment: the warm rebuild stays cheap
            build_backend_wheel(project, backend, settings.device, settings.upstream_source, only_cached=True)
            continue
        except LookupError:
            pass
        _, build = device_settings(project, settings.device, backend)
        tree = patched_tree(project, backend, settings.device, settings.upstream_source)
        requires += [r for r in build_requires(tree, build) if r not in requires]
    return requires


def provenance(settings: BuildSettings, wheels: list[BackendWheel], requires: list[str]) -> dict:
    return {
        "toolchain": {"name": "flagscale", "version": __version__},
        "device": settings.device,
        "settings": {"device": settings.device, "backend": list(settings.backends),
                     "upstream-source": settings.upstream_source},
        "runtime_requires": requires,
        "backends": [{**w.provenance, "distribution": w.distribution, "version": w.version,
                      "wheel": w.path.name, "wheel_sha256": sha256_file(w.path)} for w in wheels],
    }


def project_data(project: Project) -> dict[str, bytes]:
    """Pins, series and device manifests, shipped inside the wheel (small text files)."""
    files = {f"{PROJECT_DATA}/{PINS_FILE.as_posix()}": (project.root / PINS_FILE).read_bytes()}
    for top in ("patches", "hardware"):
        for path in sorted((project.root / top).rglob("*")):
            if path.is_file():
                files[f"{PROJECT_DATA}/{path.relative_to(project.root).as_posix()}"] = path.read_bytes()
    return files


def _to_stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)  # a frontend shows the backend's stderr (pip with -v)


def build_distribution(settings: BuildSettings, wheel_directory: str, flit_build: Callable[[str], str], *, editable: bool = False,
                       requirement: Callable[[BackendWheel], str] | None = None) -> str:
    """Build the backend wheels, then the FlagScale wheel pinned to them; returns its file name.

    `requirement` says how to pin a backend wheel: a file:// direct reference by default (works with
    pip for local installs), `name==version` for a wheelhouse served as an index.
    """
    project = Project.find()
    wheels = [build_backend_wheel(project, b, settings.device, settings.upstream_source, progress=_to_stderr)
              for b in settings.backends]
    pin = requirement or (lambda w: f"{w.distribution} @ {w.path.as_uri()}")
    runtime: list[str] = []
    if settings.device:
        from flagscale.hardware.registry import resolve_device

        dev = resolve_device(project, settings.device)
        runtime = list(dict.fromkeys(r for w in wheels for r in dev.runtime_requires_for(w.backend)))
    with tempfile.TemporaryDirectory(prefix="flagscale-wheel-") as tmp:
        name = flit_build(tmp)
        edit = WheelEdit(
            version=f"{__version__}+{local_segment(settings.device)}" if settings.device else None,
            add_requires=tuple(pin(w) for w in wheels) + tuple(runtime),
            dist_info_files={PROVENANCE_FILE: (json.dumps(provenance(settings, wheels, runtime), indent=2,
                                                          sort_keys=True) + "\n").encode()},
            files={} if editable else project_data(project))
        return rewrite_wheel(Path(tmp) / name, Path(wheel_directory), edit).name
