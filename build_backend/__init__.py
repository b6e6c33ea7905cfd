"""FlagScale's in-tree PEP 517 backend (`backend-path = ["."]`): thin hooks over the core.

Today it builds the plain toolchain wheel (flit_core does the packaging). Config settings are
validated strictly at this edge; device-specific wheels of the patched backends build on the same
hooks (see docs/patches.md and third_party/upstreams.toml).
"""

from __future__ import annotations

from flit_core import buildapi as _flit

from build_backend.settings import parse_settings


def get_requires_for_build_wheel(config_settings=None):
    parse_settings(config_settings)
    return _flit.get_requires_for_build_wheel(config_settings)


def get_requires_for_build_sdist(config_settings=None):
    parse_settings(config_settings)
    return _flit.get_requires_for_build_sdist(config_settings)


def get_requires_for_build_editable(config_settings=None):
    parse_settings(config_settings)
    return _flit.get_requires_for_build_editable(config_settings)


def prepare_metadata_for_build_wheel(metadata_directory, config_settings=None):
    parse_settings(config_settings)
    return _flit.prepare_metadata_for_build_wheel(metadata_directory, config_settings)


def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    parse_settings(config_settings)
    return _flit.build_wheel(wheel_directory, config_settings, metadata_directory)


def build_editable(wheel_directory, config_settings=None, metadata_directory=None):
    parse_settings(config_settings)
    return _flit.build_editable(wheel_directory, config_settings, metadata_directory)


def build_sdist(sdist_directory, config_settings=None):
    parse_settings(config_settings)
    return _flit.build_sdist(sdist_directory, config_settings)
