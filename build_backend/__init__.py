"""FlagScale's in-tree PEP 517 hooks (`backend-path = ["."]`): thin calls into the core.

flit_core packages FlagScale itself; with `-C device=D -C backend=B` each backend (Megatron, vLLM, SGLang,
llama.cpp) is built from its patched pin by the upstream's own build system (flagscale.wheels.backend_wheel),
and the FlagScale wheel is re-versioned `X+D`, pinned to those wheels and given its provenance
(flagscale.wheels.device_wheel). No prepare_metadata hook: the metadata depends on the backend wheels, so
pip takes it from the wheel.

A FlagScaleError (a mistyped setting, a patch that does not apply, a failed upstream build) is reported as
the CLI reports it: one `error: …` line, no traceback, a non-zero exit of the hook's process.
"""

from __future__ import annotations

from flit_core import buildapi as _flit

from build_backend.settings import parse_settings
from flagscale.errors import reported


def get_requires_for_build_wheel(config_settings=None):
    from flagscale.wheels.device_wheel import backend_build_requires

    with reported():
        settings = parse_settings(config_settings)
        return _flit.get_requires_for_build_wheel() + backend_build_requires(settings)


def get_requires_for_build_editable(config_settings=None):
    return get_requires_for_build_wheel(config_settings)


def get_requires_for_build_sdist(config_settings=None):
    with reported():
        parse_settings(config_settings)
    return _flit.get_requires_for_build_sdist()


def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    from flagscale.wheels.device_wheel import build_distribution

    with reported():
        return build_distribution(parse_settings(config_settings), wheel_directory, _flit.build_wheel)


def build_editable(wheel_directory, config_settings=None, metadata_directory=None):
    from flagscale.wheels.device_wheel import build_distribution

    with reported():
        return build_distribution(parse_settings(config_settings), wheel_directory, _flit.build_editable, editable=True)


def build_sdist(sdist_directory, config_settings=None):
    with reported():
        parse_settings(config_settings)
    return _flit.build_sdist(sdist_directory)
