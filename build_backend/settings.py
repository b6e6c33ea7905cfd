"""Config settings (`pip install . -C device=cpu -C backend=megatron`), parsed once and validated strictly.

The same settings can come from the environment (FLAGSCALE_DEVICE, FLAGSCALE_BACKEND,
FLAGSCALE_UPSTREAM_SOURCE) for tools that cannot pass -C; -C wins.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from flagscale.errors import ConfigError, SettingsError
from flagscale.settings import convert, data_keys, setting

__all__ = ["KNOWN_KEYS", "SettingsError", "parse_settings"]

UNKNOWN_SETTING = "unknown config setting {key!r}{hint}; valid settings: {valid}"


def _upstream_source(value: str) -> str:
    if value not in ("auto", "submodule", "sdist") and not Path(value).is_dir():
        raise ValueError("use auto, submodule, sdist or an existing folder")
    return value


@dataclass(frozen=True)
class Requested:
    """The settings as given, before the device and backend names are resolved against the checkout."""

    device: str = ""  # "" or none: the plain toolchain wheel
    backend: str = ""  # comma-separated
    upstream_source: str = setting("auto", key="upstream-source", check=_upstream_source)


KNOWN_KEYS = data_keys(Requested)
ENV_VARS = {
    "device": "FLAGSCALE_DEVICE",
    "backend": "FLAGSCALE_BACKEND",
    "upstream-source": "FLAGSCALE_UPSTREAM_SOURCE",
}


def parse_settings(config_settings: dict | None, root: Path | None = None):
    raw: dict[str, str] = {key: os.environ[var] for key, var in ENV_VARS.items() if os.environ.get(var)}
    for key, value in (config_settings or {}).items():
        if key.startswith("--"):  # pip's own pass-through options (--build-option, ...)
            continue
        normalized = key.replace("_", "-").lower()
        if isinstance(value, list):
            value = ",".join(value) if normalized == "backend" else value[-1]
        raw[normalized] = str(value)
    try:
        requested = convert(Requested, raw, "", unknown=UNKNOWN_SETTING)
    except ConfigError as exc:
        raise SettingsError(str(exc)) from None
    from flagscale.upstream.project import Project

    project = Project.find(root)  # as the build itself does: $FLAGSCALE_ROOT, else the checkout around the cwd
    try:
        device = None
        if requested.device.strip().lower() not in ("", "none"):
            from flagscale.hardware.registry import resolve_device

            device = resolve_device(project, requested.device).name
        backends = []
        for name in filter(None, (b.strip() for b in requested.backend.split(","))):
            backend = project.pins.resolve(name).backend
            if backend not in backends:
                backends.append(backend)
    except ConfigError as exc:
        raise SettingsError(f"config setting: {exc}") from None
    if backends and device is None:
        raise SettingsError(
            "backend=... needs a device: add -C device=cpu (or another device from `flagscale devices`)"
        )
    from flagscale.wheels.device_wheel import BuildSettings

    return BuildSettings(device, tuple(backends), requested.upstream_source)
