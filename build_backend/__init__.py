"""FlagScale's in-tree PEP 517 hooks (`backend-path = ["."]`): thin calls into the core.

flit_core packages FlagScale itself (flagscale.wheels.flit_build); with `-C device=D -C backend=B` each backend
(Megatron, vLLM, SGLang, llama.cpp) is built from its patched pin by the upstream's own build system
(flagscale.wheels.backend_wheel), and the FlagScale wheel is re-versioned `X+D`, pinned to those wheels and given
its provenance (flagscale.wheels.device_wheel). `version` and `dependencies` are therefore `dynamic` in
pyproject.toml, and prepare_metadata returns the dist-info of the very wheel build_wheel makes.

A FlagScaleError (a mistyped setting, a patch that does not apply, a failed upstream build) is reported as
the CLI reports it: one `error: …` line, no traceback, a non-zero exit of the hook's process.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

from build_backend.settings import parse_settings
from flagscale.errors import reported


def _flit_wheel(editable: bool = False):
    from flagscale.wheels.flit_build import flit_wheel

    return partial(flit_wheel, Path.cwd(), editable=editable)  # PEP 517: hooks run in the source tree


def get_requires_for_build_wheel(config_settings=None):
    from flagscale.wheels.device_wheel import backend_build_requires

    with reported():
        settings = parse_settings(config_settings)
        return backend_build_requires(settings)  # flit_core needs nothing more: it reads __version__ by AST


def get_requires_for_build_editable(config_settings=None):
    return get_requires_for_build_wheel(config_settings)


def get_requires_for_build_sdist(config_settings=None):
    with reported():
        parse_settings(config_settings)
    return []


def prepare_metadata_for_build_wheel(metadata_directory, config_settings=None):
    from flagscale.wheels.device_wheel import prepare_metadata

    with reported():
        return prepare_metadata(parse_settings(config_settings), metadata_directory, _flit_wheel())


def prepare_metadata_for_build_editable(metadata_directory, config_settings=None):
    from flagscale.wheels.device_wheel import prepare_metadata

    with reported():
        return prepare_metadata(parse_settings(config_settings), metadata_directory, _flit_wheel(True), editable=True)


def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    from flagscale.wheels.device_wheel import build_distribution

    with reported():
        return build_distribution(parse_settings(config_settings), wheel_directory, _flit_wheel())


def build_editable(wheel_directory, config_settings=None, metadata_directory=None):
    from flagscale.wheels.device_wheel import build_distribution

    with reported():
        return build_distribution(parse_settings(config_settings), wheel_directory, _flit_wheel(True), editable=True)


def build_sdist(sdist_directory, config_settings=None):
    from flagscale.wheels.device_wheel import device_version
    from flagscale.wheels.flit_build import flit_sdist

    with reported():
        return flit_sdist(Path.cwd(), sdist_directory, device_version(parse_settings(config_settings)))
