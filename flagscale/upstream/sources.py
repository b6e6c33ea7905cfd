"""Materialize an upstream pin into the read-only cache, from (in order) an initialized submodule,
a local path the user gives, or the release sdist verified by sha256."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from flagscale.errors import ConfigError, FetchError
from flagscale.upstream.cache import Cache, remove_tree
from flagscale.upstream.pins import Pin
from flagscale.upstream.project import Project
from flagscale.upstream.target import Target

log = logging.getLogger(__name__)

SOURCE_KINDS = ("auto", "submodule", "sdist")


@dataclass(frozen=True)
class Source:
    """A materialized, read-only upstream tree and how its paths relate to the repository's."""

    pin: Pin
    kind: str  # submodule | sdist | path
    tree: Path
    layout: str  # repo | sdist
    key: str  # content identity: what the patched-tree cache keys on
    origin: str  # for humans: where it came from

    def to_tree_path(self, repo_path: str) -> str | None:
        return repo_path if self.layout == "repo" else self.pin.sdist.repo_to_sdist(repo_path)

    def to_repo_path(self, tree_path: str) -> str | None:
        return tree_path if self.layout == "repo" else self.pin.sdist.sdist_to_repo(tree_path)


def submodule_state(project: Project, pin: Pin) -> tuple[Path | None, str | None]:
    """(checkout path, HEAD commit) of the pin's submodule, or (None, None) if not initialized."""
    if not pin.submodule:
        return None, None
    path = project.root / pin.submodule
    if not (path / ".git").exists():
        return None, None
    head = _git(path, "rev-parse", "HEAD").strip()
    return path, head


def materialize(target: Target, progress: Callable[[int, int], None] | None = None) -> Source:
    """The target's pinned upstream as a read-only tree in the cache (its device plays no part)."""
    project, pin, source, cache = target.project, target.pin, target.source, target.cache
    if source not in SOURCE_KINDS:
        return _from_path(pin, Path(source), cache)
    if source in ("auto", "submodule"):
        path, head = submodule_state(project, pin)
        if path is not None and head is not None:
            return _from_submodule(pin, path, head, cache)
        if source == "submodule":
            raise FetchError(
                f"{pin.backend}: submodule {pin.submodule} is not initialized; run "
                f"`git submodule update --init {pin.submodule}` or use --source sdist"
            )
    return _from_sdist(pin, cache, progress)


def fetch_sdist(pin: Pin, cache: Cache, progress=None) -> Path:
    """The pin's sdist in the cache, downloaded and sha256-verified; a corrupted copy is replaced."""
    from flagscale.upstream.index import download, find_sdist, sha256_file  # lazy: urllib is slow to import

    sd = pin.sdist

    def build(tmp: Path) -> None:
        release = find_sdist(sd.name, sd.version)
        if release.sha256 != sd.sha256:
            raise FetchError(
                f"the index lists sha256 {release.sha256} for {release.filename}, the pin says "
                f"{sd.sha256}; check third_party/upstreams.toml before trusting either"
            )
        log.info("downloading %s", release.url)
        download(release.url, tmp / release.filename, sd.sha256, progress)

    entry, _ = cache.get_or_create("sdists", sd.sha256, build)
    files = [p for p in entry.iterdir() if p.name.endswith((".tar.gz", ".zip"))]
    if len(files) != 1 or sha256_file(files[0]) != sd.sha256:
        log.warning("cached sdist %s is corrupted; downloading it again", entry)
        remove_tree(entry)
        entry, _ = cache.get_or_create("sdists", sd.sha256, build)
        files = [p for p in entry.iterdir() if p.name.endswith((".tar.gz", ".zip"))]
    return files[0]


def _from_sdist(pin: Pin, cache: Cache, progress) -> Source:
    sd = pin.sdist
    key = f"sdist-{sd.sha256}"

    def build(tmp: Path) -> None:
        archive = fetch_sdist(pin, cache, progress)
        log.info("extracting %s", archive.name)
        _extract_sdist(archive, tmp)

    tree, _ = cache.get_or_create("sources", key, build)
    return Source(pin, "sdist", tree, "sdist", key, f"{sd.name} {sd.version} sdist (sha256 {sd.sha256[:12]}…)")


def _extract_sdist(archive: Path, dest: Path) -> None:
    """Extract without the top folder; drop VCS folders some sdists ship (llama-cpp-python has .git)."""
    with tarfile.open(archive) as tar:
        members = []
        for member in tar.getmembers():
            parts = member.name.split("/", 1)
            if len(parts) < 2 or not parts[1] or ".git" in parts[1].split("/"):
                continue
            member.name = parts[1]
            if member.islnk() or member.issym():
                # Links inside a sdist are never needed by our upstreams; refuse rather than follow.
                raise FetchError(f"{archive.name}: contains a link {member.name!r}; refusing to extract it")
            members.append(member)
        tar.extractall(dest, members=members, filter="data")


def _from_submodule(pin: Pin, path: Path, head: str, cache: Cache) -> Source:
    if pin.commit and head != pin.commit:
        raise FetchError(
            f"{pin.backend}: submodule {pin.submodule} is at {head[:12]} but the pin is "
            f"{pin.commit[:12]}; run `git submodule update {pin.submodule}`"
        )
    if _git(path, "status", "--porcelain", "--untracked-files=no").strip():
        raise FetchError(
            f"{pin.backend}: submodule {pin.submodule} has local changes; turn them into "
            "patches with `tools/patch.py export` or pass --source sdist"
        )
    key = f"git-{head}"

    def build(tmp: Path) -> None:
        archive = subprocess.run(
            ["git", "-C", str(path), "archive", "--format=tar", head], check=True, capture_output=True
        ).stdout
        subprocess.run(["tar", "-x", "-C", str(tmp)], input=archive, check=True)

    tree, _ = cache.get_or_create("sources", key, build)
    return Source(pin, "submodule", tree, "repo", key, f"submodule {pin.submodule} at {head[:12]}")


def _from_path(pin: Pin, path: Path, cache: Cache) -> Source:
    path = path.expanduser().resolve()
    if not path.is_dir():
        raise ConfigError(f"source {str(path)!r} is not a folder; use auto, submodule, sdist or a path")
    layout = "sdist" if (path / "PKG-INFO").is_file() else "repo"
    key = f"path-{tree_digest(path)}"

    def build(tmp: Path) -> None:
        shutil.copytree(path, tmp, symlinks=True, dirs_exist_ok=True, ignore=shutil.ignore_patterns(".git"))

    tree, _ = cache.get_or_create("sources", key, build)
    return Source(pin, "path", tree, layout, key, f"local {layout} tree {path}")


def tree_digest(root: Path) -> str:
    """sha256 over every file's path, executable bit and bytes (symlinks by target), .git excluded."""
    digest = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d != ".git")
        for name in sorted(filenames):
            full = os.path.join(dirpath, name)
            rel = os.path.relpath(full, root)
            if os.path.islink(full):
                digest.update(b"L" + rel.encode() + b"\0" + os.readlink(full).encode() + b"\0")
                continue
            executable = os.stat(full).st_mode & 0o111
            digest.update(b"F" + rel.encode() + (b"x" if executable else b"-") + b"\0")
            with open(full, "rb") as f:
                digest.update(hashlib.sha256(f.read()).digest())
    return digest.hexdigest()


def _git(path: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(path), *args], check=True, capture_output=True, text=True).stdout
