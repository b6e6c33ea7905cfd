"""Compiled backends build through ccache (flagscale/wheels/compiler_cache.py).

A toy compiled backend: a real scikit-build-core + CMake project of three C files (the build system
llama-cpp-python uses), one FlagScale patch on one of them, built into a wheel by the same code as
every backend wheel (fresh temporary build folder each time). After a one-line change to the patch, the
rebuild compiles only the patched file: ccache's own statistics show the two others as hits.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import textwrap
from pathlib import Path

import pytest
from conftest import TOY_SHA, make_patch, write_tree

from flagscale.upstream.cache import Cache
from flagscale.upstream.project import Project
from flagscale.upstream.target import Target
from flagscale.wheels import compiler_cache
from flagscale.wheels.compiler_cache import ccache_dir, compiler_cache_env

SOURCES = {
    "PKG-INFO": "Metadata-Version: 2.1\nName: toyc\nVersion: 1.0\n",
    "pyproject.toml": textwrap.dedent("""\
        [build-system]
        requires = ["scikit-build-core>=0.9.2"]
        build-backend = "scikit_build_core.build"

        [project]
        name = "toyc"
        version = "1.0"

        [tool.scikit-build]
        wheel.packages = ["toyc"]
        """),
    "CMakeLists.txt": textwrap.dedent("""\
        cmake_minimum_required(VERSION 3.15)
        project(toyc C)
        add_library(toyc SHARED a.c b.c c.c)
        install(TARGETS toyc DESTINATION toyc)
        """),
    "toyc/__init__.py": "",
    "a.c": "int a(void) { return 1; }\n",
    "b.c": "int b(void) { return 2; }\n",
    "c.c": "int c(void) { return 3; }\n",
}


def _project(root: Path, patch: bytes) -> Project:
    write_tree(
        root,
        {
            "third_party/upstreams.toml": textwrap.dedent(f"""\
                [toyc]
                name = "Toyc"
                git = "https://example.invalid/toyc.git"
                tag = "v1.0"

                [toyc.sdist]
                name = "toyc"
                version = "1.0"
                sha256 = "{TOY_SHA}"
                """),
            "hardware/cpu/device.toml": textwrap.dedent("""\
                [device]
                name = "cpu"
                backends = ["toyc"]

                [build.toyc]
                cmake_args = ["-DCMAKE_BUILD_TYPE=Release"]
                """),
            "patches/toyc/series": "0001-b-returns-more.patch\n",
            "patches/toyc/0001-b-returns-more.patch": patch,
        },
    )
    return Project(root)


def _stats(folder: Path) -> dict[str, int]:
    out = subprocess.run(
        ["ccache", "--print-stats"], env={**os.environ, "CCACHE_DIR": str(folder)}, capture_output=True, text=True
    )
    pairs = (line.split("\t") for line in out.stdout.splitlines() if "\t" in line)
    return {k: int(v) for k, v in pairs if v.strip().isdigit()}


def _hits(stats: dict[str, int]) -> int:
    return stats.get("direct_cache_hit", 0) + stats.get("preprocessed_cache_hit", 0)


@pytest.mark.integration
def test_a_one_line_patch_change_recompiles_only_the_patched_file(tmp_path, monkeypatch):
    if shutil.which("ccache") is None or shutil.which("cmake") is None:
        if os.environ.get("CI"):
            pytest.fail("ccache and cmake must be installed on CI (.ci/run installs ccache)")
        pytest.skip("needs ccache and cmake (apt-get install ccache cmake)")
    from flagscale.wheels.install import build_in_isolation

    monkeypatch.delenv(compiler_cache.DISABLE_ENV, raising=False)
    upstream = write_tree(tmp_path / "toyc-1.0", SOURCES)
    patch = make_patch({"b.c": SOURCES["b.c"]}, {"b.c": "int b(void) { return 20; }\n"}, tmp_path / "mk")
    project = _project(tmp_path / "project", patch)
    cache = Cache(tmp_path / "cache")
    target = Target.of(project, "toyc", "cpu", str(upstream), cache)
    first = build_in_isolation(target)
    folder = ccache_dir(
        cache.root, "toyc", "cpu", {"env": {"CMAKE_ARGS": "-DCMAKE_BUILD_TYPE=Release"}, "config_settings": {}}
    )
    cold = _stats(folder)
    # a.c, b.c, c.c and CMake's compiler check (its try-compile goes through the launcher too)
    assert cold["cache_miss"] == 4 and _hits(cold) == 0, cold

    # One line of the patch changes (b returns 21): a new tree, a new wheel key, a build in a fresh folder.
    changed = make_patch({"b.c": SOURCES["b.c"]}, {"b.c": "int b(void) { return 21; }\n"}, tmp_path / "mk2")
    (project.common_series_dir("toyc") / "0001-b-returns-more.patch").write_bytes(changed)
    second = build_in_isolation(Target.of(Project(project.root), "toyc", "cpu", str(upstream), cache))
    assert second.path != first.path and not second.cache_hit
    warm = _stats(folder)
    # b.c compiled again; a.c, c.c and the compiler check came from the cache despite the fresh build folder
    assert warm["cache_miss"] - cold["cache_miss"] == 1 and _hits(warm) == 3, warm


def test_without_ccache_the_build_environment_is_unchanged_and_says_so_once(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("PATH", str(tmp_path))  # no ccache here
    monkeypatch.delenv(compiler_cache.DISABLE_ENV, raising=False)
    compiler_cache._said.clear()
    env = {"CMAKE_ARGS": "-DGGML_NATIVE=OFF"}
    with caplog.at_level(logging.WARNING):
        for _ in range(3):
            assert compiler_cache_env(env, tmp_path, "llama.cpp", "cpu", {}, tmp_path / "src") == env
    assert [r.message for r in caplog.records].count(caplog.records[0].message) == 1
    assert "ccache is not installed" in caplog.records[0].message


def test_ccache_is_cmakes_launcher_with_one_folder_per_device_and_flags(tmp_path, monkeypatch):
    fake = tmp_path / "bin" / "ccache"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", str(fake.parent))
    monkeypatch.delenv(compiler_cache.DISABLE_ENV, raising=False)
    work = tmp_path / "src"
    env = compiler_cache_env({"CMAKE_ARGS": "-DGGML_NATIVE=OFF"}, tmp_path, "llama.cpp", "cpu", {"a": 1}, work)
    assert env["CMAKE_C_COMPILER_LAUNCHER"] == env["CMAKE_CXX_COMPILER_LAUNCHER"] == str(fake)
    assert (
        env["CMAKE_ARGS"]
        == f"-DGGML_NATIVE=OFF -DCMAKE_C_COMPILER_LAUNCHER={fake} -DCMAKE_CXX_COMPILER_LAUNCHER={fake}"
    )
    assert env["CCACHE_BASEDIR"] == str(work) and env["SKBUILD_BUILD_DIR"].startswith(str(work))
    assert env["CCACHE_DIR"] == str(ccache_dir(tmp_path, "llama.cpp", "cpu", {"a": 1}))
    others = {ccache_dir(tmp_path, "llama.cpp", "cuda", {"a": 1}), ccache_dir(tmp_path, "llama.cpp", "cpu", {"a": 2})}
    assert Path(env["CCACHE_DIR"]) not in others and len(others) == 2
    monkeypatch.setenv(compiler_cache.DISABLE_ENV, "0")
    assert compiler_cache_env({}, tmp_path, "llama.cpp", "cpu", {}, work) == {}
