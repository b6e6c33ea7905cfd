"""Shared fixtures: synthetic FlagScale projects and upstream trees made by the tests, and the real
release sdists (downloaded once from the package index and cached between runs)."""

from __future__ import annotations

import os
import shutil
import subprocess
import textwrap
from pathlib import Path

import pytest

from flagscale.cache import Cache
from flagscale.project import Project

REPO_ROOT = Path(__file__).resolve().parent.parent
TOY_SHA = "0" * 64


def write_tree(root: Path, files: dict[str, str | bytes]) -> Path:
    for rel, content in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content.encode() if isinstance(content, str) else content)
    return root


def git(repo: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "GIT_AUTHOR_NAME": "Test", "GIT_AUTHOR_EMAIL": "test@example.org",
           "GIT_COMMITTER_NAME": "Test", "GIT_COMMITTER_EMAIL": "test@example.org",
           "GIT_AUTHOR_DATE": "@1700000000 +0000", "GIT_COMMITTER_DATE": "@1700000000 +0000"}
    return subprocess.run(["git", "-C", str(repo), *args], check=check, capture_output=True, text=True, env=env)


def make_patch(base: dict[str, str | bytes], changed: dict[str, str | bytes | None], tmp: Path,
               subject: str = "toy: change", body: str = "Because the toy needs it.", status: str = "Pending",
               drop: str = "never", chmod: dict[str, int] | None = None) -> bytes:
    """A real `git format-patch` of `base` -> `changed` (None deletes a file; `chmod` sets modes),
    with a proper header."""
    tmp.mkdir(parents=True, exist_ok=True)
    repo = tmp / f"mkpatch-{len(list(tmp.glob('mkpatch-*')))}"
    repo.mkdir()
    write_tree(repo, base)
    git(repo, "init", "-q")
    git(repo, "config", "core.quotepath", "true")
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "base")
    for rel, content in changed.items():
        if content is None:
            (repo / rel).unlink()
        else:
            write_tree(repo, {rel: content})
    for rel, mode in (chmod or {}).items():
        os.chmod(repo / rel, mode)
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", f"{subject}\n\n{body}\n\nUpstream-Status: {status}\nDrop-When: {drop}")
    out = subprocess.run(["git", "-C", str(repo), "format-patch", "--stdout", "--zero-commit", "--full-index",
                          "--no-stat", "--no-signature", "--no-renames", "-N", "-1"], check=True, capture_output=True)
    return out.stdout


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Cache:
    monkeypatch.setenv("FLAGSCALE_CACHE_DIR", str(tmp_path / "cache"))
    return Cache(tmp_path / "cache")


@pytest.fixture
def toy_project(tmp_path) -> Project:
    """A FlagScale project with one backend, `toy`, whose upstream is a local tree (see `toy_upstream`)."""
    root = tmp_path / "project"
    write_tree(root, {
        "third_party/upstreams.toml": textwrap.dedent(f"""\
            [toy]
            name = "Toy"
            aliases = ["toy-upstream"]
            git = "https://example.invalid/toy.git"
            tag = "v1.0"
            tag_format = "v{{version}}"

            [toy.sdist]
            name = "toy"
            version = "1.0"
            sha256 = "{TOY_SHA}"
            paths = {{ "python/" = "" }}
            """),
        "hardware/cpu/device.toml": '[device]\nname = "cpu"\nbackends = ["toy"]\n',
        "hardware/npu/device.toml": '[device]\nname = "npu"\naliases = ["ascend"]\nbackends = ["toy"]\n',
    })
    return Project(root)


TOY_BASE = {
    "PKG-INFO": "Metadata-Version: 2.1\nName: toy\nVersion: 1.0\n",
    "toy/__init__.py": "".join(f"line {i}\n" for i in range(1, 41)),
    "toy/device.py": "def device():\n    return 'cuda'\n",
    "toy/bin/run.sh": "#!/bin/sh\necho run\n",
}


@pytest.fixture
def toy_upstream(tmp_path) -> Path:
    """The toy backend's release sdist layout (PKG-INFO at the top); repo paths live under python/."""
    return write_tree(tmp_path / "toy-1.0", TOY_BASE)


def real_cache_dir() -> Path:
    """Where integration tests keep real sdists and trees between runs (CI caches this folder)."""
    configured = os.environ.get("FLAGSCALE_TEST_CACHE")
    return Path(configured) if configured else Path.home() / ".cache" / "flagscale-tests"


@pytest.fixture(scope="session")
def real_cache() -> Cache:
    return Cache(real_cache_dir())


@pytest.fixture(scope="session")
def real_project() -> Project:
    return Project(REPO_ROOT)


def copy_project(dest: Path) -> Project:
    """A scratch copy of this checkout's pins, patches and devices that a test may rewrite."""
    for part in ("third_party/upstreams.toml", "patches", "hardware"):
        src = REPO_ROOT / part
        if src.is_dir():
            shutil.copytree(src, dest / part)
        else:
            (dest / part).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / part)
    return Project(dest)
