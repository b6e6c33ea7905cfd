"""The strict apply engine: placement like `git apply` (offsets, no fuzz), all or nothing, nothing
written outside the tree, rollback, staged new trees — checked against real files and real git."""

from __future__ import annotations

import os
import random
import re
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
from conftest import TOY_BASE, make_patch, write_tree

from flagscale.errors import ApplyError, FlagScaleError, PatchError
from flagscale.patches.apply import Placement, apply_to_new_tree, plan_patches, write_plan
from flagscale.patches.patchfile import Patch, parse_patch

GIT_ENV = {
    **os.environ,
    "GIT_CONFIG_NOSYSTEM": "1",
    "GIT_CONFIG_GLOBAL": os.devnull,
    "GIT_AUTHOR_NAME": "Test",
    "GIT_AUTHOR_EMAIL": "test@example.org",
    "GIT_COMMITTER_NAME": "Test",
    "GIT_COMMITTER_EMAIL": "test@example.org",
    "GIT_AUTHOR_DATE": "@1700000000 +0000",
    "GIT_COMMITTER_DATE": "@1700000000 +0000",
}
EXPORT = [
    "format-patch",
    "--stdout",
    "--zero-commit",
    "--full-index",
    "--no-stat",
    "--no-signature",
    "--no-renames",
    "-N",
    "-1",
]


# --- helpers ---------------------------------------------------------------------------------------


def snapshot(root: Path) -> dict[str, tuple]:
    """Everything under root: files (bytes, mode), folders (mode), symlinks (target)."""
    if not os.path.lexists(root):
        return {}
    out: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            full = Path(dirpath, name)
            rel = full.relative_to(root).as_posix()
            st = os.lstat(full)
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("link", os.readlink(full))
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir", stat.S_IMODE(st.st_mode))
            else:
                out[rel] = ("file", full.read_bytes(), stat.S_IMODE(st.st_mode))
    return out


def content_view(root: Path) -> dict[str, tuple[bytes, bool]]:
    """What `git apply` and we must agree on: the file set, bytes and executable bit."""
    out = {}
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            full = Path(dirpath, name)
            out[full.relative_to(root).as_posix()] = (full.read_bytes(), bool(os.stat(full).st_mode & 0o100))
    return out


def folders(root: Path) -> set[str]:
    return {Path(d).relative_to(root).as_posix() for d, _, _ in os.walk(root)} - {"."}


def real_patch(
    tmp: Path,
    base: dict[str, bytes],
    changed: dict[str, bytes | None],
    modes: dict[str, int] | None = None,
    base_modes: dict[str, int] | None = None,
) -> bytes:
    """`git format-patch` (FlagScale's export options) of base -> changed, bytes and modes included."""
    tmp.mkdir(parents=True, exist_ok=True)
    repo = Path(
        subprocess.run(
            ["mktemp", "-d", "-p", str(tmp), "repo-XXXX"], check=True, capture_output=True, text=True
        ).stdout.strip()
    )
    write_tree(repo, base)
    for rel, mode in (base_modes or {}).items():
        os.chmod(repo / rel, mode)

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, env=GIT_ENV)

    run("init", "-q", "--template=")
    run("config", "core.filemode", "true")
    run("add", "-A")
    run("commit", "-qm", "base", "--allow-empty")
    for rel, content in changed.items():
        if content is None:
            (repo / rel).unlink()
        else:
            (repo / rel).parent.mkdir(parents=True, exist_ok=True)
            (repo / rel).write_bytes(content)
    for rel, mode in (modes or {}).items():
        os.chmod(repo / rel, mode)
    run("add", "-A")
    run("commit", "-qm", "toy: change\n\nWhy.\n\nUpstream-Status: Pending\nDrop-When: never")
    return run(*EXPORT).stdout


def make_tree(root: Path, files: dict[str, bytes | str], modes: dict[str, int] | None = None) -> Path:
    write_tree(root, files)
    for rel, mode in (modes or {}).items():
        os.chmod(root / rel, mode)
    return root


def parse(data: bytes, name: str = "0001-toy.patch") -> Patch:
    return parse_patch(data, name)


def assert_one_line(exc: BaseException, *needles: str) -> str:
    message = str(exc)
    assert "\n" not in message, message
    for needle in needles:
        assert needle in message, (needle, message)
    return message


def leftovers(parent: Path, dest_name: str) -> list[str]:
    return [p.name for p in parent.iterdir() if p.name.startswith(f".{dest_name}.tmp-")] if parent.exists() else []


LINES40 = {"toy/__init__.py": "".join(f"line {i}\n" for i in range(1, 41))}


def line_edit(tmp: Path, line: int = 20, new: str = "LINE TWENTY\n") -> bytes:
    changed = "".join(new if i == line else f"line {i}\n" for i in range(1, 41))
    return make_patch(LINES40, {"toy/__init__.py": changed}, tmp)


# --- 1. placement: offsets, no fuzz ----------------------------------------------------------------


@pytest.mark.parametrize("k", [0, 1, 3, 11, -1, -3, -11])
def test_moved_context_applies_with_offset(tmp_path, k):
    patch = parse(line_edit(tmp_path))
    lines = [f"line {i}\n" for i in range(1, 41)]
    lines = [f"extra {j}\n" for j in range(k)] + lines if k >= 0 else lines[-k:]
    root = write_tree(tmp_path / "tree", {"toy/__init__.py": "".join(lines)})
    plan = plan_patches(root, [patch])
    expected = [p for p in plan.placements]
    assert expected == [Placement("0001-toy.patch", "toy/__init__.py", 1, k)]
    assert plan.offsets() == ([] if k == 0 else expected)
    assert plan.offsets("0001-toy.patch") == plan.offsets()
    assert plan.offsets("0002-other.patch") == []
    write_plan(plan, root)
    want = "".join(line.replace("line 20\n", "LINE TWENTY\n") for line in lines)
    assert (root / "toy/__init__.py").read_text() == want


@pytest.mark.parametrize("damage", ["line 18\n", "line 20\n", "line 22\n"], ids=["leading", "removed", "trailing"])
def test_context_differing_by_one_character_is_refused(tmp_path, damage):
    data = line_edit(tmp_path)
    text = LINES40["toy/__init__.py"].replace(damage, damage.replace("line", "lime"))
    root = make_tree(tmp_path / "tree", {**TOY_BASE, "toy/__init__.py": text}, {"toy/bin/run.sh": 0o755})
    before = snapshot(root)
    with pytest.raises(ApplyError) as info:
        write_plan(plan_patches(root, [parse(data)], pin_label="Toy 1.0", hint=" (try --source submodule)"), root)
    assert_one_line(
        info.value,
        "0001-toy.patch",
        "toy/__init__.py",
        "hunk 1 (@@ -17,7 +17,7 @@",
        "Toy 1.0",
        "no fuzz",
        "(try --source submodule)",
    )
    assert snapshot(root) == before


def test_hunk_at_file_start_must_match_at_the_beginning(tmp_path):
    data = line_edit(tmp_path, line=1, new="LINE ONE\n")
    assert b"@@ -1,4 +1,4 @@" in data
    root = write_tree(tmp_path / "tree", {"toy/__init__.py": "header\n" + LINES40["toy/__init__.py"]})
    with pytest.raises(ApplyError, match="@@ -1,4 \\+1,4 @@"):
        plan_patches(root, [parse(data)])


def test_hunk_at_file_end_must_match_at_the_end(tmp_path):
    data = line_edit(tmp_path, line=40, new="LINE FORTY\n")
    root = write_tree(tmp_path / "tree", {"toy/__init__.py": LINES40["toy/__init__.py"] + "footer\n"})
    with pytest.raises(ApplyError, match="hunk 1"):
        plan_patches(root, [parse(data)])


def test_to_tree_maps_repository_paths(tmp_path):
    data = make_patch(
        {"python/toy/device.py": TOY_BASE["toy/device.py"]},
        {"python/toy/device.py": "def device():\n    return 'npu'\n"},
        tmp_path,
    )
    root = write_tree(tmp_path / "tree", TOY_BASE)
    to_tree = lambda p: p.removeprefix("python/") if p.startswith("python/") else None  # noqa: E731
    plan = plan_patches(root, [parse(data)], to_tree=to_tree)
    write_plan(plan, root)
    assert (root / "toy/device.py").read_text() == "def device():\n    return 'npu'\n"
    with pytest.raises(ApplyError) as info:
        plan_patches(root, [parse(data)], to_tree=lambda p: None, pin_label="Toy 1.0")
    assert_one_line(info.value, "0001-toy.patch", "python/toy/device.py", "not shipped in Toy 1.0's sdist")


def test_series_sees_earlier_patches(tmp_path):
    base = {"a.py": "a\nb\nc\n"}
    first = make_patch(base, {"a.py": "a\nB\nc\n"}, tmp_path, subject="one")
    second = make_patch({"a.py": "a\nB\nc\n"}, {"a.py": "a\nB\nC\n", "n.py": "new\n"}, tmp_path, subject="two")
    third = make_patch({"a.py": "a\nB\nC\n", "n.py": "new\n"}, {"a.py": None}, tmp_path, subject="three")
    root = write_tree(tmp_path / "tree", base)
    plan = plan_patches(root, [parse(first, "1.patch"), parse(second, "2.patch"), parse(third, "3.patch")])
    assert plan.finals["a.py"].content is None and plan.originals["a.py"].content == b"a\nb\nc\n"
    write_plan(plan, root)
    assert content_view(root) == {"n.py": (b"new\n", False)}


# --- 2. all or nothing -----------------------------------------------------------------------------


def in_place(root: Path, patches: list[Patch], dest: Path) -> None:
    write_plan(plan_patches(root, patches), root)


def new_tree(root: Path, patches: list[Patch], dest: Path) -> None:
    apply_to_new_tree(plan_patches(root, patches), root, dest)


def new_tree_linked(root: Path, patches: list[Patch], dest: Path) -> None:
    apply_to_new_tree(plan_patches(root, patches), root, dest, link=True)


FLOWS = [in_place, new_tree, new_tree_linked]


_GENERATED: dict = {}  # patch bytes are deterministic (fixed dates): generate each once per session


def series_of_three(tmp: Path, third_applies: bool) -> tuple[dict, list[Patch]]:
    if third_applies not in _GENERATED:
        _GENERATED[third_applies] = _series_of_three(tmp, third_applies)
    return _GENERATED[third_applies]


def _series_of_three(tmp: Path, third_applies: bool) -> tuple[dict, list[Patch]]:
    base = {"pkg/a.py": "a1\na2\na3\n", "pkg/b.py": "b1\nb2\nb3\n", "pkg/gone.py": "g\n", "c.py": "c1\nc2\n"}
    one = make_patch(base, {"pkg/a.py": "a1\nA2\na3\n", "pkg/gone.py": None}, tmp, subject="one")
    two = make_patch(base, {"pkg/b.py": "b1\nB2\nb3\n", "new/dir/n.py": "n\n"}, tmp, subject="two")
    c_base = {"c.py": "c1\nc2\n" if third_applies else "c1\nsomething else\n"}
    three = make_patch(c_base, {"c.py": "C1\nc2\n" if third_applies else "C1\nsomething else\n"}, tmp, subject="three")
    return base, [parse(one, "0001-one.patch"), parse(two, "0002-two.patch"), parse(three, "0003-three.patch")]


@pytest.mark.parametrize("flow", FLOWS)
def test_failing_third_patch_writes_nothing(tmp_path, flow):
    base, patches = series_of_three(tmp_path / "p", third_applies=False)
    root = make_tree(tmp_path / "tree", base)
    before, dest = snapshot(root), tmp_path / "out" / "dest"
    with pytest.raises(ApplyError) as info:
        flow(root, patches, dest)
    assert_one_line(info.value, "0003-three.patch", "c.py", "hunk 1")
    assert snapshot(root) == before
    assert not dest.exists() and leftovers(dest.parent, dest.name) == []


@pytest.mark.parametrize("flow", FLOWS)
def test_passing_series_writes_everything(tmp_path, flow):
    base, patches = series_of_three(tmp_path / "p", third_applies=True)
    root = make_tree(tmp_path / "tree", base)
    dest = tmp_path / "out" / "dest"
    flow(root, patches, dest)
    result = root if flow is in_place else dest
    assert content_view(result) == {
        "pkg/a.py": (b"a1\nA2\na3\n", False),
        "pkg/b.py": (b"b1\nB2\nb3\n", False),
        "new/dir/n.py": (b"n\n", False),
        "c.py": (b"C1\nc2\n", False),
    }
    assert leftovers(dest.parent, dest.name) == []
    if flow is not in_place:
        assert content_view(root) == {k: (v.encode(), False) for k, v in base.items()}


@pytest.mark.parametrize("flow", [new_tree, new_tree_linked])
def test_write_failure_in_staging_leaves_no_destination(tmp_path, flow):
    base, patches = series_of_three(tmp_path / "p", third_applies=True)
    root = make_tree(tmp_path / "tree", base)
    (root / ".c.py.fs-tmp").mkdir()  # copied into the staging tree: writing c.py there fails
    before, dest = snapshot(root), tmp_path / "out" / "dest"
    with pytest.raises(ApplyError) as info:
        flow(root, patches, dest)
    assert_one_line(info.value, "restored")
    assert snapshot(root) == before
    assert not dest.exists() and leftovers(dest.parent, dest.name) == []


def test_existing_destination_is_refused(tmp_path):
    root = write_tree(tmp_path / "tree", {"a.py": "a\n"})
    dest = write_tree(tmp_path / "dest", {"keep": "me"})
    plan = plan_patches(root, [parse(make_patch({"a.py": "a\n"}, {"a.py": "b\n"}, tmp_path))])
    with pytest.raises(ApplyError, match="already exists"):
        apply_to_new_tree(plan, root, dest)
    assert snapshot(dest) == {"keep": ("file", b"me", 0o644)}


# --- 3. hostile corpus -----------------------------------------------------------------------------

HEAD = (
    b"From 0000000000000000000000000000000000000000 Mon Sep 17 00:00:00 2001\nFrom: X <x@example.org>\n"
    b"Date: Mon, 23 Nov 2026 00:00:00 +0000\nSubject: [PATCH] evil\n\n---\n"
)
Z40, O40 = b"0" * 40, b"1" * 40


def add_file(path: bytes, content: bytes = b"pwned\n", mode: bytes = b"100644") -> bytes:
    n = content.count(b"\n")
    return (
        b"diff --git a/"
        + path
        + b" b/"
        + path
        + b"\nnew file mode "
        + mode
        + b"\nindex "
        + Z40
        + b".."
        + O40
        + b"\n--- /dev/null\n+++ b/"
        + path
        + b"\n@@ -0,0 +1"
        + (b"," + str(n).encode() if n != 1 else b"")
        + b" @@\n"
        + b"".join(b"+" + line + b"\n" for line in content.splitlines())
    )


def modify_file(path: bytes, old: bytes, new: bytes) -> bytes:
    return (
        b"diff --git a/"
        + path
        + b" b/"
        + path
        + b"\nindex "
        + Z40
        + b".."
        + O40
        + b" 100644\n--- a/"
        + path
        + b"\n+++ b/"
        + path
        + b"\n@@ -1 +1 @@\n-"
        + old
        + b"\n+"
        + new
        + b"\n"
    )


@pytest.fixture
def arena(tmp_path):
    """A tree to patch and, beside it, folders that must never be written."""
    outside = write_tree(tmp_path / "outside-target", {"real.py": "secret = 1\n", "target.py": "t = 1\n"})
    sibling = write_tree(tmp_path / "sibling", {"lib.py": "lib = 1\n"})
    root = make_tree(
        tmp_path / "root",
        {"ok.py": "ok = 1\n", "pkg/mod.py": "x = 1\ny = 2\nz = 3\n", "empty/.keep": "", "run.sh": "#!/bin/sh\n"},
        {"run.sh": 0o755},
    )
    (root / ".git").mkdir()
    (root / ".git" / "config").write_text("[core]\n")
    return root, outside, sibling


def _abs(outside: Path, name: str) -> bytes:
    return str(outside / name).encode()


# name -> (setup(root, outside, sibling), patch bytes(root, outside, tmp), expected error, message words)
HOSTILE = {
    "traversal-add": (None, lambda r, o, t: HEAD + add_file(b"../outside-target/evil.py"), PatchError, ["'..'"]),
    "traversal-deep": (
        None,
        lambda r, o, t: HEAD + modify_file(b"pkg/../../outside-target/real.py", b"secret = 1", b"secret = 2"),
        PatchError,
        ["refused"],
    ),
    "absolute-add": (None, lambda r, o, t: HEAD + add_file(_abs(o, "evil.py")), PatchError, ["absolute path"]),
    "absolute-no-prefix": (
        None,
        lambda r, o, t: (
            HEAD
            + modify_file(b"x", b"secret = 1", b"secret = 2")
            .replace(b"--- a/x", b"--- " + _abs(o, "real.py"))
            .replace(b"+++ b/x", b"+++ " + _abs(o, "real.py"))
        ),
        PatchError,
        ["prefix"],
    ),
    "git-metadata": (
        None,
        lambda r, o, t: HEAD + modify_file(b".git/config", b"[core]", b"[core] evil"),
        PatchError,
        ["git metadata"],
    ),
    "symlink-dir-add": (
        lambda r, o, s: os.symlink(o, r / "link"),
        lambda r, o, t: HEAD + add_file(b"link/evil.py"),
        PatchError,
        ["symlink link"],
    ),
    "symlink-dir-modify": (
        lambda r, o, s: os.symlink(o, r / "link"),
        lambda r, o, t: HEAD + modify_file(b"link/target.py", b"t = 1", b"t = 2"),
        PatchError,
        ["symlink link"],
    ),
    "symlink-relative-sibling": (
        lambda r, o, s: os.symlink("../sibling", r / "pkg" / "lib"),
        lambda r, o, t: HEAD + modify_file(b"pkg/lib/lib.py", b"lib = 1", b"lib = 2"),
        PatchError,
        ["symlink pkg/lib"],
    ),
    "symlink-file": (
        lambda r, o, s: os.symlink(o / "real.py", r / "conf.py"),
        lambda r, o, t: HEAD + modify_file(b"conf.py", b"secret = 1", b"secret = 2"),
        PatchError,
        ["symlink conf.py"],
    ),
    "symlink-file-delete": (
        lambda r, o, s: os.symlink(o / "target.py", r / "conf.py"),
        lambda r, o, t: (
            HEAD + b"diff --git a/conf.py b/conf.py\ndeleted file mode 100644\n"
            b"index " + O40 + b".." + Z40 + b"\n--- a/conf.py\n+++ /dev/null\n@@ -1 +0,0 @@\n-t = 1\n"
        ),
        PatchError,
        ["symlink conf.py"],
    ),
    "symlink-dangling-add": (
        lambda r, o, s: os.symlink(o / "new.py", r / "new.py"),
        lambda r, o, t: HEAD + add_file(b"new.py"),
        PatchError,
        ["symlink new.py"],
    ),
    "symlink-create": (
        None,
        lambda r, o, t: HEAD + add_file(b"evil", _abs(o, "real.py") + b"\n", b"120000"),
        PatchError,
        ["symlink"],
    ),
    "through-a-file": (None, lambda r, o, t: HEAD + add_file(b"ok.py/evil.py"), PatchError, ["ok.py is not a folder"]),
    "folder-as-file": (
        None,
        lambda r, o, t: HEAD + modify_file(b"pkg", b"x", b"y"),
        PatchError,
        ["not a regular file"],
    ),
    "counts-too-many": (
        None,
        lambda r, o, t: HEAD + modify_file(b"ok.py", b"ok = 1", b"ok = 2") + b"+more\n",
        PatchError,
        ["longer than its header"],
    ),
    "counts-too-few": (
        None,
        lambda r, o, t: HEAD + modify_file(b"ok.py", b"ok = 1", b"ok = 2").replace(b"@@ -1 +1 @@", b"@@ -1,2 +1,2 @@"),
        PatchError,
        ["ends early"],
    ),
    "wrong-pin": (
        None,
        lambda r, o, t: make_patch(
            {"pkg/mod.py": "x = 1\ny = 20\nz = 3\n"}, {"pkg/mod.py": "x = 1\ny = 21\nz = 3\n"}, t
        ),
        ApplyError,
        ["pkg/mod.py", "hunk 1", "does not apply to Toy 1.0"],
    ),
    "missing-file": (
        None,
        lambda r, o, t: make_patch({"pkg/nope.py": "a\n"}, {"pkg/nope.py": "b\n"}, t),
        ApplyError,
        ["pkg/nope.py", "does not exist in Toy 1.0"],
    ),
    "add-existing": (
        None,
        lambda r, o, t: make_patch({"x": "x\n"}, {"ok.py": "ok = 1\n"}, t),
        ApplyError,
        ["ok.py", "already exists in Toy 1.0"],
    ),
    "delete-differs": (
        None,
        lambda r, o, t: make_patch({"pkg/mod.py": "x = 1\ny = 2\n"}, {"pkg/mod.py": None}, t),
        ApplyError,
        ["pkg/mod.py", "does not apply"],
    ),
    "delete-changed-line": (
        None,
        lambda r, o, t: make_patch({"pkg/mod.py": "x = 1\ny = 9\nz = 3\n"}, {"pkg/mod.py": None}, t),
        ApplyError,
        ["pkg/mod.py"],
    ),
    "delete-nonempty-as-empty": (
        None,
        lambda r, o, t: (
            HEAD + b"diff --git a/ok.py b/ok.py\ndeleted file mode 100644\nindex " + O40 + b".." + Z40 + b"\n"
        ),
        ApplyError,
        ["ok.py", "more content"],
    ),
    "crlf-whole": (
        None,
        lambda r, o, t: make_patch({"ok.py": "ok = 1\n"}, {"ok.py": "ok = 2\n"}, t).replace(b"\n", b"\r\n"),
        PatchError,
        ["CRLF"],
    ),
    "crlf-hunk-body": (
        None,
        lambda r, o, t: re.sub(
            rb"(?m)^([ +-](?!--|\+\+).*)\n",
            rb"\1\r\n",
            make_patch({"pkg/mod.py": "x = 1\ny = 2\nz = 3\n"}, {"pkg/mod.py": "x = 1\ny = 5\nz = 3\n"}, t),
        ),
        ApplyError,
        ["pkg/mod.py", "hunk 1"],
    ),
    "second-file-bad": (
        None,
        lambda r, o, t: HEAD + modify_file(b"ok.py", b"ok = 1", b"ok = 2") + add_file(b"pkg/../../outside-target/x.py"),
        PatchError,
        ["refused"],
    ),
}


@pytest.mark.parametrize("flow", FLOWS)
@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_patch_is_refused_and_writes_nothing(tmp_path, arena, case, flow):
    root, outside, sibling = arena
    setup, make, error, words = HOSTILE[case]
    if setup:
        setup(root, outside, sibling)
    if case not in _GENERATED or b"outside" in _GENERATED[case]:
        _GENERATED[case] = make(root, outside, tmp_path / "gen")
    data = _GENERATED[case]
    before = {p: snapshot(p) for p in (root, outside, sibling)}
    outer = sorted(os.listdir(tmp_path))
    dest = tmp_path / "dest"
    with pytest.raises(FlagScaleError) as info:
        patches = [parse_patch(data, "0042-evil.patch")]
        if flow is in_place:
            write_plan(plan_patches(root, patches, pin_label="Toy 1.0"), root)
        else:
            apply_to_new_tree(
                plan_patches(root, patches, pin_label="Toy 1.0"), root, dest, link=flow is new_tree_linked
            )
    assert type(info.value) is error
    assert_one_line(info.value, "0042-evil.patch", *words)
    assert {p: snapshot(p) for p in (root, outside, sibling)} == before
    assert sorted(os.listdir(tmp_path)) == outer
    assert not (tmp_path / "evil.py").exists() and not Path("/evil.py").exists()


def test_hard_link_to_outside_is_not_written_through(tmp_path):
    outside = write_tree(tmp_path / "outside", {"shared.py": "v = 1\n"})
    root = tmp_path / "root"
    root.mkdir()
    os.link(outside / "shared.py", root / "shared.py")
    plan = plan_patches(root, [parse(make_patch({"shared.py": "v = 1\n"}, {"shared.py": "v = 2\n"}, tmp_path))])
    write_plan(plan, root)
    assert (root / "shared.py").read_text() == "v = 2\n"
    assert (outside / "shared.py").read_text() == "v = 1\n"


# --- 4. differential against `git apply` -----------------------------------------------------------

VOCAB = [
    "\n",
    "a\n",
    "b\n",
    "pass\n",
    "    return x\n",
    "}\n",
    "x = 1\n",
    "# note\n",
    "trailing  \n",
    "\tindent\n",
    "--- not a header\n",
    "+++ nor this\n",
    "@@ nor this @@\n",
    "\\ backslash\n",
    "-- \n",
]


def random_lines(rng: random.Random, n: int) -> list[str]:
    return [rng.choice(VOCAB) if rng.random() < 0.6 else f"u{rng.randrange(10**6)}\n" for _ in range(n)]


def join(lines: list[str], newline: bool) -> bytes:
    text = "".join(lines)
    return (text if newline or not text else text[:-1]).encode()


def random_base(rng: random.Random) -> tuple[dict[str, bytes], dict[str, int]]:
    files, modes = {}, {}
    for i in range(rng.randint(2, 6)):
        path = rng.choice(["", "pkg/", "pkg/sub/", "other/"]) + f"f{i}.{rng.choice(['py', 'txt', 'sh'])}"
        if rng.random() < 0.3:  # a repeated block: hunks match in many places, so search order matters
            block = [f"p{j}\n" for j in range(rng.choice([2, 3, 4, 6]))]
            lines = random_lines(rng, rng.randint(0, 5)) + block * rng.randint(6, 15) + random_lines(rng, 3)
        else:
            lines = random_lines(rng, rng.choice([0, 1, 2, 5, 12, 30, 40, 60, 80, 120]))
        files[path] = join(lines, rng.random() < 0.8)
        if rng.random() < 0.25:
            modes[path] = 0o755
    return files, modes


def random_edit(rng: random.Random, content: bytes) -> bytes:
    lines = content.decode().splitlines(keepends=True)
    newline = not lines or lines[-1].endswith("\n")
    for _ in range(rng.randint(1, 4)):
        kind = rng.choice(["insert", "delete", "replace"] * 3 + ["start", "end", "newline"])
        at = rng.randint(0, len(lines))
        if kind == "insert":
            lines[at:at] = random_lines(rng, rng.randint(1, 4))
        elif kind == "delete" and lines:
            del lines[at : at + rng.randint(1, 3)]
        elif kind == "replace" and lines:
            lines[at : at + rng.randint(1, 3)] = random_lines(rng, rng.randint(1, 3))
        elif kind == "start":
            lines[0 : rng.randint(0, 2)] = random_lines(rng, rng.randint(0, 2))
        elif kind == "end":
            lines[len(lines) - rng.randint(0, min(2, len(lines))) :] = random_lines(rng, rng.randint(0, 2))
        else:
            newline = not newline
        lines = [line if line.endswith("\n") else line + "\n" for line in lines]
    return join(lines, newline)


def random_change(rng: random.Random, files: dict[str, bytes], modes: dict[str, int]):
    changed: dict[str, bytes | None] = {}
    new_modes: dict[str, int] = {}
    for path, content in files.items():
        roll = rng.random()
        if roll < 0.45:
            changed[path] = random_edit(rng, content)
        elif roll < 0.55:
            changed[path] = None
        if changed.get(path, b"") is not None and rng.random() < 0.15:
            new_modes[path] = 0o644 if modes.get(path) == 0o755 else 0o755
    for i in range(rng.choice([0, 0, 1, 2])):
        path = rng.choice(["", "pkg/", "newdir/", "newdir/deep/"]) + f"new{i}.txt"
        changed[path] = join(random_lines(rng, rng.choice([0, 1, 3, 8])), rng.random() < 0.8)
        if rng.random() < 0.3:
            new_modes[path] = 0o755
    changed = {p: c for p, c in changed.items() if c is None or c != files.get(p)}
    if not changed and not new_modes:
        path = sorted(files)[0]
        changed[path] = (
            files[path] + b"forced\n" if files[path].endswith(b"\n") or not files[path] else files[path] + b"\nforced\n"
        )
    return changed, new_modes


def variants(rng: random.Random, files: dict[str, bytes], changed: dict) -> dict[str, dict[str, bytes]]:
    """The base tree and drifted copies of it: lines added or removed away from or near the hunks."""

    def drift(fn):  # each file drifts or not, so that some drifted variants still apply
        return {p: fn(p, c) if rng.random() < 0.5 else c for p, c in files.items()}

    def lines_of(content: bytes) -> list[bytes]:
        return content.splitlines(keepends=True)

    touched = sorted(p for p in changed if p in files) or sorted(files)
    victim = rng.choice(touched)
    out = {
        "exact": dict(files),
        "prepend": drift(lambda p, c: b"".join(random_lines_b(rng, rng.randint(1, 7))) + c),
        "drop-top": drift(lambda p, c: b"".join(lines_of(c)[rng.randint(1, 3) :])),
        "insert-middle": drift(
            lambda p, c: b"".join(
                (lambda ls, at: ls[:at] + random_lines_b(rng, 3) + ls[at:])(
                    lines_of(c), rng.randint(0, len(lines_of(c)))
                )
            )
        ),
        "line-changed": {**files, victim: _change_one_line(rng, files[victim])},
        "file-missing": {p: c for p, c in files.items() if p != victim},
    }
    new = [p for p, c in changed.items() if p not in files]
    if new:
        out["new-exists"] = {**files, new[0]: b"already here\n"}
    return out


def random_lines_b(rng: random.Random, n: int) -> list[bytes]:
    return [line.encode() for line in random_lines(rng, n)]


def _change_one_line(rng: random.Random, content: bytes) -> bytes:
    lines = content.splitlines(keepends=True)
    if not lines:
        return b"now not empty\n"
    at = rng.randrange(len(lines))
    lines[at] = b"CHANGED " + lines[at]
    return b"".join(lines)


def git_apply(tree: Path, patch: Path) -> tuple[bool, dict[tuple[str, int], int], str]:
    env = {**GIT_ENV, "GIT_CEILING_DIRECTORIES": str(tree.parent)}
    result = subprocess.run(
        ["git", "apply", "--verbose", "--whitespace=nowarn", str(patch)],
        cwd=tree,
        capture_output=True,
        text=True,
        env=env,
    )
    offsets, current = {}, None
    for line in result.stderr.splitlines():
        if m := re.match(r"Checking patch (.*)\.\.\.$", line):
            current = m[1]
        elif m := re.match(r"Hunk #(\d+) succeeded at \d+ \(offset (-?\d+) lines?\)\.$", line):
            offsets[(current, int(m[1]))] = int(m[2])
    return result.returncode == 0, offsets, result.stderr


def ours(tree: Path, dest: Path, patch: Patch):
    try:
        plan = plan_patches(tree, [patch])
        apply_to_new_tree(plan, tree, dest)
    except FlagScaleError as exc:
        assert "\n" not in str(exc)
        return False, {}, str(exc), None
    return True, {(p.path, p.hunk): p.offset for p in plan.offsets()}, "", plan


def hunks_over_earlier_output(plan, patch: Patch) -> list[tuple[str, int]]:
    """Hunks our engine placed over lines an earlier hunk of the same file wrote (git refuses that)."""
    hunks = {(f.path, h.number): h for f in patch.files for h in f.hunks}
    written: dict[str, list[tuple[int, int]]] = {}
    found = []
    for placement in plan.placements:
        hunk = hunks[(placement.path, placement.hunk)]
        at = (hunk.new_start - 1 if hunk.new_start else 0) + placement.offset
        old, new = len(hunk.old_lines), len(hunk.new_lines)
        spans = written.setdefault(placement.path, [])
        if any(start < at + old and at < end for start, end in spans):
            found.append((placement.path, placement.hunk))
        spans[:] = [(s + new - old, e + new - old) if s >= at + old else (s, e) for s, e in spans] + [(at, at + new)]
    return found


def test_differential_against_git_apply(tmp_path):
    stats = {"agree-applied": 0, "agree-failed": 0, "offsets": 0, "known-overlap-bug": 0}
    for seed in range(30):
        rng = random.Random(seed)
        files, modes = random_base(rng)
        changed, new_modes = random_change(rng, files, modes)
        work = tmp_path / f"seed{seed}"
        data = real_patch(work, files, changed, new_modes, modes)
        patch = parse_patch(data, "random.patch")
        patch_file = work / "random.patch"
        patch_file.write_bytes(data)
        for name, tree_files in variants(rng, files, changed).items():
            label = f"seed {seed}, {name}"
            tree = make_tree(work / f"{name}-src", tree_files, {p: m for p, m in modes.items() if p in tree_files})
            theirs_dir = work / f"{name}-git"
            shutil.copytree(tree, theirs_dir, symlinks=True)
            source_before = snapshot(tree)
            ok_git, git_offsets, git_err = git_apply(theirs_dir, patch_file)
            ok_ours, our_offsets, our_err, plan = ours(tree, work / f"{name}-ours", patch)
            assert snapshot(tree) == source_before, label
            assert plan is None or not hunks_over_earlier_output(plan, patch), label
            assert ok_git == ok_ours, (
                f"{label}: git {'applied' if ok_git else 'failed: ' + git_err}, "
                f"we {'applied' if ok_ours else 'failed: ' + our_err}\n{data.decode()}"
            )
            if ok_git:
                assert content_view(work / f"{name}-ours") == content_view(theirs_dir), label
                assert folders(work / f"{name}-ours") == folders(theirs_dir), label
                assert our_offsets == git_offsets, label
                stats["agree-applied"] += 1
                stats["offsets"] += bool(git_offsets)
            else:
                assert not (work / f"{name}-ours").exists(), label
                stats["agree-failed"] += 1
        shutil.rmtree(work)
    # the generator must exercise all three outcomes, or the comparison proves little
    assert stats["agree-applied"] >= 40 and stats["agree-failed"] >= 30 and stats["offsets"] >= 10, stats


def test_hunk_output_is_not_matched_again_by_a_later_hunk_helper(tmp_path):
    """The overlap detector used above finds exactly the overlap case (and not a normal apply)."""
    base = b"h\n" + b"p\n" * 20 + b"t\n"
    lines = base.splitlines(keepends=True)
    data = real_patch(
        tmp_path / "gen",
        {"f.txt": base},
        {"f.txt": b"".join(lines[:4] + [b"X\n"] + lines[4:14] + [b"Y\n"] + lines[14:])},
    )
    patch = parse(data)
    exact = make_tree(tmp_path / "exact", {"f.txt": base})
    assert hunks_over_earlier_output(plan_patches(exact, [patch]), patch) == []
    short = make_tree(tmp_path / "short", {"f.txt": b"h\n" + b"p\n" * 10 + b"t\n"})
    try:
        plan = plan_patches(short, [patch])
    except ApplyError:
        return  # the engine refuses, as git does
    assert hunks_over_earlier_output(plan, patch) == [("f.txt", 2)]


def test_hunk_may_not_match_over_an_earlier_hunks_output(tmp_path):
    base = b"h\n" + b"p\n" * 20 + b"t\n"
    lines = base.splitlines(keepends=True)
    data = real_patch(
        tmp_path / "gen",
        {"f.txt": base},
        {"f.txt": b"".join(lines[:4] + [b"X\n"] + lines[4:14] + [b"Y\n"] + lines[14:])},
    )
    tree = make_tree(tmp_path / "tree", {"f.txt": b"h\n" + b"p\n" * 10 + b"t\n"})
    theirs = tmp_path / "git"
    shutil.copytree(tree, theirs)
    (tmp_path / "f.patch").write_bytes(data)
    ok_git, _, _ = git_apply(theirs, tmp_path / "f.patch")
    assert not ok_git  # hunk 2 only matches over hunk 1's output: git refuses
    try:
        plan = plan_patches(tree, [parse(data)])
    except ApplyError:
        return
    raise AssertionError(f"the engine applied what git refuses: {plan.placements}")  # hunk 2 at offset -6


# --- 5. write_plan rollback ------------------------------------------------------------------------


def test_write_plan_rolls_back_on_os_error(tmp_path):
    base = {"a_gone/only.py": b"only\n", "c.py": b"c1\nc2\n", "d.py": b"d1\nd2\n", "e.py": b"e\n"}
    data = real_patch(
        tmp_path / "gen",
        base,
        {"a_gone/only.py": None, "b_new/deep/n.py": b"new\n", "c.py": b"c1\nC2\n", "d.py": b"d1\nD2\n", "e.py": b"E\n"},
        modes={"c.py": 0o755},
    )
    patch = parse(data)
    assert [f.path for f in patch.files] == ["a_gone/only.py", "b_new/deep/n.py", "c.py", "d.py", "e.py"]
    root = make_tree(tmp_path / "tree", base)
    plan = plan_patches(root, [patch])
    os.link(root / "d.py", tmp_path / "d-elsewhere.py")  # linked: d.py gets a new inode, written beside it ...
    (root / ".d.py.fs-tmp").mkdir()  # ... under this temp name, where open() fails
    before = snapshot(root)
    with pytest.raises(ApplyError) as info:
        write_plan(plan, root)
    assert_one_line(info.value, "writing the patched tree failed", ".d.py.fs-tmp", "restored to its previous state")
    assert snapshot(root) == before  # a_gone/ and only.py back, b_new/ gone, c.py content and mode back
    (root / ".d.py.fs-tmp").rmdir()
    write_plan(plan, root)  # the same plan still applies once the obstacle is gone
    assert content_view(root) == {
        "b_new/deep/n.py": (b"new\n", False),
        "c.py": (b"c1\nC2\n", True),
        "d.py": (b"d1\nD2\n", False),
        "e.py": (b"E\n", False),
    }
    assert not (root / "a_gone").exists()


def test_write_plan_rollback_of_first_file(tmp_path):
    base = {"a.py": b"a\n", "b.py": b"b\n"}
    root = make_tree(tmp_path / "tree", base)
    plan = plan_patches(root, [parse(real_patch(tmp_path / "gen", base, {"a.py": b"A\n", "b.py": b"B\n"}))])
    os.link(root / "b.py", tmp_path / "b-elsewhere.py")
    (root / ".b.py.fs-tmp").mkdir()
    with pytest.raises(ApplyError, match="restored"):
        write_plan(plan, root)
    assert (root / "a.py").read_bytes() == b"a\n" and (root / "b.py").read_bytes() == b"b\n"
    assert not (root / ".a.py.fs-tmp").exists()


def test_write_plan_rewrites_own_files_in_place_and_never_writes_through_a_link(tmp_path):
    base = {"own.py": b"o1\no2\n", "linked.py": b"l1\nl2\n", "mode.sh": b"#!/bin/sh\n"}
    root = make_tree(tmp_path / "tree", base)
    os.link(root / "linked.py", tmp_path / "partner.py")
    inodes = {p: os.stat(root / p).st_ino for p in base}
    data = real_patch(
        tmp_path / "gen",
        base,
        {"own.py": b"o1\n", "linked.py": b"l1\nL2\nl3\n", "new/n.py": b"n\n"},
        modes={"mode.sh": 0o755},
    )
    write_plan(plan_patches(root, [parse(data)]), root)
    assert content_view(root) == {
        "own.py": (b"o1\n", False),  # shorter: cut at the new end
        "linked.py": (b"l1\nL2\nl3\n", False),
        "mode.sh": (b"#!/bin/sh\n", True),
        "new/n.py": (b"n\n", False),
    }
    assert os.stat(root / "own.py").st_ino == inodes["own.py"]  # in place: no inode to allocate
    assert os.stat(root / "mode.sh").st_ino == inodes["mode.sh"]
    assert os.stat(root / "linked.py").st_ino != inodes["linked.py"]  # a new inode ...
    assert (tmp_path / "partner.py").read_bytes() == b"l1\nl2\n"  # ... so the other link is untouched
    assert not list(root.rglob("*.fs-tmp"))


# --- 6. apply_to_new_tree with hard links ----------------------------------------------------------


@pytest.mark.parametrize("link", [True, False])
def test_new_tree_links_only_unchanged_files(tmp_path, link):
    base = {
        "same.py": b"same\n",
        "pkg/same2.py": b"s2\n",
        "edit.py": b"e1\ne2\n",
        "mode.sh": b"#!/bin/sh\n",
        "gone.py": b"g\n",
    }
    source = make_tree(tmp_path / "src", base)
    data = real_patch(
        tmp_path / "gen",
        base,
        {"edit.py": b"e1\nE2\n", "gone.py": None, "pkg/new.py": b"n\n"},
        modes={"mode.sh": 0o755},
    )
    before = snapshot(source)
    inodes = {p: os.stat(source / p).st_ino for p in base}
    dest = tmp_path / "cache" / "tree"
    apply_to_new_tree(plan_patches(source, [parse(data)]), source, dest, link=link)
    assert snapshot(source) == before
    assert {p: os.stat(source / p).st_ino for p in base} == inodes
    assert content_view(dest) == {
        "same.py": (b"same\n", False),
        "pkg/same2.py": (b"s2\n", False),
        "edit.py": (b"e1\nE2\n", False),
        "mode.sh": (b"#!/bin/sh\n", True),
        "pkg/new.py": (b"n\n", False),
    }
    for path in ("same.py", "pkg/same2.py"):
        assert (os.stat(dest / path).st_ino == inodes[path]) is link, path
    for path in ("edit.py", "mode.sh"):
        assert os.stat(dest / path).st_ino != inodes[path], path
    assert os.stat(source / "mode.sh").st_mode & 0o111 == 0
    assert leftovers(dest.parent, dest.name) == []
