"""Every standard frontend gives the same installed result for `-C device=cpu -C backend=megatron`.

pip (`pip install .`), `python -m build` + pip install of its wheel, `uv pip install .`, `uv build` + uv install
of its wheel, and `uv sync`: each in a fresh environment ends with FlagScale 0.1.0+cpu, megatron-core's patched
build (its provenance lists our series; `flagscale doctor` re-hashes its files), torch 2.13.0 CPU and what
`flagscale train` needs at run time, which then trains after the plain pip install (no extras).

uv reads static `[project]` metadata, so the fields the backend changes (version, dependencies) are `dynamic`,
and uv must re-resolve when the -C settings change: `uv pip install .` and `uv sync` run without and then with
the settings in one environment. torch is pinned to the CPU build for pip and uv alike (constraints.txt plus
`torch==2.13.0+cpu`: a resolver that cannot find it fails instead of downloading CUDA wheels).

Time: the backend wheel comes from the shared build cache ($FLAGSCALE_TEST_CACHE/build-cache) and uv's cache
lives beside it ($FLAGSCALE_TEST_CACHE/uv, hard-linked into the environments); pip installs skip byte-compiling.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import zipfile
from functools import cache
from pathlib import Path

import pytest
from conftest import REPO_ROOT, real_cache_dir
from test_build import build_cache_dir, clean_env, expected_patches, only, run, working_tree_copy

from build_backend import build_wheel, prepare_metadata_for_build_wheel
from flagscale.wheels.flit_build import pyproject

MEGATRON_CPU = ["-C", "device=cpu", "-C", "backend=megatron"]
CPU_TORCH = "torch==2.13.0+cpu"

# What an environment holds, printed as JSON by its own python.
INSPECT = """
import importlib.metadata as m, json
from flagscale.wheels.provenance import backend_provenance
names = {d.metadata["Name"].lower().replace("_", "-") for d in m.distributions()}
mc = m.distribution("megatron-core") if "megatron-core" in names else None
prov = backend_provenance(mc) if mc else None
print(json.dumps({
    "flagscale": m.version("flagscale"),
    "megatron": mc.version if mc else None,
    "torch": m.version("torch") if "torch" in names else None,
    "psutil": "psutil" in names,
    "device": prov.device if prov else None,
    "patches": [[p.series, p.name] for p in prov.patches] if prov else None,
    "cuda": sorted(n for n in names if n.startswith("nvidia")),
}))
"""


# ------------------------------------------------------------------------------------- helpers


@cache
def pip_find_links() -> str:
    """Where pip finds the CPU torch wheel (its configured find-links), for uv, which does not read pip's config."""
    configured = os.environ.get("PIP_FIND_LINKS", "")
    if not configured:
        result = subprocess.run(
            [sys.executable, "-m", "pip", "config", "get", "global.find-links"], capture_output=True, text=True
        )
        configured = result.stdout.strip() if result.returncode == 0 else ""
    return ",".join(configured.split())


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict[str, str]:
    """The environment of every frontend run: the build cache, uv's cache, the CPU torch and nothing else."""
    pins = tmp_path_factory.mktemp("constraints") / "cpu-torch.txt"
    pins.write_text(CPU_TORCH + "\n")
    extra = {
        "UV_CACHE_DIR": str(real_cache_dir() / "uv"),
        "UV_CONSTRAINT": f"{REPO_ROOT / 'constraints.txt'} {pins}",
        "UV_PYTHON_DOWNLOADS": "never",
        "UV_NO_PROGRESS": "1",
        "PIP_CONSTRAINT": f"{REPO_ROOT / 'constraints.txt'} {pins}",
        "PIP_NO_COMPILE": "1",  # byte-compiling torch's files is most of a pip install's time
        "OMP_NUM_THREADS": "1",
        "PYTHONWARNINGS": "ignore",
    }
    if pip_find_links():
        extra["UV_FIND_LINKS"] = pip_find_links()
    return clean_env(build_cache_dir(), **extra)


def uv(*args: object, env: dict, cwd: Path = REPO_ROOT) -> subprocess.CompletedProcess:
    return run([Path(sys.executable).with_name("uv"), *args], env, cwd=cwd)


def fresh_venv(path: Path, env: dict) -> Path:
    """A new virtual environment with pip in it (uv makes one in a fraction of `python -m venv`'s time)."""
    uv("venv", "--seed", "--python", sys.executable, path, env=env)
    return path / "bin" / "python"


def inspect(python: Path, env: dict) -> dict:
    return json.loads(run([python, "-c", INSPECT], env, cwd=python.parent).stdout)


def assert_cpu_megatron_cell(python: Path, env: dict, real_project) -> None:
    """FlagScale's cpu build with the patched megatron-core, the CPU torch and train's runtime needs."""
    found = inspect(python, env)
    assert found["flagscale"] == "0.1.0+cpu", found
    assert re.fullmatch(r"0\.16\.1\+fs\.cpu\.[0-9a-f]{8}", found["megatron"] or ""), found
    assert found["device"] == "cpu" and found["patches"] == [
        list(p) for p in expected_patches(real_project, "megatron", "cpu")
    ]
    assert found["torch"] == "2.13.0+cpu" and found["cuda"] == [], found
    assert found["psutil"], "flagscale train needs psutil at run time"
    doctor = run([python.with_name("flagscale"), "doctor"], env, cwd=python.parent, ok=False)
    assert doctor.returncode == 0, doctor.stdout + doctor.stderr
    assert found["megatron"] in doctor.stdout


def dist_info(wheel: Path) -> dict[str, bytes]:
    with zipfile.ZipFile(wheel) as zin:
        return {n.split("/", 1)[1]: zin.read(n) for n in zin.namelist() if n.split("/")[0].endswith(".dist-info")}


# ------------------------------------------------------------------------------ metadata (fast)


def test_pyproject_declares_what_the_backend_changes():
    project = pyproject(REPO_ROOT)["project"]
    assert {"version", "dependencies"} <= set(project["dynamic"])
    assert "version" not in project and "dependencies" not in project  # PEP 621: dynamic means not static


def test_prepare_metadata_is_the_plain_wheels_dist_info(tmp_path, monkeypatch):
    for var in ("FLAGSCALE_DEVICE", "FLAGSCALE_BACKEND", "FLAGSCALE_ROOT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(REPO_ROOT)
    name = prepare_metadata_for_build_wheel(str(tmp_path / "md"))
    wheel = tmp_path / "w" / build_wheel(str(tmp_path / "w"))
    assert name == "flagscale-0.1.0.dist-info"
    prepared = {p.name: p.read_bytes() for p in (tmp_path / "md" / name).iterdir()}
    assert prepared == dist_info(wheel)
    metadata = prepared["METADATA"].decode()
    base = [line[len("Requires-Dist: ") :] for line in metadata.splitlines() if line.startswith("Requires-Dist: ")]
    assert [r for r in base if "extra ==" not in r] == pyproject(REPO_ROOT)["tool"]["flagscale"]["dependencies"]


# --------------------------------------------------------------------------- real frontends


@pytest.mark.integration
def test_pip_install_then_flagscale_train(tmp_path, env, real_project):
    """The README's set-up: a plain `pip install . -C device=cpu -C backend=megatron`, then a few steps."""
    python = fresh_venv(tmp_path / "venv", env)
    run([python, "-m", "pip", "install", ".", *MEGATRON_CPU], env)
    assert_cpu_megatron_cell(python, env, real_project)

    work = tmp_path / "work"
    work.mkdir()
    run([python, REPO_ROOT / "examples/tiny_gpt/make_corpus.py", "--out", work / "data", "--docs", "60"], env, cwd=work)
    exp = work / "exp"
    iters = 4
    result = run(
        [
            python.with_name("flagscale"),
            "train",
            REPO_ROOT / "examples/tiny_gpt/conf",
            "--foreground",
            f"experiment.exp_dir={exp}",
            f"train.data.data_path={work / 'data' / 'corpus_text_document'}",
            f"train.model.train_iters={iters}",
            "train.model.make_vocab_size_divisible_by=130",
            f"train.system.checkpoint.save_interval={iters}",  # a distributed checkpoint: needs psutil
        ],
        env,
        cwd=work,
        ok=False,
        timeout=300,
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    steps = [json.loads(line) for line in (exp / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert [s["iteration"] for s in steps] == list(range(1, iters + 1))
    assert (exp / "checkpoints" / "latest_checkpointed_iteration.txt").read_text().strip() == str(iters)


@pytest.mark.integration
def test_python_build_then_pip_install_of_its_wheel(tmp_path, env, real_project):
    run([sys.executable, "-m", "build", "--outdir", tmp_path / "dist", *MEGATRON_CPU], env)
    only(tmp_path / "dist", "flagscale-0.1.0+cpu.tar.gz")  # the sdist says the version its wheel will have
    wheel = only(tmp_path / "dist", "flagscale-0.1.0+cpu-py3-none-any.whl")
    python = fresh_venv(tmp_path / "venv", env)
    run([python, "-m", "pip", "install", wheel], env)
    assert_cpu_megatron_cell(python, env, real_project)


@pytest.mark.integration
def test_uv_pip_install_follows_the_settings(tmp_path, env, real_project):
    python = fresh_venv(tmp_path / "venv", env)
    uv("pip", "install", "--python", python, ".", env=env)
    plain = inspect(python, env)
    assert plain["flagscale"] == "0.1.0" and plain["megatron"] is None and plain["torch"] is None
    uv("pip", "install", "--python", python, ".", *MEGATRON_CPU, env=env)
    assert_cpu_megatron_cell(python, env, real_project)


@pytest.mark.integration
def test_uv_build_then_install_of_its_wheel(tmp_path, env, real_project):
    uv("build", "--out-dir", tmp_path / "dist", *MEGATRON_CPU, env=env)  # sdist, then the wheel from it
    wheel = only(tmp_path / "dist", "flagscale-0.1.0+cpu-py3-none-any.whl")
    python = fresh_venv(tmp_path / "venv", env)
    uv("pip", "install", "--python", python, wheel, env=env)
    assert_cpu_megatron_cell(python, env, real_project)


@pytest.mark.integration
def test_uv_sync_follows_the_settings(tmp_path, env, real_project):
    """`uv sync` in a copy of the checkout (it writes uv.lock and would use the checkout's .venv)."""
    project = working_tree_copy(tmp_path / "checkout")
    sync_env = {**env, "UV_PROJECT_ENVIRONMENT": str(tmp_path / "venv")}
    python = tmp_path / "venv" / "bin" / "python"
    uv("sync", "--python", sys.executable, env=sync_env, cwd=project)
    plain = inspect(python, sync_env)
    assert plain["flagscale"] == "0.1.0" and plain["megatron"] is None and plain["torch"] is None
    # uv sync reads no constraints file: check what it would install before it downloads anything
    planned = uv("sync", "--dry-run", "--python", sys.executable, *MEGATRON_CPU, env=sync_env, cwd=project)
    assert CPU_TORCH in planned.stdout + planned.stderr and "nvidia" not in planned.stdout + planned.stderr
    uv("sync", "--python", sys.executable, *MEGATRON_CPU, env=sync_env, cwd=project)
    assert_cpu_megatron_cell(python, sync_env, real_project)


@pytest.mark.integration
def test_prepare_metadata_agrees_with_the_device_wheel(tmp_path, monkeypatch):
    """In-process hooks, after the frontends above built the backend wheel into the build cache."""
    for var in ("FLAGSCALE_DEVICE", "FLAGSCALE_BACKEND", "FLAGSCALE_UPSTREAM_SOURCE", "FLAGSCALE_ROOT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("FLAGSCALE_CACHE_DIR", str(build_cache_dir()))
    monkeypatch.chdir(REPO_ROOT)
    settings = {"device": "cpu", "backend": "megatron"}
    name = prepare_metadata_for_build_wheel(str(tmp_path / "md"), settings)
    wheel = tmp_path / "w" / build_wheel(str(tmp_path / "w"), settings)
    assert name == "flagscale-0.1.0+cpu.dist-info"
    built = dist_info(wheel)
    for path in (tmp_path / "md" / name).iterdir():
        assert path.read_bytes() == built[path.name], path.name
