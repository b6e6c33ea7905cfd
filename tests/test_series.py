"""Series files and the lint."""

from __future__ import annotations

import pytest
from conftest import REPO_ROOT, make_patch

from flagscale.errors import SeriesError
from flagscale.patches.series import lint_folder, read_series

BASE = {"a.py": "one\ntwo\n"}


@pytest.fixture
def folder(tmp_path):
    folder = tmp_path / "series"
    folder.mkdir()
    (folder / "0001-ok.patch").write_bytes(make_patch(BASE, {"a.py": "one\n2\n"}, tmp_path, subject="x: ok"))
    (folder / "series").write_text("# comment\n0001-ok.patch  # trailing comment\n")
    return folder


def test_clean_folder_lints_clean(folder):
    assert read_series(folder, "common").names == ("0001-ok.patch",)
    assert lint_folder(folder) == []


def test_every_real_series_lints_clean():
    folders = {p.parent for p in REPO_ROOT.glob("patches/*/series")} | {
        p.parent for p in REPO_ROOT.glob("hardware/*/patches/*/series")
    }
    assert folders
    for folder in folders:
        assert lint_folder(folder) == [], folder


def test_unlisted_missing_and_duplicate_entries(folder, tmp_path):
    (folder / "0002-extra.patch").write_bytes((folder / "0001-ok.patch").read_bytes())
    (folder / "notes.txt").write_text("stray")
    problems = "\n".join(lint_folder(folder))
    assert "0002-extra.patch: not listed" in problems and "notes.txt: not listed" in problems
    (folder / "series").write_text("0001-ok.patch\n0003-gone.patch\n")
    with pytest.raises(SeriesError, match="lists '0003-gone.patch', which does not exist"):
        read_series(folder, "common")
    (folder / "series").write_text("0001-ok.patch\n0001-ok.patch\n")
    with pytest.raises(SeriesError, match="twice"):
        read_series(folder, "common")
    (folder / "series").write_text("../0001-ok.patch\n")
    with pytest.raises(SeriesError, match="file name in the same folder"):
        read_series(folder, "common")


def test_patches_without_a_series_file_are_an_error(folder):
    (folder / "series").unlink()
    with pytest.raises(SeriesError, match="no series file"):
        read_series(folder, "common")


@pytest.mark.parametrize(
    "edit, problem",
    [
        (lambda d: d.replace(b"Upstream-Status: Pending\n", b""), "missing 'Upstream-Status:'"),
        (lambda d: d.replace(b"Upstream-Status: Pending", b"Upstream-Status: Maybe"), "must start with one of"),
        (lambda d: d.replace(b"Upstream-Status: Pending", b"Upstream-Status: Submitted"), "needs a link"),
        (lambda d: d.replace(b"Drop-When: never\n", b""), "missing 'Drop-When:'"),
        (lambda d: d.replace(b"+2\n", b"+2  \n"), "added line ends in whitespace"),
        (lambda d: d.replace(b"\n", b"\r\n"), "CRLF"),
        (lambda d: d.replace(b"@@ -1,2 +1,2 @@", b"@@ -1,3 +1,2 @@"), "ends early"),
    ],
)
def test_lint_finds_header_and_whitespace_damage(folder, edit, problem):
    patch = folder / "0001-ok.patch"
    patch.write_bytes(edit(patch.read_bytes()))
    problems = lint_folder(folder)
    assert any(problem in p for p in problems), problems
