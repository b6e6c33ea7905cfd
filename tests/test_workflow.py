"""checkout / export / check on a synthetic upstream made by the tests (real git throughout)."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import TOY_BASE, git, make_patch, write_tree

from flagscale.errors import ConfigError
from flagscale.patches.series import read_series
from flagscale.patches.workflow import check, checkout, export

REPO_BASE = {f"python/{k}": v for k, v in TOY_BASE.items() if k != "PKG-INFO"}


def add_series(folder: Path, patches: dict[str, bytes]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in patches.items():
        (folder / name).write_bytes(data)
    (folder / "series").write_text("# toy series\n" + "".join(f"{n}\n" for n in patches))


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def toy_series(toy_project, tmp_path):
    """Two common patches and one npu device patch, written with real git format-patch."""
    p1 = make_patch(
        REPO_BASE,
        {"python/toy/__init__.py": TOY_BASE["toy/__init__.py"].replace("line 5\n", "line five\n")},
        tmp_path,
        subject="toy: spell out five",
    )
    p2 = make_patch(
        REPO_BASE,
        {
            "python/toy/device.py": "from toy.accel import accel\n\ndef device():\n    return accel()\n",
            "python/toy/accel.py": "def accel():\n    return 'cuda'\n",
        },
        tmp_path,
        subject="toy: one device accessor",
    )
    add_series(
        toy_project.common_series_dir("toy"), {"0001-spell-out-five.patch": p1, "0002-device-accessor.patch": p2}
    )
    after_p2 = {**REPO_BASE, "python/toy/accel.py": "def accel():\n    return 'cuda'\n"}
    p3 = make_patch(
        after_p2,
        {"python/toy/accel.py": "def accel():\n    return 'npu'\n"},
        tmp_path,
        subject="npu: use the npu accelerator",
    )
    add_series(toy_project.device_series_dir("npu", "toy"), {"0001-npu-accel.patch": p3})
    return toy_project


def test_checkout_has_one_commit_per_patch_with_repo_paths(toy_series, toy_upstream, cache, tmp_path):
    work = tmp_path / "work"
    commits = checkout(toy_series, "toy", work, device="npu", source=str(toy_upstream), cache=cache)
    assert len(commits) == 3
    log = git(work, "log", "--format=%s", "--reverse").stdout.splitlines()
    assert log[1:] == ["toy: spell out five", "toy: one device accessor", "npu: use the npu accelerator"]
    assert (work / "python/toy/accel.py").read_text() == "def accel():\n    return 'npu'\n"
    assert not (work / "PKG-INFO").exists() or (work / "python/PKG-INFO").exists()
    assert git(work, "status", "--porcelain").stdout == ""


def test_export_twice_is_a_noop_and_byte_identical(toy_series, toy_upstream, cache, tmp_path):
    before = snapshot(toy_series.root)
    work = tmp_path / "work"
    checkout(toy_series, "toy", work, device="npu", source=str(toy_upstream), cache=cache)
    first = export(toy_series, "toy", work, device="npu")
    assert first.written == [] and first.removed == [] and len(first.unchanged) == 3
    assert snapshot(toy_series.root) == before
    assert export(toy_series, "toy", work, device="npu").written == []


def test_edit_new_commit_and_drop_round_trip(toy_series, toy_upstream, cache, tmp_path):
    work = tmp_path / "work"
    checkout(toy_series, "toy", work, source=str(toy_upstream), cache=cache)
    common = toy_series.common_series_dir("toy")
    p2_before = (common / "0002-device-accessor.patch").read_bytes()
    # Amend the first patch (it is not HEAD): fixup commit + autosquash, as a developer would.
    write_tree(
        work,
        {"python/toy/__init__.py": (work / "python/toy/__init__.py").read_text().replace("line 9\n", "line nine\n")},
    )
    git(work, "commit", "-qam", "fixup! toy: spell out five")
    git(work, "-c", "sequence.editor=true", "rebase", "-q", "-i", "--autosquash", "HEAD~3")
    # A new patch on top.
    write_tree(work, {"python/toy/new.py": "NEW = True\n"})
    git(work, "add", "-A")
    git(work, "commit", "-qm", "toy: add new module\n\nNeeded.\n\nUpstream-Status: Pending\nDrop-When: never")
    result = export(toy_series, "toy", work)
    names = sorted(p.name for p in result.written)
    assert names == ["0001-spell-out-five.patch", "0003-toy-add-new-module.patch"]
    assert (common / "0002-device-accessor.patch").read_bytes() == p2_before  # unchanged, not rewritten
    assert b"+line nine" in (common / "0001-spell-out-five.patch").read_bytes()
    assert read_series(common, "common").names == (
        "0001-spell-out-five.patch",
        "0002-device-accessor.patch",
        "0003-toy-add-new-module.patch",
    )
    assert (common / "series").read_text().startswith("# toy series\n")  # header comment kept
    assert export(toy_series, "toy", work).written == []  # byte-stable: second export writes nothing
    # Drop the middle patch: its file and series line go.
    git(work, "-c", "sequence.editor=sed -i '2d'", "rebase", "-q", "-i", "HEAD~3")
    result = export(toy_series, "toy", work)
    assert [p.name for p in result.removed] == ["0002-device-accessor.patch"]
    assert not (common / "0002-device-accessor.patch").exists()
    assert [r.status for r in check(toy_series, "toy", source=str(toy_upstream), cache=cache) if r.device is None] == [
        "ok"
    ]


def test_export_refuses_dirty_or_foreign_checkout(toy_series, toy_upstream, cache, tmp_path):
    work = tmp_path / "work"
    checkout(toy_series, "toy", work, source=str(toy_upstream), cache=cache)
    (work / "python/toy/device.py").write_text("dirty\n")
    with pytest.raises(ConfigError, match="uncommitted changes"):
        export(toy_series, "toy", work)
    with pytest.raises(ConfigError, match="device"):
        export(toy_series, "toy", work, device="npu")
    with pytest.raises(ConfigError, match="not a FlagScale checkout"):
        export(toy_series, "toy", tmp_path)


def test_checkout_refuses_non_empty_destination(toy_series, toy_upstream, cache, tmp_path):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not empty"):
        checkout(toy_series, "toy", tmp_path / "busy", source=str(toy_upstream), cache=cache)
    assert (tmp_path / "busy" / "keep.txt").read_text() == "mine"


def test_check_table_covers_every_cell_and_fails_on_a_broken_patch(toy_series, toy_upstream, cache):
    results = check(toy_series, source=str(toy_upstream), cache=cache)
    assert {(r.backend, r.device, r.status) for r in results} == {
        ("toy", None, "ok"),
        ("toy", "cpu", "ok"),
        ("toy", "npu", "ok"),
    }
    assert {r.device: r.patches for r in results} == {None: 2, "cpu": 2, "npu": 3}
    device_patch = toy_series.device_series_dir("npu", "toy") / "0001-npu-accel.patch"
    device_patch.write_bytes(device_patch.read_bytes().replace(b"-    return 'cuda'", b"-    return 'gpu'"))
    results = {r.device: r for r in check(toy_series, source=str(toy_upstream), cache=cache)}
    assert results["npu"].status == "FAIL" and results[None].status == "ok"
    assert "0001-npu-accel.patch" in results["npu"].detail and "python/toy/accel.py" in results["npu"].detail
