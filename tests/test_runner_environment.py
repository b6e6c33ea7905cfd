"""The device environment of a job, from this checkout's device manifests (hardware/<device>/device.toml)."""

from __future__ import annotations

from importlib import metadata

import pytest
from conftest import REPO_ROOT

from flagscale.errors import ConfigError
from flagscale.runner.environment import device_environment, device_name, installed_device, visible_devices_environment
from flagscale.wheels.provenance import PROVENANCE_FILE


@pytest.fixture(autouse=True)
def in_checkout(monkeypatch):
    monkeypatch.chdir(REPO_ROOT)  # the device registry is the checkout's hardware/ folder
    monkeypatch.delenv("FLAGSCALE_ROOT", raising=False)


def _flagscale_dist(site, version: str, provenance: str | None) -> None:
    """An installed `flagscale` distribution (just its .dist-info) in `site`, ahead of the real one."""
    info = site / f"flagscale-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: flagscale\nVersion: {version}\n")
    if provenance is not None:
        (info / PROVENANCE_FILE).write_text(provenance)


@pytest.mark.parametrize(
    "version, provenance, expected",
    [
        ("0.1.0+cpu", '{"device": "cuda"}', "cuda"),  # the provenance file wins over the label
        ("0.1.0+ascend", '{"device": null}', "ascend"),
        ("0.1.0+musa.1", None, "musa"),
        ("0.1.0", '{"device": null}', None),
        ("0.1.0", "not json", None),
    ],
)
def test_installed_device_reads_the_provenance_file_then_the_version_label(
    tmp_path, monkeypatch, version, provenance, expected
):
    _flagscale_dist(tmp_path, version, provenance)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert metadata.version("flagscale") == version
    assert installed_device() == expected


def test_a_job_without_a_device_runs_on_the_installed_one_else_cpu(tmp_path, monkeypatch):
    assert device_name("ascend") == "ascend"
    assert device_name(None) == (installed_device() or "cpu")
    _flagscale_dist(tmp_path, "0.1.0+cuda", None)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert device_name(None) == "cuda"
    assert visible_devices_environment(None, "2") == {"CUDA_VISIBLE_DEVICES": "2"}


def test_training_gets_device_type_collective_and_visible_devices():
    assert device_environment("cpu") == {"MEGATRON_DEVICE_TYPE": "cpu", "MEGATRON_COLLECTIVE_BACKEND": "gloo"}
    assert device_environment("cuda", "0,1") == {
        "MEGATRON_DEVICE_TYPE": "cuda",
        "MEGATRON_COLLECTIVE_BACKEND": "nccl",
        "CUDA_VISIBLE_DEVICES": "0,1",
    }
    assert device_environment("ascend", "3")["ASCEND_RT_VISIBLE_DEVICES"] == "3"


def test_engine_servers_get_only_the_visible_devices_variable():
    assert visible_devices_environment("cuda", "0,1") == {"CUDA_VISIBLE_DEVICES": "0,1"}
    assert visible_devices_environment("no-such-device", None) == {}  # nothing to resolve: nothing asked


def test_visible_devices_on_a_device_without_the_variable_is_refused():
    for build in (device_environment, visible_devices_environment):
        with pytest.raises(
            ConfigError, match="experiment.runner.visible_devices is set but device cpu has no visible-devices variable"
        ):
            build("cpu", "0")


def test_an_unknown_device_names_the_setting_and_the_nearest_device():
    with pytest.raises(ConfigError, match=r"experiment.runner.device=cudaa: unknown device 'cudaa'.*cuda"):
        device_environment("cudaa")
