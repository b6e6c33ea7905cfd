"""The FlagScale wheel for a (device, backends) selection: `X+<device>`, pinned to the patched backend
wheels, carrying the device's runtime requirements, its provenance and the project data (pins,
patch series, device manifests) that `flagscale install` and `flagscale doctor` need once installed."""

from __future__ import annotations

import re
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from flagscale import __version__
from flagscale.hardware.registry import resolve_device
from flagscale.patches.tree import patched_tree
from flagscale.upstream.index import sha256_file
from flagscale.upstream.project import PINS_FILE, Project
from flagscale.upstream.target import Target
from flagscale.wheels.backend_wheel import (
    BackendWheel,
    build_backend_wheel,
    build_requires,
    cached_backend_wheel,
    device_settings,
    local_segment,
)
from flagscale.wheels.flit_build import dist_info_of
from flagscale.wheels.provenance import PROVENANCE_FILE, DeviceProvenance, PinnedBackend, to_bytes
from flagscale.wheels.wheelfile import WheelEdit, rewrite_wheel

PROJECT_DATA = "flagscale/_project"


@dataclass(frozen=True)
class BuildSettings:
    """What to build: parsed once from -C settings / environment (build_backend.settings) or the CLI."""

    device: str | None  # None: the plain toolchain wheel
    backends: tuple[str, ...]
    upstream_source: str = "auto"  # auto | submodule | sdist | a path

    def targets(self, project: Project) -> list[Target]:
        return [Target.of(project, b, self.device, self.upstream_source) for b in self.backends]


def device_version(settings: BuildSettings) -> str | None:
    """The FlagScale wheel's version for a device build (`0.1.0+cpu`); None: the plain wheel's own."""
    return f"{__version__}+{local_segment(settings.device)}" if settings.device else None


def backend_build_requires(settings: BuildSettings) -> list[str]:
    """What pip must install into the build environment for the selected backends."""
    requires: list[str] = []
    for target in settings.targets(Project.find()):
        if cached_backend_wheel(target) is not None:
            continue  # a cached backend wheel needs no build environment: the warm rebuild stays cheap
        _, build = device_settings(target)
        requires += [r for r in build_requires(patched_tree(target), build) if r not in requires]
    return requires


def device_provenance(settings: BuildSettings, wheels: list[BackendWheel], requires: list[str]) -> DeviceProvenance:
    pinned = tuple(
        PinnedBackend(w.provenance, w.distribution, w.version, w.path.name, sha256_file(w.path)) for w in wheels
    )
    return DeviceProvenance(settings.device, pinned, tuple(requires), settings.upstream_source)


# What FlagScale's own commands need beside a backend at run time, on every device: `flagscale train`
# (megatron-core's distributed checkpoint writer imports psutil). The [train] extra adds TensorBoard.
BACKEND_RUNTIME_REQUIRES: dict[str, tuple[str, ...]] = {"megatron": ("psutil>=5.9",)}


def runtime_requires(project: Project, device: str | None, wheels: list[BackendWheel]) -> list[str]:
    """The runtime requirements of the backends built: the device's (torch, a platform plugin, ...) and
    FlagScale's own for each backend."""
    if not device:
        return []
    dev = resolve_device(project, device)
    return list(
        dict.fromkeys(
            r
            for w in wheels
            for r in (*dev.runtime_requires_for(w.backend), *BACKEND_RUNTIME_REQUIRES.get(w.backend, ()))
        )
    )


def project_data(project: Project) -> dict[str, bytes]:
    """Pins, series and device manifests, shipped inside the wheel (small text files)."""
    files = {f"{PROJECT_DATA}/{PINS_FILE.as_posix()}": (project.root / PINS_FILE).read_bytes()}
    for top in ("patches", "hardware"):
        for path in sorted((project.root / top).rglob("*")):
            if path.is_file():
                files[f"{PROJECT_DATA}/{path.relative_to(project.root).as_posix()}"] = path.read_bytes()
    return files


def _to_stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)  # a frontend shows the build hooks' stderr (pip with -v)


def prepare_metadata(
    settings: BuildSettings, metadata_directory: str, flit_build: Callable[[str], str], *, editable: bool = False
) -> str:
    """PEP 517 prepare_metadata: the .dist-info of the very wheel build_distribution makes (built here; the
    backend wheels are cached, so the build_wheel call that follows is cheap and byte-identical)."""
    with tempfile.TemporaryDirectory(prefix="flagscale-metadata-") as tmp:
        name = build_distribution(settings, tmp, flit_build, editable=editable)
        return dist_info_of(Path(tmp) / name, Path(metadata_directory))


def direct_reference(wheel: BackendWheel) -> str:
    """`name @ file:///…whl`, limited to the Python the wheel was built for (`cp311`): a resolver that locks
    for every Python the project supports (uv sync) then needs the wheel only where it can install."""
    python = re.match(r"^cp(\d)(\d+)$", wheel.path.name.split("-")[-3])
    marker = f' ; python_version == "{python[1]}.{python[2]}"' if python else ""
    return f"{wheel.distribution} @ {wheel.path.as_uri()}{marker}"


def build_distribution(
    settings: BuildSettings,
    wheel_directory: str,
    flit_build: Callable[[str], str],
    *,
    editable: bool = False,
    requirement: Callable[[BackendWheel], str] | None = None,
) -> str:
    """Build the backend wheels, then the FlagScale wheel pinned to them; returns its file name.

    `requirement` says how to pin a backend wheel: a file:// direct reference by default (works with
    pip for local installs), `name==version` for a wheelhouse served as an index.
    """
    project = Project.find()
    wheels = [build_backend_wheel(target, progress=_to_stderr) for target in settings.targets(project)]
    pin = requirement or direct_reference
    runtime = runtime_requires(project, settings.device, wheels)
    with tempfile.TemporaryDirectory(prefix="flagscale-wheel-") as tmp:
        name = flit_build(tmp)
        edit = WheelEdit(
            version=device_version(settings),
            add_requires=tuple(pin(w) for w in wheels) + tuple(runtime),
            dist_info_files={PROVENANCE_FILE: to_bytes(device_provenance(settings, wheels, runtime))},
            files={} if editable else project_data(project),
        )
        return rewrite_wheel(Path(tmp) / name, Path(wheel_directory), edit).name
