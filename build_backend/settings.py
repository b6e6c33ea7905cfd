"""Config settings (`pip install . -C device=cpu -C backend=megatron`), parsed once and validated strictly.

The same settings can come from the environment (FLAGSCALE_DEVICE, FLAGSCALE_BACKEND,
FLAGSCALE_UPSTREAM_SOURCE) for tools that cannot pass -C; -C wins.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path

KNOWN_KEYS = ("device", "backend", "upstream-source")
ENV_VARS = {"device": "FLAGSCALE_DEVICE", "backend": "FLAGSCALE_BACKEND", "upstream-source": "FLAGSCALE_UPSTREAM_SOURCE"}


class SettingsError(ValueError):
    """A config setting is not one FlagScale knows, or has a value it cannot use."""


def _hint(word: str, choices) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def parse_settings(config_settings: dict | None, root: Path | None = None):
    raw: dict[str, str] = {key: os.environ[var] for key, var in ENV_VARS.items() if os.environ.get(var)}
    for key, value in (config_settings or {}).items():
        if key.startswith("--"):  # pip's own pass-through options (--build-option, ...)
            continue
        normalized = key.replace("_", "-").lower()
        if normalized not in KNOWN_KEYS:
            raise SettingsError(f"unknown config setting {key!r}{_hint(normalized, KNOWN_KEYS)}; "
                                f"valid settings: {', '.join(KNOWN_KEYS)}")
        if isinstance(value, list):
            value = ",".join(value) if normalized == "backend" else value[-1]
        raw[normalized] = str(value)
    from flagscale.errors import ConfigError
    from flagscale.upstream.project import Project

    project = Project.find(root)  # as the build itself does: $FLAGSCALE_ROOT, else the checkout around the cwd
    try:
        device = None
        if raw.get("device", "").strip().lower() not in ("", "none"):
            from flagscale.hardware.registry import resolve_device

            device = resolve_device(project, raw["device"]).name
        backends = []
        for name in filter(None, (b.strip() for b in raw.get("backend", "").split(","))):
            backend = project.pins.resolve(name).backend
            if backend not in backends:
                backends.append(backend)
    except ConfigError as exc:
        raise SettingsError(f"config setting: {exc}") from None
    source = raw.get("upstream-source", "auto")
    if source not in ("auto", "submodule", "sdist") and not Path(source).is_dir():
        raise SettingsError(f"upstream-source={source!r}: use auto, submodule, sdist or an existing folder")
    if backends and device is None:
        raise SettingsError("backend=... needs a device: add -C device=cpu (or another device from `flagscale devices`)")
    from flagscale.wheels.device_wheel import BuildSettings

    return BuildSettings(device, tuple(backends), source)
