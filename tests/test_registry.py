"""The hardware registry: the manifest schema (strict, typed), the real devices, and the vendor series
on top of the Megatron device accessor (they apply, compile, and select the manifest's device)."""

from __future__ import annotations

import ast
import py_compile
import shutil
import textwrap
from pathlib import Path

import pytest
from conftest import REPO_ROOT, copy_project

from flagscale.errors import ConfigError
from flagscale.hardware.registry import BackendBuild, load_devices, resolve_device
from flagscale.patches.series import read_series, series_for
from flagscale.upstream.project import Project
from flagscale.upstream.target import Target

ALL_DEVICES = ["ascend", "cambricon", "cpu", "cuda", "hygon", "iluvatar", "kunlunxin", "metax", "musa"]


def write_manifest(project: Project, name: str, text: str) -> Path:
    path = project.root / "hardware" / name / "device.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


# ----------------------------------------------------------------------------- the real registry
def test_registry_has_every_chip_with_typed_settings():
    devices = load_devices(Project(REPO_ROOT))
    assert sorted(devices) == ALL_DEVICES
    for dev in devices.values():
        assert dev.torch_device and dev.collective and dev.backends and dev.description, dev.name
        assert dev.ci.runs_on, f"{dev.name}: no CI runner labels"
        assert set(dev.run_backends) <= set(dev.backends)
        assert dev.visible_devices_env or dev.torch_device == "cpu", dev.name
    assert devices["cpu"].runs_anywhere and not devices["ascend"].runs_anywhere
    assert (
        devices["ascend"].torch_device,
        devices["ascend"].torch_extension,
        devices["ascend"].collective,
        devices["ascend"].visible_devices_env,
    ) == ("npu", "torch_npu", "hccl", "ASCEND_RT_VISIBLE_DEVICES")
    assert (devices["cambricon"].torch_extension, devices["cambricon"].collective) == ("torch_mlu", "cncl")
    assert devices["kunlunxin"].collective == "bkcl"
    assert (devices["musa"].torch_extension, devices["musa"].collective) == ("torch_musa", "mccl")
    assert devices["cpu"].collective == "gloo" and devices["cuda"].collective == "nccl"


def test_build_settings_per_backend_and_backward_compatible_fields():
    project = Project(REPO_ROOT)
    flags = {
        name: resolve_device(project, name).build_for("llama.cpp").cmake_args
        for name in ("cuda", "ascend", "musa", "hygon")
    }
    assert "-DGGML_CUDA=ON" in flags["cuda"] and "-DGGML_CANN=ON" in flags["ascend"]
    assert "-DGGML_MUSA=ON" in flags["musa"] and "-DGGML_HIP=ON" in flags["hygon"]
    ascend = resolve_device(project, "npu")  # alias
    assert ascend.build_for("vllm").platform_plugin == "vllm-ascend"
    assert ascend.build_for("vllm").environ() == {"VLLM_TARGET_DEVICE": "empty"}
    assert ascend.runtime_requires_for("vllm") == ("torch-npu", "vllm-ascend")
    assert ascend.runtime_requires_for("megatron") == ("torch-npu",)
    assert resolve_device(project, "gpu").build_for("vllm").environ() == {"VLLM_TARGET_DEVICE": "cuda"}
    cpu = resolve_device(project, "cpu")
    assert cpu.build_for("vllm").drop_build_requires == ("torch",)
    assert cpu.build_for("megatron") == BackendBuild()  # no table: defaults
    assert cpu.run_backends == ("megatron", "llama.cpp")


def test_devices_cli_lists_and_shows(tmp_path):
    from typer.testing import CliRunner

    from flagscale.cli import app

    result = CliRunner().invoke(app, ["devices", "--root", str(REPO_ROOT)])
    assert result.exit_code == 0, result.output
    for name in ALL_DEVICES:
        assert name in result.output
    shown = CliRunner().invoke(app, ["devices", "mlu", "--root", str(REPO_ROOT)])
    assert shown.exit_code == 0 and shown.output.startswith("cambricon:")
    shown = CliRunner().invoke(app, ["devices", "show", "npu", "--root", str(REPO_ROOT)])
    assert shown.exit_code == 0, shown.output
    lines = shown.output.splitlines()
    assert lines[0].startswith("ascend:")
    for expected in (
        "torch device: npu (extension module: torch_npu)",
        "collective backend: hccl",
        "visible devices variable: ASCEND_RT_VISIBLE_DEVICES",
        "runtime requires: torch-npu",
    ):
        assert expected in lines
    assert any(
        line.startswith("build vllm: VLLM_TARGET_DEVICE=empty;") and "platform plugin: vllm-ascend" in line
        for line in lines
    )
    assert any(line.startswith("build llama.cpp: CMAKE_ARGS=-DGGML_CANN=ON") for line in lines)
    assert CliRunner().invoke(app, ["devices", "show", "--root", str(REPO_ROOT)]).exit_code != 0
    assert CliRunner().invoke(app, ["devices", "show", "tpu", "--root", str(REPO_ROOT)]).exit_code == 2


# ------------------------------------------------------------------------------------ bad input
def test_unknown_field_names_file_field_and_nearest(tmp_path):
    project = copy_project(tmp_path / "p")
    path = write_manifest(
        project,
        "toy",
        """\
        [device]
        name = "toy"
        backends = ["megatron"]
        colective = "gloo"
        """,
    )
    with pytest.raises(ConfigError) as exc:
        load_devices(project)
    message = str(exc.value)
    assert str(path) in message and "device.colective: unknown field" in message
    assert "did you mean 'collective'" in message


@pytest.mark.parametrize(
    "text, field, words",
    [
        ('[build.vllm]\nplatform_plugins = "x"\n', "build.vllm.platform_plugins", "did you mean 'platform_plugin'"),
        ('[ci]\nrun_on = ["x"]\n', "ci.run_on", "did you mean 'runs_on'"),
        ('[cii]\nruns_on = ["x"]\n', "cii: unknown table", "did you mean 'ci'"),
        ("[device.extra]\n", "device.extra", "unknown field"),
    ],
)
def test_unknown_field_in_every_table(tmp_path, text, field, words):
    project = copy_project(tmp_path / "p")
    path = write_manifest(project, "toy", '[device]\nname = "toy"\nbackends = ["vllm"]\n' + text)
    with pytest.raises(ConfigError) as exc:
        load_devices(project)
    assert str(path) in str(exc.value) and field in str(exc.value) and words in str(exc.value)


@pytest.mark.parametrize(
    "line, field, words",
    [
        ("torch_device = 3", "device.torch_device", "expected a string"),
        ('torch_device = "N P U"', "device.torch_device", "is not a torch device type"),
        ('visible_devices_env = "lower_case"', "device.visible_devices_env", "environment variable"),
        ('runtime_requires = ["torch-npu >>> 1"]', "device.runtime_requires", "not a pip requirement"),
        ('backends = "megatron"', "device.backends", "expected a list of strings"),
        ('backends = ["megatron", "mcore"]', "device.backends", "listed twice"),  # an alias of the same backend
        ('aliases = ["cpu"]', "device.aliases", "name of another device"),
        ('aliases = ["gpu"]', "device.aliases", "also an alias of cuda"),
    ],
)
def test_bad_values_name_file_and_field(tmp_path, line, field, words):
    project = copy_project(tmp_path / "p")
    body = (
        '[device]\nname = "toy"\n' + ("" if line.startswith("backends") else 'backends = ["megatron"]\n') + line + "\n"
    )
    path = write_manifest(project, "toy", body)
    with pytest.raises(ConfigError) as exc:
        load_devices(project)
    assert field in str(exc.value) and words in str(exc.value)
    assert str(path) in str(exc.value)


def test_backend_with_no_pin_names_file_and_field(tmp_path):
    project = copy_project(tmp_path / "p")
    path = write_manifest(project, "toy", '[device]\nname = "toy"\nbackends = ["megatron", "tensorrt"]\n')
    with pytest.raises(ConfigError) as exc:
        resolve_device(project, "toy")
    message = str(exc.value)
    assert str(path) in message and "device.backends" in message and "unknown backend 'tensorrt'" in message
    assert "valid backends: megatron, vllm, sglang, llama.cpp" in message


def test_build_table_for_unlisted_backend_and_bad_cmake_args(tmp_path):
    project = copy_project(tmp_path / "p")
    path = write_manifest(
        project,
        "toy",
        '[device]\nname = "toy"\nbackends = ["megatron"]\n[build."llama.cpp"]\ncmake_args = ["-DGGML_CUDA=ON"]\n',
    )
    with pytest.raises(ConfigError, match=r'build\."llama.cpp": llama.cpp is not in device.backends'):
        load_devices(project)
    path.write_text(
        '[device]\nname = "toy"\nbackends = ["llama.cpp"]\n[build."llama.cpp"]\ncmake_args = ["GGML_CUDA=ON"]\n'
    )
    with pytest.raises(ConfigError, match=r'build\."llama.cpp"\.cmake_args: item 0: .* is not a CMake argument'):
        load_devices(project)


def test_ci_run_backends_must_be_supported_and_need_runners(tmp_path):
    project = copy_project(tmp_path / "p")
    path = write_manifest(
        project,
        "toy",
        '[device]\nname = "toy"\nbackends = ["megatron"]\n[ci]\nruns_on = ["x"]\nrun_backends = ["vllm"]\n',
    )
    with pytest.raises(ConfigError, match=r"ci\.run_backends: vllm is not in device\.backends"):
        load_devices(project)
    path.write_text('[device]\nname = "toy"\nbackends = ["megatron"]\n[ci]\nrun_backends = ["megatron"]\n')
    with pytest.raises(ConfigError, match=r"ci\.run_backends: needs ci\.runs_on"):
        load_devices(project)


def test_series_naming_a_missing_file_names_manifest_series_and_line(tmp_path):
    project = copy_project(tmp_path / "p")
    series = project.device_series_dir("musa", "megatron") / "series"
    series.write_text(series.read_text() + "0002-not-written-yet.patch\n")
    with pytest.raises(ConfigError) as exc:
        load_devices(project)
    message = str(exc.value)
    assert str(project.root / "hardware/musa/device.toml") in message and "device.backends: megatron" in message
    assert f"{series}:3: lists '0002-not-written-yet.patch', which does not exist" in message


def test_device_patches_for_a_backend_it_does_not_list(tmp_path):
    project = copy_project(tmp_path / "p")
    folder = project.device_series_dir("cambricon", "sglang")
    shutil.copytree(project.device_series_dir("cambricon", "megatron"), folder)
    with pytest.raises(ConfigError, match=r"cambricon/device.toml: device\.backends: does not list sglang"):
        load_devices(project)
    shutil.rmtree(folder)
    shutil.copytree(project.device_series_dir("cambricon", "megatron"), folder.with_name("megatorn"))
    with pytest.raises(ConfigError, match=r"megatorn: not a backend \(did you mean 'megatron'\?\)"):
        load_devices(project)


def test_bad_manifest_fails_the_cli_with_one_clear_line(tmp_path):
    from typer.testing import CliRunner

    from flagscale.cli import app

    project = copy_project(tmp_path / "p")
    write_manifest(project, "toy", '[device]\nname = "toy"\nbackends = ["megatron"]\nrunsOn = 1\n')
    result = CliRunner().invoke(app, ["devices", "--root", str(project.root)])
    assert result.exit_code == 2
    assert "toy/device.toml: device.runsOn: unknown field" in result.output.replace("\n", "")


# ------------------------------------------------------------------- vendor series on Megatron
VENDOR_SERIES = ["ascend", "cambricon", "kunlunxin", "musa"]


def test_vendor_series_exist_and_say_why_and_upstream_status():
    from flagscale.patches.series import lint_folder

    project = Project(REPO_ROOT)
    for device in VENDOR_SERIES:
        folder = project.device_series_dir(device, "megatron")
        series = read_series(folder, device)
        assert series.names, f"{device}: no megatron patches"
        assert lint_folder(folder) == []
        for patch in series.load():
            assert patch.body.strip() and patch.trailer("Upstream-Status") and patch.trailer("Drop-When")


def _device_utils(tree: Path) -> ast.Module:
    return ast.parse((tree / "megatron/core/device_utils.py").read_text(encoding="utf-8"))


def _function(module: ast.Module, name: str) -> ast.FunctionDef:
    return next(n for n in module.body if isinstance(n, ast.FunctionDef) and n.name == name)


def _imports(node: ast.AST) -> set[str]:
    return {alias.name for n in ast.walk(node) if isinstance(n, ast.Import) for alias in n.names}


def _collectives(module: ast.Module) -> dict[str, str]:
    for node in module.body:
        target = node.targets[0] if isinstance(node, ast.Assign) else getattr(node, "target", None)
        if isinstance(target, ast.Name) and target.id == "_COLLECTIVE_BACKENDS":
            return ast.literal_eval(node.value)
    raise AssertionError("device_utils has no _COLLECTIVE_BACKENDS table")


@pytest.mark.integration
@pytest.mark.parametrize("device", ALL_DEVICES)
def test_patched_megatron_compiles_and_selects_the_manifest_device(real_cache, device, tmp_path):
    """For every device that supports Megatron: its series applies to the real pin, every patched Python
    file compiles, and the patched accessor maps the manifest's torch device to the manifest's collective
    and, where the manifest names an extension module, imports it and prefers that device (read from the
    code itself: no chip is faked)."""
    from flagscale.patches.tree import patched_tree

    project = Project(REPO_ROOT)
    dev = resolve_device(project, device)
    if "megatron" not in dev.backends:
        pytest.skip(f"{device} does not support megatron")
    tree = patched_tree(Target.of(project, "megatron", device, "sdist", real_cache))
    assert len(tree.patches) == sum(len(s.names) for s in series_for(project, "megatron", device))
    for path in sorted(tree.path.rglob("*.py")):
        py_compile.compile(str(path), cfile=str(tmp_path / "x.pyc"), doraise=True)
    module = _device_utils(tree.path)
    assert _collectives(module).get(dev.torch_device) == dev.collective
    if dev.torch_extension:
        select = _function(module, "get_device_type")
        assert dev.torch_extension in _imports(select)
        assert dev.torch_device in {n.value for n in ast.walk(select) if isinstance(n, ast.Constant)}
        assert dev.torch_extension in _imports(_function(module, "get_device_module"))
    # The plain tree (no device) keeps CUDA's own collective: the vendor change is confined to its build.
    if dev.torch_device == "cuda" and dev.collective != "nccl":
        plain = patched_tree(Target.of(project, "megatron", None, "sdist", real_cache))
        assert _collectives(_device_utils(plain.path))["cuda"] == "nccl"


@pytest.mark.integration
def test_every_vendor_cell_applies(real_cache):
    from flagscale.patches.workflow import check

    results = check(Project(REPO_ROOT), source="sdist", cache=real_cache)
    cells = {(r.backend, r.device) for r in results}
    for dev in load_devices(Project(REPO_ROOT)).values():
        assert {(b, dev.name) for b in dev.backends} <= cells
    assert all(r.status != "FAIL" for r in results), [r for r in results if r.status == "FAIL"]
