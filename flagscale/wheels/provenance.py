"""`flagscale_build.json`: the provenance every wheel FlagScale builds carries in its dist-info.

A backend wheel records what it was built from (pin, patches, device, build settings); the flagscale
device wheel records its selection and each backend wheel it pins. Written here and read here: callers
see dataclasses, never the JSON keys.
"""

from __future__ import annotations

import importlib.metadata as md
import json
from dataclasses import dataclass, field
from typing import Any

from flagscale import __version__
from flagscale.patches.tree import AppliedPatch
from flagscale.upstream.pins import Pin

PROVENANCE_FILE = "flagscale_build.json"
TOOLCHAIN = {"name": "flagscale", "version": __version__}


def upstream_record(pin: Pin, source_kind: str) -> dict[str, Any]:
    """The pin a wheel was built from, as recorded (for people and audits; nothing reads it back)."""
    return {
        "name": pin.name,
        "git": pin.git,
        "tag": pin.tag,
        "commit": pin.commit,
        "sdist": {"name": pin.sdist.name, "version": pin.sdist.version, "sha256": pin.sdist.sha256},
        "source": source_kind,
    }


@dataclass(frozen=True)
class BackendProvenance:
    """A backend wheel's provenance: `megatron_core-0.16.1+fs.cpu.<key8>` and what made it."""

    backend: str
    device: str | None
    key: str  # the build cache key over every input
    patches: tuple[AppliedPatch, ...] = ()
    upstream: dict[str, Any] = field(default_factory=dict)
    build: dict[str, Any] = field(default_factory=dict)  # env, config_settings, python, source_date_epoch
    toolchain: dict[str, str] = field(default_factory=lambda: dict(TOOLCHAIN))

    def to_json(self) -> dict[str, Any]:
        return {
            "toolchain": self.toolchain,
            "backend": self.backend,
            "device": self.device,
            "upstream": self.upstream,
            "patches": [vars(p) for p in self.patches],
            "build": self.build,
            "key": self.key,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> BackendProvenance:
        return cls(
            data["backend"],
            data.get("device"),
            data.get("key", ""),
            tuple(AppliedPatch(p["series"], p["name"], p["sha256"]) for p in data.get("patches", [])),
            data.get("upstream", {}),
            data.get("build", {}),
            data.get("toolchain", {}),
        )


@dataclass(frozen=True)
class PinnedBackend:
    """A backend wheel the flagscale device wheel pins, with the file it was built as."""

    provenance: BackendProvenance
    distribution: str
    version: str
    wheel: str = ""
    wheel_sha256: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            **self.provenance.to_json(),
            "distribution": self.distribution,
            "version": self.version,
            "wheel": self.wheel,
            "wheel_sha256": self.wheel_sha256,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> PinnedBackend:
        return cls(
            BackendProvenance.from_json(data),
            data["distribution"],
            data["version"],
            data.get("wheel", ""),
            data.get("wheel_sha256", ""),
        )


@dataclass(frozen=True)
class DeviceProvenance:
    """The flagscale device wheel's provenance: `flagscale-X+<device>` and the backend wheels it pins."""

    device: str | None
    backends: tuple[PinnedBackend, ...] = ()
    runtime_requires: tuple[str, ...] = ()
    upstream_source: str = "auto"
    toolchain: dict[str, str] = field(default_factory=lambda: dict(TOOLCHAIN))

    def to_json(self) -> dict[str, Any]:
        return {
            "toolchain": self.toolchain,
            "device": self.device,
            "settings": {
                "device": self.device,
                "backend": [b.provenance.backend for b in self.backends],
                "upstream-source": self.upstream_source,
            },
            "runtime_requires": list(self.runtime_requires),
            "backends": [b.to_json() for b in self.backends],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> DeviceProvenance:
        return cls(
            data.get("device"),
            tuple(PinnedBackend.from_json(b) for b in data.get("backends", [])),
            tuple(data.get("runtime_requires", [])),
            data.get("settings", {}).get("upstream-source", "auto"),
            data.get("toolchain", {}),
        )


def to_bytes(provenance: BackendProvenance | DeviceProvenance) -> bytes:
    """The file's bytes: sorted keys, so equal provenance gives byte-identical wheels."""
    return (json.dumps(provenance.to_json(), indent=2, sort_keys=True) + "\n").encode()


def _read(dist: md.Distribution) -> dict[str, Any] | None:
    """The distribution's provenance as JSON, or None when it has none (or an unreadable one)."""
    try:
        data = json.loads(dist.read_text(PROVENANCE_FILE) or "null")
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def backend_provenance(dist: md.Distribution) -> BackendProvenance | None:
    """The provenance of an installed backend wheel, or None for a distribution FlagScale did not build."""
    data = _read(dist)
    return BackendProvenance.from_json(data) if data and "backend" in data else None


def installed_device_provenance() -> tuple[str, DeviceProvenance] | None:
    """(version, provenance) of the installed flagscale distribution, or None when it is not installed."""
    try:
        dist = md.distribution("flagscale")
    except md.PackageNotFoundError:
        return None
    return dist.version, DeviceProvenance.from_json(_read(dist) or {})


def installed_device() -> str | None:
    """The device the installed flagscale wheel was built for: its provenance, else its version label."""
    found = installed_device_provenance()
    if found is None:
        return None
    version, provenance = found
    # an older build recorded the device only in its local version label (0.1.0+cpu)
    return provenance.device or version.partition("+")[2].split(".")[0] or None
