"""`flagscale install` and `flagscale build`: patched backend wheels built in an isolated build
environment (like pip's build isolation), then installed with pip or written to a wheelhouse."""

from __future__ import annotations

import importlib.metadata
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

from flagscale.errors import BuildError
from flagscale.patches.tree import patched_tree
from flagscale.upstream.cache import Cache
from flagscale.upstream.project import Project
from flagscale.upstream.target import Target
from flagscale.wheels.backend_wheel import (
    BackendWheel,
    build_backend_wheel,
    build_requires,
    cached_backend_wheel,
    device_settings,
)
from flagscale.wheels.device_wheel import BuildSettings, build_distribution, runtime_requires

log = logging.getLogger(__name__)
Step = Callable[[str], None]


def _no_step(message: str) -> None:
    log.info("%s", message)


def torch_constraint() -> list[str]:
    """Keep the environment's torch: a backend install never replaces it."""
    try:
        return [f"torch=={importlib.metadata.version('torch')}"]
    except importlib.metadata.PackageNotFoundError:
        return []


@contextmanager
def _constraints_file(extra: list[str]):
    with tempfile.NamedTemporaryFile("w", suffix=".txt", prefix="flagscale-constraints-", delete=False) as f:
        f.write("\n".join(torch_constraint() + extra) + "\n")
    try:
        yield f.name
    finally:
        os.unlink(f.name)


def build_in_isolation(target: Target, step: Step = _no_step) -> BackendWheel:
    """Build (or reuse) one backend wheel; its build requirements go into a throw-away environment."""
    pin = target.pin
    _, settings = device_settings(target)
    step(f"{pin.backend}: fetching {pin.sdist.name} {pin.sdist.version} and applying patches")
    tree = patched_tree(target)
    from build.env import DefaultIsolatedEnv

    with DefaultIsolatedEnv() as env:
        cached = cached_backend_wheel(target, python=env.python_executable)
        if cached is not None:
            return cached
        requires = build_requires(tree, settings)
        step(f"{pin.backend}: installing build requirements ({', '.join(requires)})")
        with _constraints_file([]) as constraints:
            os.environ.setdefault("PIP_CONSTRAINT", constraints)
            try:
                env.install(requires)
            except subprocess.CalledProcessError as exc:
                raise BuildError(
                    f"{pin.backend}: installing its build requirements failed ({exc}); check your package index"
                ) from None
            finally:
                if os.environ.get("PIP_CONSTRAINT") == constraints:
                    del os.environ["PIP_CONSTRAINT"]
        step(f"{pin.backend}: building its wheel with the upstream build system (this can take minutes)")
        return build_backend_wheel(target, python=env.python_executable, progress=step)


def install(
    project: Project,
    backends: list[str],
    device: str | None,
    source: str = "auto",
    cache: Cache | None = None,
    step: Step = _no_step,
) -> list[BackendWheel]:
    """Build (or reuse) the patched backend wheels and pip-install them with the device's runtime needs."""
    wheels = [build_in_isolation(Target.of(project, b, device, source, cache), step) for b in backends]
    runtime = runtime_requires(project, device, wheels)
    step(f"installing {', '.join(w.path.name for w in wheels)}" + (f" and {', '.join(runtime)}" if runtime else ""))
    with _constraints_file([]) as constraints:
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--constraint",
            constraints,
            *map(str, (w.path for w in wheels)),
            *runtime,
        ]
        result = subprocess.run(cmd)
    if result.returncode != 0:
        raise BuildError(
            f"pip could not install {', '.join(w.path.name for w in wheels)} (exit "
            f"{result.returncode}); see pip's output above"
        )
    return wheels


def build_wheelhouse(
    project: Project,
    backends: list[str],
    device: str | None,
    out: Path,
    source: str = "auto",
    cache: Cache | None = None,
    step: Step = _no_step,
) -> list[Path]:
    """FlagScale's wheel (`X+device`, plain `name==version` pins) and the backend wheels, in `out`."""
    wheels = [build_in_isolation(Target.of(project, b, device, source, cache), step) for b in backends]
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for wheel in wheels:
        shutil.copy2(wheel.path, out / wheel.path.name)
        written.append(out / wheel.path.name)
    step("building the flagscale wheel")
    settings = BuildSettings(device, tuple(project.pins.resolve(b).backend for b in backends), source)
    from functools import partial

    from flagscale.wheels.flit_build import flit_wheel

    name = build_distribution(
        settings, str(out), partial(flit_wheel, project.root), requirement=lambda w: f"{w.distribution}=={w.version}"
    )
    written.append(out / name)
    return written
