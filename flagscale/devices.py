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

_KNOWN = {"name", "description", "aliases", "backends", "runtime_requires"}
_BUILD_KNOWN = {"env", "cmake_args", "drop_build_requires", "config_settings"}


@dataclass(frozen=True)
class BackendBuild:
    """How a device builds one backend's wheel (`[build.<backend>]` in device.toml)."""

    env: tuple[tuple[str, str], ...] = ()  # e.g. VLLM_TARGET_DEVICE=empty
    cmake_args: tuple[str, ...] = ()  # passed as CMAKE_ARGS (llama.cpp)
    drop_build_requires: tuple[str, ...] = ()  # e.g. torch: never pull another torch into a build
    config_settings: tuple[tuple[str, str], ...] = ()  # the upstream backend's own -C settings

    def environ(self) -> dict[str, str]:
        env = dict(self.env)
        if self.cmake_args:
            env["CMAKE_ARGS"] = " ".join(self.cmake_args)
        return env


@dataclass(frozen=True)
class Device:
    name: str
    description: str
    aliases: tuple[str, ...]
    backends: tuple[str, ...]
    manifest: Path
    runtime_requires: tuple[str, ...] = ()
    builds: tuple[tuple[str, BackendBuild], ...] = ()

    def build_for(self, backend: str) -> BackendBuild:
        return dict(self.builds).get(backend, BackendBuild())


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
    for key in raw:
        if key not in ("device", "build"):
            raise ConfigError(f"{path}: unknown table [{key}]; valid tables: [device], [build.<backend>]")
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
    builds = []
    for backend, build in raw.get("build", {}).items():
        where = f"{path}: [build.{backend}]"
        try:
            backend = project.pins.resolve(backend).backend
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from None
        if backend not in backends:
            raise ConfigError(f"{where}: {backend} is not in [device].backends")
        for key in build:
            if key not in _BUILD_KNOWN:
                raise ConfigError(f"{where}.{key}: unknown field; valid fields: {', '.join(sorted(_BUILD_KNOWN))}"
                                  f"{nearest(key, sorted(_BUILD_KNOWN))}")
        builds.append((backend, BackendBuild(
            env=tuple(sorted((str(k), str(v)) for k, v in build.get("env", {}).items())),
            cmake_args=tuple(build.get("cmake_args", ())),
            drop_build_requires=tuple(build.get("drop_build_requires", ())),
            config_settings=tuple(sorted((str(k), str(v)) for k, v in build.get("config_settings", {}).items())))))
    return Device(name, str(table.get("description", "")), tuple(table.get("aliases", ())), tuple(backends), path,
                  tuple(table.get("runtime_requires", ())), tuple(builds))


def resolve_device(project: Project, name: str) -> Device:
    devices = load_devices(project)
    wanted = name.strip().lower()
    for device in devices.values():
        if wanted == device.name or wanted in device.aliases:
            return device
    raise ConfigError(f"unknown device {name!r}; valid devices: {', '.join(devices)}{nearest(name, list(devices))}")
