"""The hardware registry: one `hardware/<device>/device.toml` per chip, parsed into typed settings.

This is the part the patch tooling needs (name, aliases, supported backends); the runtime and build
fields grow here as the backends that use them land.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path

from flagscale.errors import ConfigError
from flagscale.project import Project
from flagscale.upstream import nearest

_KNOWN = {"name", "description", "aliases", "backends"}


@dataclass(frozen=True)
class Device:
    name: str
    description: str
    aliases: tuple[str, ...]
    backends: tuple[str, ...]
    manifest: Path


def load_devices(project: Project) -> dict[str, Device]:
    return {name: load_device(project, project.root / "hardware" / name / "device.toml") for name in project.devices}


def load_device(project: Project, path: Path) -> Device:
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    table = raw.get("device")
    if not isinstance(table, dict):
        raise ConfigError(f"{path}: needs a [device] table")
    for key in table:
        if key not in _KNOWN:
            raise ConfigError(f"{path}: [device].{key}: unknown field; valid fields: {', '.join(sorted(_KNOWN))}"
                              f"{nearest(key, sorted(_KNOWN))}")
    name = table.get("name")
    if name != path.parent.name:
        raise ConfigError(f"{path}: [device].name must be {path.parent.name!r} (the folder name), not {name!r}")
    backends = []
    for backend in table.get("backends", []):
        try:
            backends.append(project.pins.resolve(backend).backend)
        except ConfigError as exc:
            raise ConfigError(f"{path}: [device].backends: {exc}") from None
    return Device(name, str(table.get("description", "")), tuple(table.get("aliases", ())), tuple(backends), path)


def resolve_device(project: Project, name: str) -> Device:
    devices = load_devices(project)
    wanted = name.strip().lower()
    for device in devices.values():
        if wanted == device.name or wanted in device.aliases:
            return device
    raise ConfigError(f"unknown device {name!r}; valid devices: {', '.join(devices)}{nearest(name, list(devices))}")
