"""Config settings (`pip install . -C key=value`), parsed once and validated strictly."""

from __future__ import annotations

import difflib
from dataclasses import dataclass

KNOWN_KEYS: tuple[str, ...] = ()  # device, backend and upstream-source arrive with backend wheels


class SettingsError(ValueError):
    """A config setting pip passed is not one FlagScale knows."""


@dataclass(frozen=True)
class Settings:
    pass


def parse_settings(config_settings: dict | None) -> Settings:
    for key in config_settings or {}:
        if key.startswith("--"):  # pip's own pass-through options (e.g. --build-option)
            continue
        close = difflib.get_close_matches(key, KNOWN_KEYS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        valid = ", ".join(KNOWN_KEYS) or "none yet: this build makes the plain toolchain wheel"
        raise SettingsError(f"unknown config setting {key!r}{hint}; valid settings: {valid}")
    return Settings()
