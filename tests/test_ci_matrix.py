"""`flagscale ci matrix` and the GitHub Actions workflow that consumes it; a new device is one folder."""

from __future__ import annotations

import json
import re
import shutil

import pytest
from conftest import REPO_ROOT, copy_project
from typer.testing import CliRunner

from flagscale.cli import app
from flagscale.hardware.ci_matrix import github_outputs, matrix
from flagscale.hardware.registry import load_devices
from flagscale.upstream.project import Project
from flagscale.upstream.target import Target

WORKFLOW = REPO_ROOT / ".github" / "workflows" / "flagscale.yml"
CELL_KEYS = {
    "name",
    "device",
    "backend",
    "vendor",
    "torch_device",
    "torch_extension",
    "collective",
    "visible_devices_env",
    "platform_plugin",
    "toolchain",
    "check_on",
    "build_on",
    "buildable_here",
    "runs_on",
    "run",
    "runnable_here",
    "smoke",
}


def cli(*args: str):
    result = CliRunner().invoke(app, list(args))
    return result


# ------------------------------------------------------------------------------------- the matrix
def test_matrix_has_one_cell_per_device_backend():
    project = Project(REPO_ROOT)
    cells = matrix(project)["include"]
    expected = [(d.name, b) for d in load_devices(project).values() for b in d.backends]
    assert [(c["device"], c["backend"]) for c in cells] == expected
    assert all(set(c) == CELL_KEYS for c in cells)
    by = {(c["device"], c["backend"]): c for c in cells}
    cpu = by["cpu", "megatron"]
    assert cpu["runnable_here"] and cpu["run"] and cpu["runs_on"] == ["ubuntu-latest"] and cpu["collective"] == "gloo"
    assert not by["cpu", "vllm"]["run"] and not by["cpu", "vllm"]["runnable_here"]  # built, not run
    ascend = by["ascend", "megatron"]
    assert not ascend["runnable_here"] and ascend["run"] and "ascend" in ascend["runs_on"]
    assert ascend["build_on"] == ["ubuntu-latest"]  # pure Python: builds on a plain runner
    assert by["ascend", "llama.cpp"]["build_on"] == ascend["runs_on"]  # GGML_CANN needs the CANN toolkit
    assert by["ascend", "vllm"]["platform_plugin"] == "vllm-ascend"
    assert all(c["check_on"] == ["ubuntu-latest"] for c in cells)
    assert [c["device"] for c in cells if c["runnable_here"]] == ["cpu", "cpu"]


def test_smoke_command_checks_the_manifest_device_path():
    cells = {(c["device"], c["backend"]): c for c in matrix(Project(REPO_ROOT))["include"]}
    assert '("npu", "hccl")' in cells["ascend", "megatron"]["smoke"]
    assert '("cuda", "bkcl")' in cells["kunlunxin", "megatron"]["smoke"]
    assert '("musa", "mccl")' in cells["musa", "megatron"]["smoke"]
    assert cells["cpu", "megatron"]["smoke"].startswith("python -c '")


def test_matrix_filters_and_cli_json_is_what_fromjson_reads():
    result = cli("ci", "matrix", "--root", str(REPO_ROOT), "--device", "npu", "--backend", "Megatron-LM")
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert list(data) == ["include"] and [(c["device"], c["backend"]) for c in data["include"]] == [
        ("ascend", "megatron")
    ]
    run_only = json.loads(cli("ci", "matrix", "--root", str(REPO_ROOT), "--run").output)
    assert run_only["include"] and all(c["run"] for c in run_only["include"])
    bad = cli("ci", "matrix", "--root", str(REPO_ROOT), "--format", "yaml")
    assert bad.exit_code != 0 and "use json or github" in bad.output


def test_github_format_is_github_output_lines():
    result = cli("ci", "matrix", "--root", str(REPO_ROOT), "--format", "github")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    outputs = dict(line.split("=", 1) for line in lines)
    assert list(outputs) == ["matrix", "count", "run_matrix", "run_count"]
    full, run = json.loads(outputs["matrix"]), json.loads(outputs["run_matrix"])
    assert int(outputs["count"]) == len(full["include"]) and int(outputs["run_count"]) == len(run["include"])
    assert run["include"] == [c for c in full["include"] if c["run"]]
    assert all("\n" not in value for value in outputs.values())  # one line each, as $GITHUB_OUTPUT needs


# ------------------------------------------------------------------------------------ the workflow
def _workflow() -> dict:
    yaml = pytest.importorskip("yaml")
    return yaml.safe_load(WORKFLOW.read_text(encoding="utf-8"))


def _expressions(node) -> list[str]:
    if isinstance(node, dict):
        return [e for k, v in node.items() for e in _expressions(k) + _expressions(v)]
    if isinstance(node, list):
        return [e for v in node for e in _expressions(v)]
    if isinstance(node, str):
        return re.findall(r"\$\{\{(.*?)\}\}", node, re.S)
    return []


def _job_expressions(job: dict) -> list[str]:
    out = _expressions(job)
    for key in ("if",):  # job- and step-level `if:` are expressions without ${{ }}
        if isinstance(job.get(key), str) and "${{" not in job[key]:
            out.append(job[key])
    for step in job.get("steps", []):
        if isinstance(step.get("if"), str) and "${{" not in step["if"]:
            out.append(step["if"])
    return out


def test_workflow_parses_and_has_the_jobs():
    wf = _workflow()
    triggers = wf.get("on", wf.get(True))  # YAML 1.1 reads a bare `on` key as true
    assert {"push", "pull_request"} <= set(triggers)
    jobs = wf["jobs"]
    assert {"matrix", "test", "patch-check", "build", "run"} <= set(jobs)
    commands = "\n".join(s.get("run", "") for s in jobs["matrix"]["steps"])
    assert 'flagscale ci matrix --format github >> "$GITHUB_OUTPUT"' in commands
    check = "\n".join(s.get("run", "") for s in jobs["patch-check"]["steps"])
    assert 'flagscale patch check --device "${{ matrix.device }}" --backend "${{ matrix.backend }}"' in check
    build = "\n".join(s.get("run", "") for s in jobs["build"]["steps"])
    assert "pip wheel" in build and '-C device="${{ matrix.device }}" -C backend="${{ matrix.backend }}"' in build
    assert jobs["patch-check"]["runs-on"] == "${{ matrix.check_on }}"
    assert jobs["build"]["runs-on"] == "${{ matrix.build_on }}"
    assert jobs["run"]["runs-on"] == "${{ matrix.runs_on }}"  # the vendor's runner labels
    for name in ("patch-check", "build"):
        assert jobs[name]["strategy"]["matrix"] == "${{ fromJSON(needs.matrix.outputs.matrix) }}"
    assert jobs["run"]["strategy"]["matrix"] == "${{ fromJSON(needs.matrix.outputs.run_matrix) }}"


def test_workflow_expressions_reference_outputs_and_keys_that_exist():
    wf = _workflow()
    jobs = wf["jobs"]
    step_outputs = {line.split("=", 1)[0] for line in github_outputs(Project(REPO_ROOT)).splitlines()}
    cell_keys = CELL_KEYS
    for name, job in jobs.items():
        needs = job.get("needs", [])
        needs = [needs] if isinstance(needs, str) else needs
        assert set(needs) <= set(jobs), f"{name} needs a job that does not exist"
        step_ids = {s["id"] for s in job.get("steps", []) if "id" in s}
        for expr in _job_expressions(job):
            for job_ref, output in re.findall(r"needs\.([\w-]+)\.outputs\.(\w+)", expr):
                assert job_ref in needs, f"{name}: uses needs.{job_ref} without needing it"
                assert output in jobs[job_ref].get("outputs", {}), f"{name}: {job_ref} has no output {output}"
            for step, output in re.findall(r"steps\.([\w-]+)\.outputs\.(\w+)", expr):
                assert step in step_ids, f"{name}: no step with id {step}"
                assert step == "cells" and output in step_outputs, f"{name}: `flagscale ci matrix` writes no {output}"
            for key in re.findall(r"(?<![\w.])matrix\.(\w+)", expr):
                assert "strategy" in job, f"{name}: uses matrix.{key} without a matrix"
                assert key in cell_keys, f"{name}: matrix.{key} is not a key of the cells"
            for ctx in re.findall(r"(?<![\w.])([A-Za-z_]\w*)\.", re.sub(r"'[^']*'", "''", expr)):
                assert ctx in {"needs", "steps", "matrix", "env", "github", "runner"}, f"{name}: {expr}"
    # The matrix job's outputs are the step's outputs.
    for output, expr in jobs["matrix"]["outputs"].items():
        assert expr == f"${{{{ steps.cells.outputs.{output} }}}}"


# ---------------------------------------------------------------------- a new chip is one folder
TOY_MANIFEST = """\
[device]
name = "toychip"
vendor = "Toy Semiconductors"
description = "A chip added by a test: one folder, no code change."
aliases = ["toy"]
backends = ["megatron", "llama.cpp"]
torch_device = "toy"
torch_extension = "torch_toy"
collective = "tccl"
visible_devices_env = "TOY_VISIBLE_DEVICES"

[build."llama.cpp"]
cmake_args = ["-DGGML_TOY=ON"]
toolchain = "Toy SDK"

[ci]
runs_on = ["self-hosted", "toychip"]
run_backends = ["megatron"]
"""


@pytest.fixture
def toy_chip(tmp_path) -> Project:
    project = copy_project(tmp_path / "project")
    folder = project.root / "hardware" / "toychip"
    folder.mkdir()
    (folder / "device.toml").write_text(TOY_MANIFEST)
    # A thin vendor series on top of the device accessor (borrowed from Cambricon's, for the test).
    shutil.copytree(
        project.device_series_dir("cambricon", "megatron"), project.device_series_dir("toychip", "megatron")
    )
    return project


def test_new_device_folder_shows_up_everywhere(toy_chip):
    from build_backend.settings import parse_settings
    from flagscale.patches.workflow import cells
    from flagscale.wheels.backend_wheel import device_settings

    root = str(toy_chip.root)
    listed = cli("devices", "--root", root)
    assert listed.exit_code == 0 and "toychip" in listed.output
    shown = cli("devices", "toy", "--root", root)
    assert shown.exit_code == 0 and shown.output.startswith("toychip:")
    data = json.loads(cli("ci", "matrix", "--root", root, "--device", "toychip").output)["include"]
    assert [(c["device"], c["backend"], c["run"]) for c in data] == [
        ("toychip", "megatron", True),
        ("toychip", "llama.cpp", False),
    ]
    assert data[0]["runs_on"] == ["self-hosted", "toychip"] and '("toy", "tccl")' in data[0]["smoke"]
    assert data[1]["build_on"] == ["self-hosted", "toychip"]  # the Toy SDK lives on the vendor's runners
    assert ("megatron", "toychip") in cells(toy_chip) and ("llama.cpp", "toychip") in cells(toy_chip)
    _, settings = device_settings(Target.of(toy_chip, "llama.cpp", "toy"))
    assert settings.environ() == {"CMAKE_ARGS": "-DGGML_TOY=ON"}
    assert parse_settings({"device": "toy", "backend": "megatron"}, toy_chip.root).device == "toychip"


@pytest.mark.integration
def test_new_device_series_applies(toy_chip, real_cache):
    from flagscale.patches.series import series_for
    from flagscale.patches.workflow import check

    patches = sum(len(s.names) for s in series_for(toy_chip, "megatron", "toychip"))
    results = check(toy_chip, "megatron", "toychip", source="sdist", cache=real_cache)
    assert [(r.backend, r.device, r.status, r.patches) for r in results] == [("megatron", "toychip", "ok", patches)]
