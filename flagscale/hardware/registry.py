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

import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from flagscale.errors import ConfigError, FlagScaleError
from flagscale.upstream.project import Project
from flagscale.upstream.pins import nearest

# A plain runner: what CI uses for cells whose build needs no vendor toolchain, and for patch checks.
PLAIN_RUNNER = ("ubuntu-latest",)

_IDENT = re.compile(r"[a-z][a-z0-9_]*")  # torch device types, collective backend names, module names
_ENV_NAME = re.compile(r"[A-Z_][A-Z0-9_]*")
_DEVICE_NAME = re.compile(r"[a-z][a-z0-9_-]*")


# --------------------------------------------------------------------------------- typed settings
@dataclass(frozen=True)
class BackendBuild:
    """How a device builds one backend's wheel (`[build.<backend>]` in device.toml)."""

    env: tuple[tuple[str, str], ...] = ()  # e.g. VLLM_TARGET_DEVICE=empty
    cmake_args: tuple[str, ...] = ()  # passed as CMAKE_ARGS (llama.cpp)
    drop_build_requires: tuple[str, ...] = ()  # e.g. torch: never pull another torch into a build
    config_settings: tuple[tuple[str, str], ...] = ()  # the upstream backend's own -C settings
    platform_plugin: str | None = None  # a requirement installed beside the wheel, e.g. vllm-ascend
    toolchain: str | None = None  # vendor SDK the build compiles with (CUDA, CANN, ...); None: any machine

    def environ(self) -> dict[str, str]:
        env = dict(self.env)
        if self.cmake_args:
            env["CMAKE_ARGS"] = " ".join(self.cmake_args)
        return env


@dataclass(frozen=True)
class CISettings:
    """`[ci]`: where the device's cells run in CI."""

    runs_on: tuple[str, ...] = ()  # runner labels of machines with the chip; empty: CI has none
    run_backends: tuple[str, ...] | None = None  # backends CI runs there; None: every supported backend


@dataclass(frozen=True)
class Device:
    name: str
    description: str
    aliases: tuple[str, ...]
    backends: tuple[str, ...]
    manifest: Path
    runtime_requires: tuple[str, ...] = ()
    builds: tuple[tuple[str, BackendBuild], ...] = ()
    vendor: str = ""
    torch_device: str | None = None  # "cuda", "npu", "mlu", "musa", "cpu", ...
    torch_extension: str | None = None  # module that registers torch.<torch_device>: torch_npu, torch_mlu, ...
    collective: str | None = None  # torch.distributed backend: nccl, hccl, cncl, bkcl, mccl, gloo, ...
    visible_devices_env: str | None = None  # CUDA_VISIBLE_DEVICES, ASCEND_RT_VISIBLE_DEVICES, ...
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


# ------------------------------------------------------------------------------------- the schema
class _Invalid(Exception):
    """A value of the wrong type or form; the caller adds the file and field."""


def _string(value: Any) -> str:
    if not isinstance(value, str):
        raise _Invalid(f"expected a string, got {type(value).__name__} {value!r}")
    return value


def _nonempty(value: Any) -> str:
    if not _string(value).strip():
        raise _Invalid("must not be empty")
    return value


def _matching(pattern: re.Pattern, what: str) -> Callable[[Any], str]:
    def check(value: Any) -> str:
        if not pattern.fullmatch(_string(value)):
            raise _Invalid(f"{value!r} is not {what}")
        return value
    return check


def _string_list(item: Callable[[Any], str] = _string) -> Callable[[Any], tuple[str, ...]]:
    def check(value: Any) -> tuple[str, ...]:
        if not isinstance(value, list):
            raise _Invalid(f"expected a list of strings, got {type(value).__name__} {value!r}")
        out = []
        for index, element in enumerate(value):
            try:
                out.append(item(element))
            except _Invalid as exc:
                raise _Invalid(f"item {index}: {exc}") from None
            if out[-1] in out[:-1]:
                raise _Invalid(f"item {index}: {element!r} is listed twice")
        return tuple(out)
    return check


def _string_table(value: Any) -> tuple[tuple[str, str], ...]:
    if not isinstance(value, dict):
        raise _Invalid(f"expected a table of strings, got {type(value).__name__} {value!r}")
    for key, item in value.items():
        if not isinstance(item, str):
            raise _Invalid(f"{key}: expected a string, got {type(item).__name__} {item!r}")
    return tuple(sorted(value.items()))


def _env_table(value: Any) -> tuple[tuple[str, str], ...]:
    table = _string_table(value)
    for key, _ in table:
        if not _ENV_NAME.fullmatch(key):
            raise _Invalid(f"{key!r} is not an environment variable name")
    return table


def _requirement(value: Any) -> str:
    from packaging.requirements import InvalidRequirement, Requirement

    try:
        Requirement(_string(value))
    except InvalidRequirement as exc:
        raise _Invalid(f"{value!r} is not a pip requirement: {exc}") from None
    return value


def _cmake_arg(value: Any) -> str:
    if not _string(value).startswith("-"):
        raise _Invalid(f"{value!r} is not a CMake argument (e.g. -DGGML_CUDA=ON)")
    return value


_DEVICE_FIELDS: dict[str, Callable[[Any], Any]] = {
    "name": _string,
    "description": _string,
    "vendor": _string,
    "aliases": _string_list(_matching(_DEVICE_NAME, "a lower-case device name")),
    "backends": _string_list(_nonempty),
    "torch_device": _matching(_IDENT, "a torch device type (e.g. cuda, npu, cpu)"),
    "torch_extension": _matching(_IDENT, "a Python module name (e.g. torch_npu)"),
    "collective": _matching(_IDENT, "a torch.distributed backend name (e.g. nccl, hccl, gloo)"),
    "visible_devices_env": _matching(_ENV_NAME, "an environment variable name"),
    "runtime_requires": _string_list(_requirement),
}
_BUILD_FIELDS: dict[str, Callable[[Any], Any]] = {
    "env": _env_table,
    "cmake_args": _string_list(_cmake_arg),
    "drop_build_requires": _string_list(_requirement),
    "config_settings": _string_table,
    "platform_plugin": _requirement,
    "toolchain": _nonempty,
}
_CI_FIELDS: dict[str, Callable[[Any], Any]] = {
    "runs_on": _string_list(_nonempty),
    "run_backends": _string_list(_nonempty),
}
_TABLES = ("device", "build", "ci")


def _fields(path: Path, where: str, table: dict, spec: dict[str, Callable[[Any], Any]]) -> dict[str, Any]:
    """Each field of `table` checked against `spec`; unknown fields and bad values name file and field."""
    out = {}
    for key, value in table.items():
        if key not in spec:
            raise ConfigError(f"{path}: {where}.{key}: unknown field{nearest(key, sorted(spec))}; "
                              f"valid fields: {', '.join(sorted(spec))}")
        try:
            out[key] = spec[key](value)
        except _Invalid as exc:
            raise ConfigError(f"{path}: {where}.{key}: {exc}") from None
    return out


# -------------------------------------------------------------------------------------- loading
def load_devices(project: Project) -> dict[str, Device]:
    devices = {name: load_device(project, project.root / "hardware" / name / "device.toml") for name in project.devices}
    owner: dict[str, str] = {}
    for dev in devices.values():
        for alias in dev.aliases:
            if alias in devices:
                raise ConfigError(f"{dev.manifest}: device.aliases: {alias!r} is the name of another device")
            if alias in owner:
                raise ConfigError(f"{dev.manifest}: device.aliases: {alias!r} is also an alias of {owner[alias]} "
                                  f"({devices[owner[alias]].manifest})")
            owner[alias] = dev.name
    return devices


def load_device(project: Project, path: Path) -> Device:
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    for key in raw:
        if key not in _TABLES:
            raise ConfigError(f"{path}: {key}: unknown table{nearest(key, list(_TABLES))}; "
                              "valid tables: device, build.<backend>, ci")
    table = raw.get("device")
    if not isinstance(table, dict):
        raise ConfigError(f"{path}: needs a device table")
    fields = _fields(path, "device", table, _DEVICE_FIELDS)
    name = fields.get("name")
    if name != path.parent.name:
        raise ConfigError(f"{path}: device.name must be {path.parent.name!r} (the folder name), not {name!r}")
    if not _DEVICE_NAME.fullmatch(name):
        raise ConfigError(f"{path}: device.name {name!r}: use lower-case letters, digits, '-' and '_'")
    if name in fields.get("aliases", ()):
        raise ConfigError(f"{path}: device.aliases: {name!r} is the device's own name")
    backends = []
    for backend in fields.get("backends", ()):
        try:
            backends.append(project.pins.resolve(backend).backend)
        except ConfigError as exc:
            raise ConfigError(f"{path}: device.backends: {exc}") from None
        if backends[-1] in backends[:-1]:
            raise ConfigError(f"{path}: device.backends: {backend!r} names {backends[-1]}, which is listed twice")
    builds = _builds(project, path, raw.get("build", {}), backends)
    ci = _ci(project, path, raw.get("ci", {}), backends)
    _check_series(project, path, name, backends)
    return Device(name, fields.get("description", ""), fields.get("aliases", ()), tuple(backends), path,
                  fields.get("runtime_requires", ()), builds, fields.get("vendor", ""), fields.get("torch_device"),
                  fields.get("torch_extension"), fields.get("collective"), fields.get("visible_devices_env"), ci)


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
        if not isinstance(build, dict):
            raise ConfigError(f"{path}: {where}: expected a table, got {build!r}")
        fields = _fields(path, where, build, _BUILD_FIELDS)
        builds.append((backend, BackendBuild(**fields)))
    return tuple(builds)


def _ci(project: Project, path: Path, table: Any, backends: list[str]) -> CISettings:
    if not isinstance(table, dict):
        raise ConfigError(f"{path}: ci must be a table")
    fields = _fields(path, "ci", table, _CI_FIELDS)
    run = fields.get("run_backends")
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
        if run and not fields.get("runs_on"):
            raise ConfigError(f"{path}: ci.run_backends: needs ci.runs_on (the runners that have the chip)")
    return CISettings(fields.get("runs_on", ()), run)


def _check_series(project: Project, path: Path, name: str, backends: list[str]) -> None:
    """The device's series folders: one per supported backend, each listing files that exist."""
    from flagscale.patches.series import read_series

    patches = path.parent / "patches"
    if patches.is_dir():
        for folder in sorted(p for p in patches.iterdir() if p.is_dir()):
            try:
                backend = project.pins.resolve(folder.name).backend
            except ConfigError:
                raise ConfigError(f"{folder}: not a backend{nearest(folder.name, project.pins.names)}; "
                                  f"series folders are named after backends: {', '.join(project.pins.names)}") from None
            if backend != folder.name:
                raise ConfigError(f"{folder}: name the folder {backend!r} (the backend), not the alias {folder.name!r}")
            if backend not in backends and any(folder.iterdir()):
                raise ConfigError(f"{path}: device.backends: does not list {backend}, but {folder} holds "
                                  f"patches for it; add {backend!r} to backends or remove the folder")
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
