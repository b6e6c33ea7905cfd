"""The toolchain on the real release sdists (downloaded from the package index, sha256-checked, and
cached between runs in $FLAGSCALE_TEST_CACHE or ~/.cache/flagscale-tests)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import copy_project, git

from flagscale.errors import RebaseConflict
from flagscale.patches.apply import copy_tree
from flagscale.patches.series import series_for
from flagscale.patches.tree import patched_tree
from flagscale.patches.workflow import check, checkout, export, rebase, write_pin
from flagscale.upstream.project import Project
from flagscale.upstream.sources import materialize
from flagscale.upstream.target import Target

pytestmark = pytest.mark.integration

MEGATRON_0160 = ("0.16.0", "597961fc6ea21f9becddd24e4d1d44dd683d1957f339003af9dff950e6f8c2dc")
PROBES = {
    "megatron": "megatron/core/utils.py",
    "vllm": "vllm/envs.py",
    "sglang": "python/sglang/srt/server_args.py",
    "llama.cpp": "ggml/src/ggml.c",
}


@pytest.mark.parametrize("backend", list(PROBES))
def test_real_sdist_is_verified_and_maps_repo_paths(real_project, real_cache, backend):
    pin = real_project.pins.resolve(backend)
    src = materialize(Target(real_project, pin, None, "sdist", real_cache))
    assert src.key == f"sdist-{pin.sdist.sha256}"
    tree_path = src.to_tree_path(PROBES[backend])
    assert (src.tree / tree_path).is_file(), tree_path
    assert not (src.tree / ".git").exists()  # llama-cpp-python's sdist ships one; we drop it


def test_every_cell_applies_to_its_real_pin(real_project, real_cache):
    results = check(real_project, source="sdist", cache=real_cache)
    assert results and all(r.status != "FAIL" for r in results), [r for r in results if r.status == "FAIL"]
    for backend in real_project.pins.names:
        assert any(r.backend == backend and r.patches >= 1 for r in results), f"{backend} ships no patch"


@pytest.mark.parametrize("backend", list(PROBES))
def test_our_tree_is_byte_identical_to_git_apply(real_project, real_cache, backend, tmp_path):
    tree = patched_tree(Target.of(real_project, backend, "cpu", "sdist", real_cache))
    pin = tree.source.pin
    reference = tmp_path / "git-apply"
    reference.mkdir()
    copy_tree(tree.source.tree, reference)
    ((repo_prefix, sdist_prefix),) = pin.sdist.paths
    args = ["git", "apply", "--whitespace=nowarn"]
    if repo_prefix:
        args.append(f"-p{1 + repo_prefix.count('/')}")
    if sdist_prefix:
        args.append(f"--directory={sdist_prefix.rstrip('/')}")
    patches = [str(p) for s in series_for(real_project, pin.backend, "cpu") for p in s.paths]
    subprocess.run([*args, *patches], cwd=reference, check=True)
    diff = subprocess.run(
        ["diff", "-r", "-q", "--no-dereference", str(reference), str(tree.path)], capture_output=True, text=True
    )
    assert diff.returncode == 0, diff.stdout[-2000:]
    for dirpath, _, files in os.walk(reference):
        for name in files:
            ours = tree.path / Path(dirpath).relative_to(reference) / name
            assert bool(os.stat(Path(dirpath) / name).st_mode & 0o100) == bool(ours.stat().st_mode & 0o100), ours


def test_megatron_round_trip_checkout_edit_export_check(real_project, real_cache, tmp_path):
    project = copy_project(tmp_path / "project")
    work = tmp_path / "megatron"
    commits = checkout(project, "megatron", work, source="sdist", cache=real_cache)
    assert len(commits) == len(series_for(project, "megatron")[0].names)
    assert export(project, "megatron", work).written == []  # real patches regenerate byte-identically
    target = work / "megatron/core/__init__.py"
    target.write_text(target.read_text() + "\n# FlagScale: round-trip test\n")
    git(
        work,
        "commit",
        "-qam",
        "megatron: mark the package\n\nTest.\n\nUpstream-Status: Inappropriate [test]\nDrop-When: the test ends",
    )
    result = export(project, "megatron", work)
    assert [p.name for p in result.written] == [f"{len(commits) + 1:04d}-megatron-mark-the-package.patch"]
    assert export(project, "megatron", work).written == []  # exporting twice changes nothing
    cells = [r for r in check(project, "megatron", source="sdist", cache=real_cache)]
    assert cells and all(r.status == "ok" for r in cells)
    assert cells[0].patches == len(commits) + 1


def _pin_megatron_0160(real_project: Project, dest: Path) -> Project:
    project = copy_project(dest)
    pin = project.pins.resolve("megatron")
    import dataclasses

    old = dataclasses.replace(
        pin,
        tag="core_v0.16.0",
        commit=None,
        sdist=dataclasses.replace(pin.sdist, version=MEGATRON_0160[0], sha256=MEGATRON_0160[1]),
    )
    write_pin(project, old)
    for folder in [project.common_series_dir("megatron"), *project.root.glob("hardware/*/patches/megatron")]:
        shutil.rmtree(folder, ignore_errors=True)
    return Project(project.root)


def _series_from_edits(project: Project, cache, work: Path, edits) -> None:
    checkout(project, "megatron", work, source="sdist", cache=cache)
    for subject, rel, old, new in edits:
        path = work / rel
        text = path.read_text()
        assert old in text, (rel, old)
        path.write_text(text.replace(old, new, 1))
        git(work, "commit", "-qam", f"{subject}\n\nWhy: test.\n\nUpstream-Status: Pending\nDrop-When: never")
    export(project, "megatron", work)


def test_rebase_megatron_series_from_0160_onto_0161(real_project, real_cache, tmp_path):
    project = _pin_megatron_0160(real_project, tmp_path / "project")
    _series_from_edits(
        project,
        real_cache,
        tmp_path / "work",
        [
            (
                "megatron: name the memory buffer device",
                "megatron/core/utils.py",
                "torch.cuda.current_device()",
                "torch.device(torch.cuda.current_device())",
            ),
            (
                "megatron: sync through one helper",
                "megatron/core/pipeline_parallel/p2p_communication.py",
                "torch.cuda.synchronize()",
                "torch.cuda.synchronize()  # FlagScale: device accessor later",
            ),
        ],
    )
    report = rebase(project, "megatron", "0.16.1", old_source="sdist", cache=real_cache)
    assert [r.status for r in report] and all(r.status in ("clean", "offset", "merged") for r in report), report
    pins = Project(project.root).pins.resolve("megatron")
    assert (pins.sdist.version, pins.sdist.sha256) == ("0.16.1", real_project.pins.resolve("megatron").sdist.sha256)
    assert pins.tag == "core_v0.16.1"
    results = check(Project(project.root), "megatron", source="sdist", cache=real_cache)
    assert all(r.status == "ok" for r in results), results  # refreshed patches apply without offsets


def _changed_line(old_tree: Path, new_tree: Path) -> tuple[str, str]:
    """A line of a megatron file that 0.16.1 changed relative to 0.16.0."""
    diff = subprocess.run(
        ["diff", "-r", "-u", str(old_tree / "megatron"), str(new_tree / "megatron")], capture_output=True, text=True
    ).stdout
    current = None
    for line in diff.splitlines():
        if line.startswith("--- "):
            current = line[4:].split("\t")[0]
        elif line.startswith("-") and not line.startswith("---") and len(line.strip()) > 20 and current:
            return os.path.relpath(current, old_tree), line[1:]
    raise AssertionError("0.16.0 and 0.16.1 do not differ")


def test_rebase_conflict_reports_and_leaves_series_untouched(real_project, real_cache, tmp_path):
    project = _pin_megatron_0160(real_project, tmp_path / "project")
    old_tree = materialize(Target.of(project, "megatron", None, "sdist", real_cache)).tree
    new_tree = materialize(Target.of(real_project, "megatron", None, "sdist", real_cache)).tree
    rel, line = _changed_line(old_tree, new_tree)
    _series_from_edits(
        project,
        real_cache,
        tmp_path / "work",
        [
            ("megatron: touch a line 0.16.1 changes", rel, line, line + "  # FlagScale conflict"),
        ],
    )
    before = {p: p.read_bytes() for p in project.root.rglob("*") if p.is_file()}
    with pytest.raises(RebaseConflict) as info:
        rebase(project, "megatron", "0.16.1", old_source="sdist", cache=real_cache)
    (row,) = info.value.report
    assert row.status == "conflict" and rel in row.detail
    assert {p: p.read_bytes() for p in project.root.rglob("*") if p.is_file()} == before


def test_rebase_real_megatron_series_written_against_0160(real_project, real_cache, tmp_path):
    """FlagScale's own megatron series, pinned back to 0.16.0, moves forward to 0.16.1."""
    project = copy_project(tmp_path / "project")
    pin = project.pins.resolve("megatron")
    import dataclasses

    write_pin(
        project,
        dataclasses.replace(
            pin,
            tag="core_v0.16.0",
            commit=None,
            sdist=dataclasses.replace(pin.sdist, version=MEGATRON_0160[0], sha256=MEGATRON_0160[1]),
        ),
    )
    project = Project(project.root)
    assert all(r.status != "FAIL" for r in check(project, "megatron", source="sdist", cache=real_cache))
    report = rebase(project, "megatron", "0.16.1", sha256=pin.sdist.sha256, old_source="sdist", cache=real_cache)
    assert {r.name for r in report} >= set(series_for(project, "megatron")[0].names)
    assert all(r.status in ("clean", "offset", "merged") for r in report), report
    assert Project(project.root).pins.resolve("megatron").sdist.version == "0.16.1"
