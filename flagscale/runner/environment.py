"""The device environment of a job: which device it runs on and the variables that device sets.

`flagscale train` and `flagscale serve` both name a device (`experiment.runner.device`, or none: the
device the installed flagscale was built for, else cpu) and may restrict the visible devices
(`experiment.runner.visible_devices`); the device's manifest (flagscale/hardware/<device>/device.toml)
says which variables carry that.
"""

from __future__ import annotations

from flagscale.errors import ConfigError, FlagScaleError
from flagscale.hardware.registry import Device, resolve_device
from flagscale.upstream.project import Project
from flagscale.wheels.provenance import installed_device

__all__ = ["device_environment", "device_name", "installed_device", "job_device", "visible_devices_environment"]

DEFAULT_DEVICE = "cpu"


def device_name(device: str | None) -> str:
    """The device a job runs on: the one named, else the installed one, else cpu."""
    return device or installed_device() or DEFAULT_DEVICE


def job_device(device: str | None) -> Device:
    """The manifest of the job's device (see `device_name`)."""
    name = device_name(device)
    try:
        return resolve_device(Project.find(), name)
    except FlagScaleError as exc:
        raise ConfigError(f"experiment.runner.device={name}: {exc}") from None


def device_environment(device: str | None, visible_devices: str | None = None) -> dict[str, str]:
    """Everything the device sets for a training job: device type, collective backend, visible devices."""
    resolved = job_device(device)
    env: dict[str, str] = {}
    if resolved.torch_device:  # read by the patched megatron-core (megatron/core/device_utils.py)
        env["MEGATRON_DEVICE_TYPE"] = resolved.torch_device
    if resolved.collective:
        env["MEGATRON_COLLECTIVE_BACKEND"] = resolved.collective
    return {**env, **_visible(resolved, visible_devices)}


def visible_devices_environment(device: str | None, visible_devices: str | None) -> dict[str, str]:
    """Only the visible-devices variable, for engine servers (they read no MEGATRON_* variables).

    Nothing is resolved when `visible_devices` is unset: the device then changes nothing for them.
    """
    if visible_devices is None:
        return {}
    return _visible(job_device(device), visible_devices)


def _visible(device: Device, visible_devices: str | None) -> dict[str, str]:
    if visible_devices is None:
        return {}
    if not device.visible_devices_env:
        raise ConfigError(
            f"experiment.runner.visible_devices is set but device {device.name} has no "
            "visible-devices variable (device.visible_devices_env in its manifest)"
        )
    return {device.visible_devices_env: visible_devices}
