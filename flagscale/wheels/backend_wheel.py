"""Build a backend's wheel from its patched tree with the upstream's own PEP 517 build system.

The wheel is re-versioned with a local label naming FlagScale, the device and the patch set
(`megatron_core-0.16.1+fs.cpu.1a2b3c4d`), carries `flagscale_build.json` (its provenance) and is
cached by a key over every input, so a no-change rebuild is a cache hit.

Build requirements are *not* installed here: inside a PEP 517 build pip installs what
`build_requires` reports; the CLI prepares an isolated environment first (flagscale.wheels.install).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import subprocess
import sys
import tomllib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from flagscale.errors import BuildError, ConfigError
from flagscale.hardware.registry import BackendBuild, Device, resolve_device
from flagscale.patches.apply import copy_tree
from flagscale.patches.tree import PatchedTree, patched_tree
from flagscale.upstream.cache import remove_tree
from flagscale.upstream.target import Target
from flagscale.wheels.compiler_cache import compiler_cache_env
from flagscale.wheels.provenance import PROVENANCE_FILE, BackendProvenance, to_bytes, upstream_record
from flagscale.wheels.wheelfile import WheelEdit, rewrite_wheel, source_date_epoch

log = logging.getLogger(__name__)

BUILDER_VERSION = "1"
__all__ = ["PROVENANCE_FILE", "BackendWheel", "build_backend_wheel", "cached_backend_wheel", "device_settings"]


@dataclass(frozen=True)
class BackendWheel:
    backend: str
    device: str | None
    path: Path
    distribution: str
    version: str
    provenance: BackendProvenance
    cache_hit: bool


def build_dir(tree: PatchedTree) -> Path:
    """The folder holding the upstream's pyproject.toml inside a patched tree."""
    src = tree.source
    if src.layout == "sdist":
        return tree.path
    repo_root_of_sdist = [repo for repo, sdist in src.pin.sdist.paths if sdist == ""]
    if repo_root_of_sdist:
        return tree.path / repo_root_of_sdist[0]
    if all(repo == sdist for repo, sdist in src.pin.sdist.paths):
        return tree.path  # the repository root builds the same distribution
    raise ConfigError(
        f"{src.pin.backend}: its wheel builds from the {src.pin.sdist.name} sdist, not from the "
        f"{src.pin.name} repository; use --source sdist (upstream-source=sdist)"
    )


def build_requires(tree: PatchedTree, settings: BackendBuild) -> list[str]:
    """The upstream's static build requirements, less those the device must not pull (torch)."""
    pyproject = build_dir(tree) / "pyproject.toml"
    system = tomllib.loads(pyproject.read_text(encoding="utf-8")).get("build-system", {}) if pyproject.is_file() else {}
    requires = system.get("requires", ["setuptools>=40.8.0"])
    drop = {_dist_name(r) for r in settings.drop_build_requires}
    return [r for r in requires if _dist_name(r) not in drop]


def _dist_name(requirement: str) -> str:
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    return canonicalize_name(Requirement(requirement).name)


def device_settings(target: Target) -> tuple[Device | None, BackendBuild]:
    """The target's device (None for the plain toolchain) and how it builds the target's backend."""
    if target.device is None:
        return None, BackendBuild()
    dev = resolve_device(target.project, target.device)
    if target.backend not in dev.backends:
        raise ConfigError(
            f"device {dev.name} does not support backend {target.backend}; it supports "
            f"{', '.join(dev.backends) or 'none'} (see {dev.manifest})"
        )
    return dev, dev.build_for(target.backend)


@dataclass(frozen=True)
class _Planned:
    """A backend wheel worked out before building: where it is cached and what it will say about itself."""

    target: Target
    tree: PatchedTree
    settings: BackendBuild
    key: str
    label: str
    provenance: BackendProvenance


def _plan(target: Target, python: str) -> _Planned:
    dev, settings = device_settings(target)
    target = replace(target, device=dev.name if dev else None)
    tree = patched_tree(target)
    inputs = {
        "builder": BUILDER_VERSION,
        "tree": tree.key,
        "env": settings.environ(),
        "config_settings": dict(settings.config_settings),
        "python": _python_tag(python),
        "source_date_epoch": source_date_epoch(),
    }
    key = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()
    label = f"fs.{local_segment(target.device)}.{key[:8]}" if target.device else f"fs.{key[:8]}"
    provenance = BackendProvenance(
        target.backend,
        target.device,
        key,
        tree.patches,
        upstream_record(target.pin, tree.source.kind),
        {
            "env": settings.environ(),
            "config_settings": dict(settings.config_settings),
            "python": inputs["python"],
            "source_date_epoch": inputs["source_date_epoch"],
        },
    )
    return _Planned(target, tree, settings, key, label, provenance)


def _wheel_of(planned: _Planned, entry: Path, hit: bool) -> BackendWheel:
    (wheel,) = entry.glob("*.whl")
    dist, version = wheel.name.split("-")[:2]
    return BackendWheel(planned.target.backend, planned.target.device, wheel, dist, version, planned.provenance, hit)


def cached_backend_wheel(target: Target, python: str | None = None) -> BackendWheel | None:
    """The target's patched backend wheel if it is built already, else None (nothing is built)."""
    planned = _plan(target, python or sys.executable)
    entry = target.cache.path("wheels", planned.key)
    return _wheel_of(planned, entry, True) if entry.exists() else None


def build_backend_wheel(
    target: Target,
    python: str | None = None,
    log_dir: Path | None = None,
    progress: Callable[[str], None] | None = None,
) -> BackendWheel:
    """The target's patched backend wheel, from the cache or built now with the upstream's own build system.

    `progress` hears how far a long compile is (`llama.cpp: compiled 120/268 (44%)`).
    """
    python = python or sys.executable
    planned = _plan(target, python)
    target, key = planned.target, planned.key

    def build(tmp: Path) -> None:
        work = tmp / "src"
        work.mkdir()
        copy_tree(build_dir(planned.tree), work)
        raw = tmp / "raw"
        logfile = (log_dir or target.cache.root / "logs") / f"{target.backend}-{target.device or 'none'}-{key[:12]}.log"
        logfile.parent.mkdir(parents=True, exist_ok=True)
        flags = {"env": planned.settings.environ(), "config_settings": dict(planned.settings.config_settings)}

        def with_ccache(env: dict[str, str]) -> dict[str, str]:  # not in the key: ccache gives the same objects
            return compiler_cache_env(env, target.cache.root, target.backend, target.device, flags, work)

        built = _run_upstream_build(work, raw, python, planned.settings, logfile, target.backend, progress, with_ccache)
        version = _with_label(_wheel_version(built), planned.label)
        rewrite_wheel(
            built, tmp, WheelEdit(version=version, dist_info_files={PROVENANCE_FILE: to_bytes(planned.provenance)})
        )
        remove_tree(work)
        remove_tree(raw)

    entry, hit = target.cache.get_or_create("wheels", key, build)
    return _wheel_of(planned, entry, hit)


def _wheel_version(wheel: Path) -> str:
    return wheel.name.split("-")[1]


def _with_label(version: str, label: str) -> str:
    """Add our local label, keeping one the upstream set itself (vLLM's `+empty` -> `+empty.fs.cpu.…`)."""
    from packaging.version import Version

    parsed = Version(version)
    return f"{parsed.public}+{parsed.local}.{label}" if parsed.local else f"{parsed.public}+{label}"


def local_segment(name: str) -> str:
    """A device name as part of a local version label: `-`/`_` would end the version in a wheel file name."""
    return re.sub(r"[-_]+", ".", name)


def _python_tag(python: str) -> str:
    if python == sys.executable:
        return f"{sys.implementation.cache_tag}-{sys.platform}"
    code = "import sys; print(f'{sys.implementation.cache_tag}-{sys.platform}')"
    return subprocess.run([python, "-c", code], capture_output=True, text=True, check=True).stdout.strip()


_COMPILE_STEP = re.compile(rb"^\[(\d+)/(\d+)\] ", re.MULTILINE)  # ninja's (and CMake make's) step counter


def compile_progress(logfile: Path) -> tuple[int, int] | None:
    """The last `[n/N]` step of a build log's tail: how far a CMake/ninja compile has got."""
    try:
        with open(logfile, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 65536))
            tail = f.read()
    except OSError:
        return None
    steps = _COMPILE_STEP.findall(tail)
    return (int(steps[-1][0]), int(steps[-1][1])) if steps else None


def _wait_reporting(proc: subprocess.Popen, logfile: Path, backend: str, progress: Callable[[str], None] | None) -> int:
    """Wait for the build, telling `progress` each time the compile passes another tenth."""
    reported = -1
    while True:
        try:
            return proc.wait(timeout=2)
        except subprocess.TimeoutExpired:
            pass
        step = compile_progress(logfile) if progress else None
        if progress is not None and step and step[1] and step[0] * 10 // step[1] > reported:
            reported = step[0] * 10 // step[1]
            progress(f"{backend}: compiled {step[0]}/{step[1]} ({100 * step[0] // step[1]}%)")


def _run_upstream_build(
    work: Path,
    out: Path,
    python: str,
    settings: BackendBuild,
    logfile: Path,
    backend: str,
    progress: Callable[[str], None] | None = None,
    launch_env: Callable[[dict[str, str]], dict[str, str]] | None = None,
) -> Path:
    from pyproject_hooks import BuildBackendHookCaller

    pyproject = work / "pyproject.toml"
    system = tomllib.loads(pyproject.read_text(encoding="utf-8")).get("build-system", {}) if pyproject.is_file() else {}
    # Upstream setup scripts run `python3 -m ...` (megatron's pybind11 lookup): make that the build's python.
    path = os.pathsep.join([os.path.dirname(python), os.environ.get("PATH", "")])
    env = {**settings.environ(), "SOURCE_DATE_EPOCH": str(source_date_epoch()), "PATH": path}
    env = launch_env(env) if launch_env else env

    def runner(cmd: Sequence[str], cwd: str | None = None, extra_environ=None) -> None:
        # Drop the hook variables of the frontend that runs *us* (python -m build, a newer pip): an inherited
        # _PYPROJECT_HOOKS_BACKEND_PATH_JSON would make the upstream's build hooks load from our backend-path.
        inherited = {k: v for k, v in os.environ.items() if not k.startswith(("_PYPROJECT_HOOKS_", "PEP517_"))}
        full = {**inherited, **(extra_environ or {}), **env}
        with open(logfile, "ab") as log_out:
            proc = subprocess.Popen(cmd, cwd=cwd, env=full, stdout=log_out, stderr=subprocess.STDOUT)
        try:
            returncode = _wait_reporting(proc, logfile, backend, progress)
        except BaseException:  # interrupted: do not leave the compiler running behind us
            proc.kill()
            proc.wait()
            raise
        if returncode != 0:
            tail = logfile.read_text(errors="replace").strip().splitlines()[-15:]
            raise BuildError(
                f"building the {backend} wheel failed (exit {returncode}); last lines of {logfile}:\n" + "\n".join(tail)
            )

    hooks = BuildBackendHookCaller(
        str(work),
        system.get("build-backend", "setuptools.build_meta:__legacy__"),
        system.get("backend-path"),
        runner=runner,
        python_executable=python,
    )
    out.mkdir()
    log.info("building the %s wheel with its own build system (log: %s)", backend, logfile)
    name = hooks.build_wheel(str(out), config_settings=dict(settings.config_settings) or None)
    return out / name
