"""The hardware registry: one `hardware/<device>/device.toml` per chip, parsed into typed settings.

A manifest has three kinds of table, each validated strictly (an unknown table or field, or a value of
the wrong type, fails with the file, the field as a dotted TOML key such as `device.collective` or
`build."llama.cpp".cmake_args`, and the nearest valid name):

* `[device]`: what the runtime needs: the torch device type and the extension module that registers
  it, the collective backend, the visible-devices variable, extra runtime requirements, and which
  backends the device supports;
* `[build.<backend>]`: how the device builds one backend's wheel (environment, llama.cpp CMake flags,
  build requirements to drop, the upstream backend's own config settings, the vLLM platform plugin,
  the vendor toolchain the build needs);
* `[ci]`: the labels of the runners that have the chip, and which backends CI runs there.

Adding a chip is adding a folder: nothing in the code lists the devices.
"""

from __future__ import annotations

import dataclasses
import re
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flagscale.errors import ConfigError, FlagScaleError
from flagscale.settings import convert, nearest, nonempty, setting
from flagscale.upstream.project import Project

# A plain runner: what CI uses for cells whose build needs no vendor toolchain, and for patch checks.
PLAIN_RUNNER = ("ubuntu-latest",)

_IDENT = re.compile(r"[a-z][a-z0-9_]*")  # torch device types, collective backend names, module names
_ENV_NAME = re.compile(r"[A-Z_][A-Z0-9_]*")
_DEVICE_NAME = re.compile(r"[a-z][a-z0-9_-]*")
UNKNOWN_FIELD = "{where}.{key}: unknown field{hint}; valid fields: {valid}"
_TABLES = ("device", "build", "ci")


# ---------------------------------------------------------------------------- checks of one field
# `convert` reports a check's ValueError with the file and the field: `<file>: device.<field>=<value>: ...`.
def _matching(pattern: re.Pattern, what: str) -> Callable[[str], str]:
    def check(value: str) -> str:
        if not pattern.fullmatch(value):
            raise ValueError(f"is not {what}")
        return value

    return check


def _requirement(value: str) -> str:
    from packaging.requirements import InvalidRequirement, Requirement

    try:
        Requirement(value)
    except InvalidRequirement as exc:
        raise ValueError(f"is not a pip requirement: {exc}") from None
    return value


def _cmake_arg(value: str) -> str:
    if not value.startswith("-"):
        raise ValueError("is not a CMake argument (e.g. -DGGML_CUDA=ON)")
    return value


def _items(check: Callable[[str], str]) -> Callable[[tuple[str, ...]], tuple[str, ...]]:
    """A list check: every item passes `check`, and none is listed twice."""

    def check_items(values: tuple[str, ...]) -> tuple[str, ...]:
        for index, value in enumerate(values):
            try:
                check(value)
            except ValueError as exc:
                raise ValueError(f"item {index}: {value!r} {exc}") from None
            if value in values[:index]:
                raise ValueError(f"item {index}: {value!r} is listed twice")
        return values

    return check_items


def _env_names(env: tuple[tuple[str, str], ...]) -> tuple[tuple[str, str], ...]:
    for name, _ in env:
        if not _ENV_NAME.fullmatch(name):
            raise ValueError(f"{name!r} is not an environment variable name")
    return env


# --------------------------------------------------------------------------------- typed settings
@dataclass(frozen=True)
class BackendBuild:
    """How a device builds one backend's wheel (`[build.<backend>]` in device.toml)."""

    env: tuple[tuple[str, str], ...] = setting((), check=_env_names)  # e.g. VLLM_TARGET_DEVICE=empty
    cmake_args: tuple[str, ...] = setting((), check=_items(_cmake_arg))  # passed as CMAKE_ARGS (llama.cpp)
    # e.g. torch: never pull another torch into a build
    drop_build_requires: tuple[str, ...] = setting((), check=_items(_requirement))
    config_settings: tuple[tuple[str, str], ...] = ()  # the upstream backend's own -C settings
    platform_plugin: str | None = setting(None, check=_requirement)  # installed beside the wheel: vllm-ascend
    toolchain: str | None = setting(None, check=nonempty)  # vendor SDK the build compiles with; None: any machine

    def environ(self) -> dict[str, str]:
        env = dict(self.env)
        if self.cmake_args:
            env["CMAKE_ARGS"] = " ".join(self.cmake_args)
        return env


@dataclass(frozen=True)
class CISettings:
    """`[ci]`: where the device's cells run in CI."""

    # runner labels of machines with the chip; empty: CI has none
    runs_on: tuple[str, ...] = setting((), check=_items(nonempty))
    # backends CI runs there; None: every supported backend
    run_backends: tuple[str, ...] | None = setting(None, check=_items(nonempty))


@dataclass(frozen=True)
class Device:
    """`[device]` of hardware/<name>/device.toml; `builds` and `ci` come from its other tables."""

    name: str
    manifest: Path
    description: str = ""
    aliases: tuple[str, ...] = setting((), check=_items(_matching(_DEVICE_NAME, "a lower-case device name")))
    backends: tuple[str, ...] = setting((), check=_items(nonempty))
    runtime_requires: tuple[str, ...] = setting((), check=_items(_requirement))
    builds: tuple[tuple[str, BackendBuild], ...] = ()
    vendor: str = ""
    # "cuda", "npu", "mlu", "musa", "cpu", ...
    torch_device: str | None = setting(None, check=_matching(_IDENT, "a torch device type (e.g. cuda, npu, cpu)"))
    # the module that registers torch.<torch_device>: torch_npu, torch_mlu, ...
    torch_extension: str | None = setting(None, check=_matching(_IDENT, "a Python module name (e.g. torch_npu)"))
    # the torch.distributed backend: nccl, hccl, cncl, bkcl, mccl, gloo, ...
    collective: str | None = setting(
        None, check=_matching(_IDENT, "a torch.distributed backend name (e.g. nccl, hccl, gloo)")
    )
    # CUDA_VISIBLE_DEVICES, ASCEND_RT_VISIBLE_DEVICES, ...
    visible_devices_env: str | None = setting(None, check=_matching(_ENV_NAME, "an environment variable name"))
    ci: CISettings = field(default_factory=CISettings)

    def build_for(self, backend: str) -> BackendBuild:
        return dict(self.builds).get(backend, BackendBuild())

    def runtime_requires_for(self, backend: str) -> tuple[str, ...]:
        """What an environment running `backend` on this device needs beside the backend wheel."""
        plugin = self.build_for(backend).platform_plugin
        return self.runtime_requires + ((plugin,) if plugin else ())

    @property
    def run_backends(self) -> tuple[str, ...]:
        """Backends CI runs on the device's runners (none if it names no runner)."""
        if not self.ci.runs_on:
            return ()
        return self.backends if self.ci.run_backends is None else self.ci.run_backends

    @property
    def runs_anywhere(self) -> bool:
        """The device is the host CPU: any plain machine has it."""
        return self.torch_device == "cpu"


# -------------------------------------------------------------------------------------- loading
def load_devices(project: Project) -> dict[str, Device]:
    devices = {name: load_device(project, project.root / "hardware" / name / "device.toml") for name in project.devices}
    owner: dict[str, str] = {}
    for dev in devices.values():
        for alias in dev.aliases:
            if alias in devices:
                raise ConfigError(f"{dev.manifest}: device.aliases: {alias!r} is the name of another device")
            if alias in owner:
                raise ConfigError(
                    f"{dev.manifest}: device.aliases: {alias!r} is also an alias of {owner[alias]} "
                    f"({devices[owner[alias]].manifest})"
                )
            owner[alias] = dev.name
    return devices


def load_device(project: Project, path: Path) -> Device:
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    for key in raw:
        if key not in _TABLES:
            raise ConfigError(
                f"{path}: {key}: unknown table{nearest(key, _TABLES)}; valid tables: device, build.<backend>, ci"
            )
    table = raw.get("device")
    if not isinstance(table, dict):
        raise ConfigError(f"{path}: needs a device table")
    # builds and ci are tables of their own, read below once the backends are known
    device = convert(
        Device,
        table,
        f"{path}: device",
        unknown=UNKNOWN_FIELD,
        given={"manifest": path, "builds": (), "ci": CISettings()},
    )
    name = device.name
    if name != path.parent.name:
        raise ConfigError(f"{path}: device.name must be {path.parent.name!r} (the folder name), not {name!r}")
    if not _DEVICE_NAME.fullmatch(name):
        raise ConfigError(f"{path}: device.name {name!r}: use lower-case letters, digits, '-' and '_'")
    if name in device.aliases:
        raise ConfigError(f"{path}: device.aliases: {name!r} is the device's own name")
    backends: list[str] = []
    for backend in device.backends:
        try:
            backends.append(project.pins.resolve(backend).backend)
        except ConfigError as exc:
            raise ConfigError(f"{path}: device.backends: {exc}") from None
        if backends[-1] in backends[:-1]:
            raise ConfigError(f"{path}: device.backends: {backend!r} names {backends[-1]}, which is listed twice")
    builds = _builds(project, path, raw.get("build", {}), backends)
    ci = _ci(project, path, raw.get("ci", {}), backends)
    _check_series(project, path, name, backends)
    return dataclasses.replace(device, backends=tuple(backends), builds=builds, ci=ci)


def _builds(project: Project, path: Path, tables: Any, backends: list[str]) -> tuple[tuple[str, BackendBuild], ...]:
    if not isinstance(tables, dict):
        raise ConfigError(f"{path}: build must hold one build.<backend> table per backend")
    builds = []
    for backend, build in tables.items():
        where = f"build.{_quoted(backend)}"
        try:
            backend = project.pins.resolve(backend).backend
        except ConfigError as exc:
            raise ConfigError(f"{path}: {where}: {exc}") from None
        if backend not in backends:
            raise ConfigError(f"{path}: {where}: {backend} is not in device.backends")
        builds.append((backend, convert(BackendBuild, build, f"{path}: {where}", unknown=UNKNOWN_FIELD)))
    return tuple(builds)


def _ci(project: Project, path: Path, table: Any, backends: list[str]) -> CISettings:
    ci = convert(CISettings, table, f"{path}: ci", unknown=UNKNOWN_FIELD)
    run = ci.run_backends
    if run is not None:
        resolved = []
        for backend in run:
            try:
                resolved.append(project.pins.resolve(backend).backend)
            except ConfigError as exc:
                raise ConfigError(f"{path}: ci.run_backends: {exc}") from None
            if resolved[-1] not in backends:
                raise ConfigError(f"{path}: ci.run_backends: {resolved[-1]} is not in device.backends")
        run = tuple(resolved)
        if run and not ci.runs_on:
            raise ConfigError(f"{path}: ci.run_backends: needs ci.runs_on (the runners that have the chip)")
    return dataclasses.replace(ci, run_backends=run)


def _check_series(project: Project, path: Path, name: str, backends: list[str]) -> None:
    """The device's series folders: one per supported backend, each listing files that exist."""
    from flagscale.patches.series import read_series

    patches = path.parent / "patches"
    if patches.is_dir():
        for folder in sorted(p for p in patches.iterdir() if p.is_dir()):
            try:
                backend = project.pins.resolve(folder.name).backend
            except ConfigError:
                raise ConfigError(
                    f"{folder}: not a backend{nearest(folder.name, project.pins.names)}; "
                    f"series folders are named after backends: {', '.join(project.pins.names)}"
                ) from None
            if backend != folder.name:
                raise ConfigError(f"{folder}: name the folder {backend!r} (the backend), not the alias {folder.name!r}")
            if backend not in backends and any(folder.iterdir()):
                raise ConfigError(
                    f"{path}: device.backends: does not list {backend}, but {folder} holds "
                    f"patches for it; add {backend!r} to backends or remove the folder"
                )
    for backend in backends:
        try:
            read_series(project.device_series_dir(name, backend), f"device:{name}")
        except FlagScaleError as exc:
            raise ConfigError(f"{path}: device.backends: {backend}: {exc}") from None


def _quoted(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else f'"{key}"'


def resolve_device(project: Project, name: str) -> Device:
    devices = load_devices(project)
    wanted = name.strip().lower()
    for device in devices.values():
        if wanted == device.name or wanted in device.aliases:
            return device
    raise ConfigError(f"unknown device {name!r}; valid devices: {', '.join(devices)}{nearest(name, list(devices))}")
