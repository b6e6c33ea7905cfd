"""`flagscale upstream bump` for real, on a scratch copy of this checkout's pins, patches and devices.

megatron-core 0.16.1 (our pin) -> 0.16.0 (the release before it, from the package index): every series
rebases, every cell applies, the cpu wheel builds and trains tiny_gpt for a few steps, and only then are the
pin and the refreshed patch written. The same bump with a cpu patch that makes `import megatron.core` fail
(a real patch, applied and built like any other) stops at the smoke test, says why, and leaves every byte
of the copy as it was. The smoke test runs in the session's megatron environment (tests/megatron_env.py);
wheels and sdists are shared through $FLAGSCALE_TEST_CACHE/build-cache.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from conftest import REPO_ROOT, copy_project, make_patch, real_cache_dir
from megatron_env import megatron_env

from flagscale.errors import ConfigError
from flagscale.patches.series import series_for
from flagscale.patches.workflow import cells
from flagscale.upstream.bump import bump
from flagscale.upstream.cache import Cache
from flagscale.upstream.index import find_sdist
from flagscale.upstream.project import Project
from flagscale.upstream.sources import materialize
from flagscale.upstream.target import Target

OLDER = "0.16.0"  # megatron-core's release before our 0.16.1 pin


def _checkout(dest: Path) -> Project:
    """Pins, patches, devices, and what the smoke test trains with (examples/tiny_gpt and its tool)."""
    project = copy_project(dest)
    shutil.copytree(REPO_ROOT / "examples" / "tiny_gpt", dest / "examples" / "tiny_gpt")
    (dest / "tools").mkdir()
    shutil.copy2(REPO_ROOT / "tools" / "preprocess_data.py", dest / "tools" / "preprocess_data.py")
    return project


def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _bump(root: Path, python: Path, reports: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "FLAGSCALE_CACHE_DIR": str(real_cache_dir() / "build-cache"), "OMP_NUM_THREADS": "1"}
    env.pop("FLAGSCALE_ROOT", None)
    args = ["upstream", "bump", "megatron", "--to", OLDER, "--root", str(root), "--old-source", "sdist"]
    args += ["--python", str(python), "--report-dir", str(reports)]
    return subprocess.run(
        [sys.executable, "-m", "flagscale.cli", *args], env=env, cwd=root, capture_output=True, text=True, timeout=600
    )


def test_bump_to_the_current_version_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="already pinned to 0.16.1"):
        bump(copy_project(tmp_path), "megatron", "0.16.1")


@pytest.mark.integration
def test_bump_writes_pin_patches_and_report_only_after_the_smoke_test(tmp_path, tmp_path_factory):
    env = megatron_env(tmp_path_factory)
    root = tmp_path / "checkout"
    project = _checkout(root)
    before = _tree_bytes(root)
    result = _bump(root, env.python, tmp_path / "reports")
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]

    release = find_sdist("megatron-core", OLDER)
    pin = tomllib.loads((root / "third_party/upstreams.toml").read_text())["megatron"]
    assert (pin["sdist"]["version"], pin["sdist"]["sha256"], pin["tag"]) == (OLDER, release.sha256, "core_v0.16.0")
    assert "commit" not in pin  # the old commit is not 0.16.0's
    after = _tree_bytes(root)
    changed = sorted(p for p in after if after[p] != before.get(p))
    # 0005's hunk moved 3 lines in 0.16.0: the refreshed patch says so; nothing else changed.
    assert changed == ["patches/megatron/0005-dist-checkpointing-device-neutral.patch", "third_party/upstreams.toml"]
    assert b"@@ -598,7 +600,7 @@" in after[changed[0]]

    report = (tmp_path / "reports" / f"bump-megatron-{OLDER}.md").read_text()
    assert f"report: {tmp_path / 'reports' / f'bump-megatron-{OLDER}.md'}" in result.stdout
    assert "**Bumped**" in report and release.sha256 in report
    # Every patch of every series goes through; only 0005 moved (0.16.0 has 3 lines fewer above its hunk).
    n = sum(len(s.names) for d in [None, *project.devices] for s in series_for(project, "megatron", d)[1 if d else 0 :])
    assert f"{n} patch(es): {n - 1} clean, 1 offset" in report
    assert f"{len(cells(project, 'megatron'))} cell(s) apply" in report
    assert "3 training steps of tiny_gpt" in report
    assert "megatron-core 0.16.0" in report  # flagscale train's own line: it trained on the new wheel

    check = subprocess.run(
        [sys.executable, "-m", "flagscale.cli", "patch", "check", "--backend", "megatron", "--source", "sdist"],
        env={**os.environ, "FLAGSCALE_CACHE_DIR": str(real_cache_dir() / "build-cache")},
        cwd=root,
        capture_output=True,
        text=True,
    )
    assert check.returncode == 0, check.stdout + check.stderr


@pytest.mark.integration
def test_a_failing_smoke_test_leaves_the_checkout_unchanged_and_says_why(tmp_path, tmp_path_factory):
    env = megatron_env(tmp_path_factory)
    root = tmp_path / "checkout"
    project = _checkout(root)
    # A real cpu patch that breaks the import: it applies, rebases and builds like any other.
    cache = Cache(real_cache_dir() / "build-cache")
    init = "megatron/core/__init__.py"
    original = (materialize(Target.of(project, "megatron", None, "sdist", cache)).tree / init).read_text()
    broken = 'raise ImportError("broken on purpose by test_bump")\n' + original
    series = root / "hardware/cpu/patches/megatron"
    (series / "0003-break-the-import.patch").write_bytes(
        make_patch({init: original}, {init: broken}, tmp_path / "mk", subject="cpu: break the import")
    )
    with open(series / "series", "a") as f:
        f.write("0003-break-the-import.patch\n")
    before = _tree_bytes(root)

    result = _bump(root, env.python, tmp_path / "reports")
    assert result.returncode == 1, result.stdout + result.stderr[-3000:]
    assert "smoke failed: `import megatron.core` failed: ImportError: broken on purpose by test_bump" in " ".join(
        result.stderr.split()
    )
    assert "nothing was written" in result.stderr
    assert _tree_bytes(root) == before  # every byte of the copy, pin and patches included

    report = (tmp_path / "reports" / f"bump-megatron-{OLDER}.md").read_text()
    assert "**Not bumped**" in report and "## smoke: FAILED" in report
    assert "## build: ok" in report and "| device:cpu | 0003-break-the-import.patch | clean |" in report


@pytest.mark.integration
def test_llama_cpp_smoke_test_completes_from_a_gguf_with_the_new_wheel(tmp_path):
    """The llama.cpp smoke step on the cpu wheel the llama.cpp tests build (cached): import + 8 tokens."""
    from llama_cpp_support import backend_wheel, tiny_gguf, work_root

    from flagscale.upstream.bump import _smoke

    project = copy_project(tmp_path / "checkout")
    cache = Cache(real_cache_dir() / "build-cache")
    args = (project, project, "llama.cpp", backend_wheel(), tmp_path, sys.executable, tiny_gguf(work_root()), cache)
    stage = _smoke(*args, lambda _m: None)
    assert stage.ok, "\n".join(stage.details)
    assert stage.summary == "import and a completion of 8 tokens from tiny.gguf"
    assert any("completion_tokens" in line for line in stage.details)


@pytest.mark.integration
def test_a_conflicting_rebase_leaves_its_workspace_and_the_checkout_unchanged(tmp_path):
    """megatron-core 0.17.0 changed lines two of our patches touch: the bump stops after the rebase."""
    from flagscale.patches.rebase import abort_rebase

    project = _checkout(tmp_path / "checkout")
    before = _tree_bytes(project.root)
    cache = Cache(real_cache_dir() / "build-cache")
    result = bump(project, "megatron", "0.17.0", old_source="sdist", cache=cache, report_dir=tmp_path / "reports")
    assert not result.ok and [s.name for s in result.stages] == ["rebase"]
    assert result.reason.startswith("rebase failed: 2 patch(es) did not go through (0007-moe-device-neutral.patch")
    assert result.workspace == tmp_path / "reports" / "bump-megatron-0.17.0-workspace"
    assert (result.workspace / ".git").is_dir() and f"--continue {result.workspace}" in result.reason
    assert _tree_bytes(project.root) == before and result.written == ()
    report = result.report.read_text()
    assert "Conflict of common/0009-mla-with-local-attention.patch at `megatron/core/transformer/" in report
    assert "Not run (an earlier step failed): check, build, smoke." in report
    abort_rebase(result.workspace)
    assert not result.workspace.exists() and _tree_bytes(project.root) == before


def test_an_unknown_release_names_the_newest_ones_in_version_order():
    from flagscale.upstream.index import _by_version

    assert _by_version(["0.9.0", "0.16.1", "0.16.0rc0.dev1", "0.2.0", "weird"]) == [
        "weird",
        "0.2.0",
        "0.9.0",
        "0.16.0rc0.dev1",
        "0.16.1",
    ]
