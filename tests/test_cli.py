"""The `flagscale` and `tools/patch.py` faces: real subprocesses, exit codes, one-line errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO_ROOT, TOY_BASE, make_patch

from flagscale.patches.tree import patched_tree
from flagscale.upstream.target import Target

FLAGSCALE = [sys.executable, "-m", "flagscale.cli"]


def run(args, cwd=REPO_ROOT, env=None):
    import os

    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=300)


def test_help_does_not_import_heavy_modules():
    code = (
        "import sys; from flagscale.cli import app; from typer.testing import CliRunner; "
        "r = CliRunner().invoke(app, ['--help']); assert r.exit_code == 0, r.output; "
        "heavy = [m for m in ('torch', 'megatron', 'hydra', 'ray', 'tomlkit', 'filelock') if m in sys.modules]; "
        "assert not heavy, heavy"
    )
    assert run([sys.executable, "-c", code]).returncode == 0


def test_version_and_upstream_status():
    assert run([*FLAGSCALE, "--version"]).stdout.strip() == __import__("flagscale").__version__
    status = run([*FLAGSCALE, "upstream", "status"])
    assert status.returncode == 0
    for text in ("megatron", "core_v0.16.1", "55ac7082517c", "llama-cpp-python 0.3.36", "not initialized"):
        assert text in status.stdout


def test_unknown_backend_is_one_clear_line():
    result = run([*FLAGSCALE, "patch", "check", "--backend", "megatrn"])
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "unknown backend 'megatrn'" in lines[0] and "did you mean 'megatron'" in lines[0]


def test_unknown_device_alias_resolution():
    result = run([*FLAGSCALE, "patch", "check", "--device", "tpu"])
    assert (
        result.returncode == 2
        and "unknown device 'tpu'; valid devices: ascend, cambricon, cpu, cuda, hygon, iluvatar, kunlunxin, metax, musa"
        in result.stderr
    )


def _toy_root(toy_project, toy_upstream, tmp_path, broken: bool) -> Path:
    repo_base = {f"python/{k}": v for k, v in TOY_BASE.items() if k != "PKG-INFO"}
    data = make_patch(repo_base, {"python/toy/device.py": "def device():\n    return 'cpu'\n"}, tmp_path)
    if broken:
        data = data.replace(b"-    return 'cuda'", b"-    return 'gpu'")
    folder = toy_project.common_series_dir("toy")
    folder.mkdir(parents=True)
    (folder / "0001-cpu.patch").write_bytes(data)
    (folder / "series").write_text("0001-cpu.patch\n")
    return toy_project.root


def test_tools_patch_check_table_and_exit_codes(toy_project, toy_upstream, tmp_path):
    root = _toy_root(toy_project, toy_upstream, tmp_path, broken=False)
    env = {"FLAGSCALE_CACHE_DIR": str(tmp_path / "cache")}
    ok = run(
        [
            sys.executable,
            str(REPO_ROOT / "tools" / "patch.py"),
            "check",
            "--root",
            str(root),
            "--source",
            str(toy_upstream),
        ],
        env=env,
    )
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.count(" ok ") == 3  # (common), cpu, npu
    (root / "patches/toy/0001-cpu.patch").write_bytes(
        (root / "patches/toy/0001-cpu.patch").read_bytes().replace(b"-    return 'cuda'", b"-    return 'gpu'")
    )
    bad = run(
        [
            sys.executable,
            str(REPO_ROOT / "tools" / "patch.py"),
            "check",
            "--root",
            str(root),
            "--source",
            str(toy_upstream),
        ],
        env=env,
    )
    assert bad.returncode == 1 and "FAIL" in bad.stdout
    assert "0001-cpu.patch: python/toy/device.py: hunk 1" in bad.stdout


def test_apply_prints_the_cached_tree_and_copies_it(toy_project, toy_upstream, tmp_path):
    root = _toy_root(toy_project, toy_upstream, tmp_path, broken=False)
    env = {"FLAGSCALE_CACHE_DIR": str(tmp_path / "cache")}
    args = [
        *FLAGSCALE,
        "patch",
        "apply",
        "toy",
        "--device",
        "ascend",
        "--root",
        str(root),
        "--source",
        str(toy_upstream),
    ]
    first = run(args, env=env)
    assert first.returncode == 0, first.stderr
    tree = Path(first.stdout.strip())
    assert (tree / "toy/device.py").read_text() == "def device():\n    return 'cpu'\n"
    second = run(args, env=env)
    assert "(cached)" in second.stderr and second.stdout == first.stdout
    copied = run([*args, str(tmp_path / "copy")], env=env)
    assert copied.returncode == 0 and (tmp_path / "copy/toy/device.py").read_text().endswith("'cpu'\n")
    (tmp_path / "copy/toy/device.py").write_text("mine\n")  # a copy is writable and separate from the cache
    assert (tree / "toy/device.py").read_text().endswith("'cpu'\n")


@pytest.mark.integration
def test_a_cached_apply_is_answered_before_the_full_cli_loads(real_project, real_cache):
    tree = patched_tree(Target.of(real_project, "vllm", "cpu", "sdist", real_cache))
    env = {"FLAGSCALE_CACHE_DIR": str(real_cache.root)}
    for face in (
        [sys.executable, "-X", "importtime", "-m", "flagscale"],
        [sys.executable, "-X", "importtime", str(REPO_ROOT / "tools" / "patch.py")],
    ):
        args = [*face, *(["patch"] if face[-1] == "flagscale" else []), "apply", "vllm", "--device", "cpu"]
        fast = run(args, env=env)
        assert fast.returncode == 0, fast.stderr
        assert fast.stdout.strip() == str(tree.path)
        assert "(cached)" in fast.stderr
        assert " typer" not in fast.stderr and " rich" not in fast.stderr  # the import log
        # an alias is resolved by the full CLI, which gives the same answer
        full = run([*args[:-1], "host"], env=env)
        assert full.returncode == 0 and full.stdout == fast.stdout
        assert " typer" in full.stderr
