"""The strict `git format-patch` parser: what it reads, and what it refuses (with a one-line message
that names the patch file and the patch line)."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest
from conftest import git, make_patch, write_tree

from flagscale.errors import FlagScaleError, PatchError
from flagscale.patches.patchfile import parse_patch, read_patch

HEADER = (
    b"From 0000000000000000000000000000000000000000 Mon Sep 17 00:00:00 2001\n"
    b"From: Jane Developer <jane@example.org>\n"
    b"Date: Mon, 23 Nov 2026 00:00:00 +0000\n"
    b"Subject: [PATCH] toy: hand written\n"
    b"\n"
    b"Why.\n"
    b"\n"
    b"Upstream-Status: Pending\n"
    b"Drop-When: never\n"
    b"---\n"
)
IDX = b"index " + b"1" * 40 + b".." + b"2" * 40 + b" 100644\n"


def hand(*sections: bytes) -> bytes:
    return HEADER + b"".join(sections)


def modify(path: bytes, *hunks: bytes) -> bytes:
    return (
        b"diff --git a/"
        + path
        + b" b/"
        + path
        + b"\n"
        + IDX
        + b"--- a/"
        + path
        + b"\n+++ b/"
        + path
        + b"\n"
        + b"".join(hunks)
    )


SIMPLE_HUNK = b"@@ -1,3 +1,3 @@\n one\n-two\n+TWO\n three\n"


def format_patch(
    tmp: Path, base: dict[str, bytes], changed: dict[str, bytes | None], chmod: dict[str, int] | None = None
) -> bytes:
    """A real format-patch of base -> changed, with optional mode changes."""
    return make_patch(base, changed, tmp, body="Body.", chmod=chmod)


def refused(data: bytes, name: str = "0001-hostile.patch") -> str:
    with pytest.raises(PatchError) as info:
        parse_patch(data, name)
    message = str(info.value)
    assert isinstance(info.value, FlagScaleError)
    assert "\n" not in message, message
    assert message.startswith(name + ":"), message
    return message


def line_of(data: bytes, needle: bytes) -> int:
    """1-based line number of the first line of `data` starting with `needle`."""
    for number, line in enumerate(data.split(b"\n"), 1):
        if line.startswith(needle):
            return number
    raise AssertionError(f"{needle!r} not in patch")


# --- headers and body ------------------------------------------------------------------------------


def test_real_format_patch_headers_body_and_trailers(tmp_path):
    data = make_patch(
        {"a.py": "x = 1\n"},
        {"a.py": "x = 2\n"},
        tmp_path,
        subject="toy: set x",
        body="x must be two on this device.",
        status="Submitted https://example.org/pr/1",
        drop="upstream sets x itself",
    )
    (tmp_path / "0001-toy-set-x.patch").write_bytes(data)
    patch = read_patch(tmp_path / "0001-toy-set-x.patch")
    assert patch.name == "0001-toy-set-x.patch"
    assert patch.data == data
    assert patch.headers["From"] == "Test <test@example.org>"
    assert patch.headers["Date"] == "Tue, 14 Nov 2023 22:13:20 +0000"
    assert patch.headers["Subject"] == "[PATCH] toy: set x"
    assert patch.subject == "toy: set x"
    assert patch.body.startswith("x must be two on this device.")
    assert "diff --git" not in patch.body and "@@" not in patch.body
    assert patch.trailer("Upstream-Status") == "Submitted https://example.org/pr/1"
    assert patch.trailer("Drop-When") == "upstream sets x itself"
    assert patch.trailer("Signed-off-by") is None
    assert [(f.path, f.op) for f in patch.files] == [("a.py", "modify")]
    assert len(patch.sha256) == 64


def test_folded_subject_and_body_stops_at_separator():
    data = (
        b"From 0000000000000000000000000000000000000000 Mon Sep 17 00:00:00 2001\n"
        b"From: Jane Developer <jane@example.org>\n"
        b"Date: Mon, 23 Nov 2026 00:00:00 +0000\n"
        b"Subject: [PATCH v2 3/7] megatron: a subject long enough that the mailer\n"
        b" folds it onto a second line\n"
        b"\n"
        b"First paragraph.\n"
        b"\n"
        b"Upstream-Status:   Inappropriate [device specific]   \n"
        b"Drop-When: never\n"
        b"---\n"
        b" Notes after the separator are not part of the body.\n"
        b" Drop-When: not this one\n"
        b"\n" + modify(b"m.py", SIMPLE_HUNK)
    )
    patch = parse_patch(data, "0003-m.patch")
    assert patch.headers["Subject"] == (
        "[PATCH v2 3/7] megatron: a subject long enough that the mailer folds it onto a second line"
    )
    assert patch.subject == "megatron: a subject long enough that the mailer folds it onto a second line"
    assert patch.headers["From"] == "Jane Developer <jane@example.org>"
    assert patch.headers["Date"] == "Mon, 23 Nov 2026 00:00:00 +0000"
    assert patch.body == "First paragraph.\n\nUpstream-Status:   Inappropriate [device specific]   \nDrop-When: never"
    assert "Notes" not in patch.body
    assert patch.trailer("Upstream-Status") == "Inappropriate [device specific]"
    assert patch.trailer("Drop-When") == "never"


def test_body_without_separator_ends_at_the_diff_and_trailer_needs_line_start():
    data = (
        b"From: J <j@example.org>\nSubject: [PATCH] x\n\nBody line.\n"
        b"See also X-Drop-When: not a trailer\n\n" + modify(b"m.py", SIMPLE_HUNK)
    )
    patch = parse_patch(data, "x.patch")
    assert patch.body == "Body line.\nSee also X-Drop-When: not a trailer"
    assert patch.trailer("Drop-When") is None
    assert patch.subject == "x"


def test_bare_git_diff_has_no_headers():
    patch = parse_patch(modify(b"m.py", SIMPLE_HUNK), "bare.patch")
    assert patch.headers == {}
    assert patch.body == ""
    assert patch.subject == ""
    assert patch.trailer("Upstream-Status") is None


# --- hunks -----------------------------------------------------------------------------------------


def test_hunk_lines_counts_and_context():
    data = hand(modify(b"m.py", b"@@ -2,4 +2,5 @@ def f():\n a\n b\n-c\n+C\n+D\n d\n", b"@@ -10 +11 @@\n-x\n+y\n"))
    (change,) = parse_patch(data, "h.patch").files
    assert (change.path, change.op, change.old_mode, change.new_mode) == ("m.py", "modify", None, None)
    first, second = change.hunks
    assert (first.number, first.old_start, first.old_len, first.new_start, first.new_len) == (1, 2, 4, 2, 5)
    assert first.header == "@@ -2,4 +2,5 @@ def f():"
    assert first.old_lines == (b"a\n", b"b\n", b"c\n", b"d\n")
    assert first.new_lines == (b"a\n", b"b\n", b"C\n", b"D\n", b"d\n")
    assert (first.leading, first.trailing) == (2, 1)
    assert first.patch_line == line_of(data, b"@@ -2,4")
    # counts without ',N' mean 1
    assert (second.number, second.old_start, second.old_len, second.new_start, second.new_len) == (2, 10, 1, 11, 1)
    assert second.old_lines == (b"x\n",) and second.new_lines == (b"y\n",)
    assert (second.leading, second.trailing) == (0, 0)
    assert change.patch_line == line_of(data, b"diff --git")


def test_real_single_line_file_uses_counts_without_comma(tmp_path):
    data = format_patch(tmp_path, {"one.txt": b"old\n"}, {"one.txt": b"new\n"})
    assert b"@@ -1 +1 @@" in data
    (hunk,) = parse_patch(data, "p.patch").files[0].hunks
    assert (hunk.old_len, hunk.new_len, hunk.old_lines, hunk.new_lines) == (1, 1, (b"old\n",), (b"new\n",))


@pytest.mark.parametrize(
    "old, new, want_old, want_new",
    [
        # old side lacks the final newline, new side adds it
        (b"a\nb", b"a\nb\nc\n", (b"a\n", b"b"), (b"a\n", b"b\n", b"c\n")),
        # new side lacks the final newline
        (b"a\nb\n", b"a\nB", (b"a\n", b"b\n"), (b"a\n", b"B")),
        # both sides lack it and the last line changes
        (b"a\nb", b"a\nB", (b"a\n", b"b"), (b"a\n", b"B")),
        # both sides lack it and the last line is unchanged context
        (b"a\nb\nc", b"A\nb\nc", (b"a\n", b"b\n", b"c"), (b"A\n", b"b\n", b"c")),
    ],
    ids=["old-side", "new-side", "both-changed", "both-context"],
)
def test_no_newline_at_end_of_file(tmp_path, old, new, want_old, want_new):
    data = format_patch(tmp_path, {"f.txt": old}, {"f.txt": new})
    assert b"\\ No newline at end of file" in data
    (hunk,) = parse_patch(data, "nl.patch").files[0].hunks
    assert hunk.old_lines == want_old
    assert hunk.new_lines == want_new


def test_new_and_deleted_files(tmp_path):
    data = format_patch(
        tmp_path,
        {"gone.py": b"1\n2\n", "keep.py": b"k\n"},
        {"gone.py": None, "pkg/new.py": b"n1\nn2\n", "pkg/empty.py": b""},
    )
    files = {f.path: f for f in parse_patch(data, "nd.patch").files}
    assert set(files) == {"gone.py", "pkg/new.py", "pkg/empty.py"}
    gone, new, empty = files["gone.py"], files["pkg/new.py"], files["pkg/empty.py"]
    assert (gone.op, gone.old_mode, gone.new_mode) == ("delete", "100644", None)
    assert gone.hunks[0].old_lines == (b"1\n", b"2\n") and gone.hunks[0].new_lines == ()
    assert (new.op, new.old_mode, new.new_mode) == ("add", None, "100644")
    assert (new.hunks[0].old_start, new.hunks[0].old_len) == (0, 0)
    assert new.hunks[0].new_lines == (b"n1\n", b"n2\n")
    # an empty new file has no ---/+++ lines: its name comes from the diff --git line
    assert (empty.op, empty.new_mode, empty.hunks) == ("add", "100644", ())


def test_mode_change_alone_and_with_content(tmp_path):
    data = format_patch(
        tmp_path,
        {"run.sh": b"#!/bin/sh\n", "tool.sh": b"#!/bin/sh\necho a\n"},
        {"tool.sh": b"#!/bin/sh\necho b\n"},
        chmod={"run.sh": 0o755, "tool.sh": 0o755},
    )
    files = {f.path: f for f in parse_patch(data, "mode.patch").files}
    run, tool = files["run.sh"], files["tool.sh"]
    assert (run.op, run.old_mode, run.new_mode, run.hunks) == ("modify", "100644", "100755", ())
    assert (tool.op, tool.old_mode, tool.new_mode) == ("modify", "100644", "100755")
    assert tool.hunks[0].new_lines == (b"#!/bin/sh\n", b"echo b\n")


def test_git_c_quoted_file_names(tmp_path):
    data = format_patch(
        tmp_path,
        {"t\u00e9st.py": b"x\n", 'q"t.py': b"y\n", "sp ace.py": b"z\n"},
        {"t\u00e9st.py": b"X\n", 'q"t.py': b"Y\n", "sp ace.py": b"Z\n"},
    )
    assert b'"a/t\\303\\251st.py"' in data and b'"a/q\\"t.py"' in data
    paths = sorted(f.path for f in parse_patch(data, "q.patch").files)
    assert paths == sorted(["t\u00e9st.py", 'q"t.py', "sp ace.py"])


def test_signature_and_blank_lines_between_files_are_accepted():
    data = hand(modify(b"a.py", SIMPLE_HUNK), b"\n", modify(b"b.py", SIMPLE_HUNK), b"-- \n2.43.0\n\n")
    assert [f.path for f in parse_patch(data, "sig.patch").files] == ["a.py", "b.py"]


# --- refusals --------------------------------------------------------------------------------------


def test_absolute_path_without_prefix_is_refused():
    data = hand(b"diff --git a/etc/passwd b/etc/passwd\n" + IDX + b"--- /etc/passwd\n+++ /etc/passwd\n" + SIMPLE_HUNK)
    message = refused(data)
    assert f"line {line_of(data, b'--- /etc')}:" in message
    assert "/etc/passwd" in message and "prefix" in message


@pytest.mark.parametrize("path", [b"/etc/x", b"/tmp/evil.py"])
def test_absolute_path_after_prefix_is_refused(path):
    data = hand(modify(path, SIMPLE_HUNK))
    assert b"--- a/" + path in data
    message = refused(data)
    assert "absolute path" in message and path.decode() in message
    assert f"line {line_of(data, b'--- a/')}:" in message


@pytest.mark.parametrize("path", [b"../evil.py", b"pkg/../../evil.py", b"pkg/./x.py", b"pkg//x.py", b".."])
def test_traversal_and_odd_components_are_refused(path):
    message = refused(hand(modify(path, SIMPLE_HUNK)))
    assert "refused" in message and path.decode() in message


def test_traversal_in_quoted_name_is_refused():
    data = hand(
        b'diff --git "a/\\056\\056/x" "b/\\056\\056/x"\n'
        + IDX
        + b'--- "a/\\056\\056/x"\n+++ "b/\\056\\056/x"\n'
        + SIMPLE_HUNK
    )
    assert "'../x' refused" in refused(data)


@pytest.mark.parametrize("path", [b".git/hooks/pre-commit", b"sub/.git/config", b".git"])
def test_git_metadata_is_refused(path):
    message = refused(hand(modify(path, SIMPLE_HUNK)))
    assert "git metadata" in message


def test_traversal_on_mode_only_change_is_refused():
    data = hand(b"diff --git a/../x.sh b/../x.sh\nold mode 100644\nnew mode 100755\n")
    assert "refused" in refused(data)


@pytest.mark.parametrize("mode, word", [(b"120000", "symlink"), (b"160000", "submodule")])
def test_symlink_and_submodule_creation_is_refused(mode, word):
    data = hand(
        b"diff --git a/link b/link\nnew file mode " + mode + b"\n"
        b"index 0000000000000000000000000000000000000000..1111111111111111111111111111111111111111\n"
        b"--- /dev/null\n+++ b/link\n@@ -0,0 +1 @@\n+/etc/passwd\n\\ No newline at end of file\n"
    )
    message = refused(data)
    assert word in message and f"line {line_of(data, b'new file mode')}:" in message


def test_real_symlink_patch_is_refused(tmp_path):
    repo = tmp_path / "sl"
    write_tree(repo, {"a.py": "a\n"})
    git(repo, "init", "-q")
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "base")
    os.symlink("/etc/passwd", repo / "evil")
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "link")
    data = git(repo, "format-patch", "--stdout", "-1").stdout.encode()
    assert b"new file mode 120000" in data
    assert "symlink" in refused(data)


def test_mode_change_to_symlink_is_refused():
    data = hand(b"diff --git a/x b/x\nold mode 100644\nnew mode 120000\n")
    assert "symlink" in refused(data)


def test_binary_patches_are_refused(tmp_path):
    git_binary = format_patch(tmp_path, {"a.py": b"a\n"}, {"blob.bin": bytes(range(256)) * 4})
    plain = subprocess.run(
        ["git", "-C", str(next(tmp_path.iterdir())), "diff", "HEAD~1", "HEAD"], check=True, capture_output=True
    ).stdout
    assert b"GIT binary patch" in git_binary and b"Binary files /dev/null and b/blob.bin differ" in plain
    for data in (git_binary, plain):
        message = refused(data)
        assert "binary" in message


@pytest.mark.parametrize(
    "ext",
    [
        b"similarity index 90%\nrename from a.py\nrename to b.py\n",
        b"rename from a.py\nrename to b.py\n",
        b"similarity index 100%\ncopy from a.py\ncopy to b.py\n",
        b"dissimilarity index 80%\n",
    ],
)
def test_renames_and_copies_are_refused(ext):
    data = hand(b"diff --git a/a.py b/b.py\n" + ext + b"--- a/a.py\n+++ b/b.py\n" + SIMPLE_HUNK)
    message = refused(data)
    assert "--no-renames" in message
    assert f"line {line_of(data, ext[:6])}:" in message


def test_rename_via_different_names_is_refused():
    data = hand(b"diff --git a/a.py b/b.py\n" + IDX + b"--- a/a.py\n+++ b/b.py\n" + SIMPLE_HUNK)
    assert "renames are not supported" in refused(data)


def test_real_rename_is_refused(tmp_path):
    repo = tmp_path / "rn"
    write_tree(repo, {"a.py": "".join(f"line {i}\n" for i in range(20))})
    git(repo, "init", "-q")
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "base")
    git(repo, "mv", "a.py", "b.py")
    git(repo, "commit", "-qm", "rename")
    data = git(repo, "format-patch", "--stdout", "-M", "-1").stdout.encode()
    assert b"rename from" in data
    assert "--no-renames" in refused(data)


def test_hunk_with_too_many_lines_is_refused():
    data = hand(modify(b"m.py", b"@@ -1,3 +1,3 @@\n one\n-two\n+TWO\n three\n four\n"))
    message = refused(data)
    assert "longer than its header says" in message and "3 old, 3 new" in message
    assert "m.py" in message and "hunk 1" in message


def test_hunk_with_too_many_lines_before_next_file_is_refused():
    data = hand(modify(b"m.py", b"@@ -1,2 +1,2 @@\n one\n-two\n+TWO\n three\n"), modify(b"n.py", SIMPLE_HUNK))
    assert "longer than its header says" in refused(data)


def test_hunk_with_too_few_lines_at_end_is_refused():
    data = hand(modify(b"m.py", b"@@ -1,4 +1,4 @@\n one\n-two\n+TWO\n three\n"))
    message = refused(data)
    assert "ends early" in message and "4 old and 4 new" in message
    assert f"line {line_of(data, b'@@ -1,4')}:" in message


def test_hunk_with_too_few_lines_before_next_file_is_refused():
    data = hand(modify(b"m.py", b"@@ -1,4 +1,4 @@\n one\n-two\n+TWO\n three\n"), modify(b"n.py", SIMPLE_HUNK))
    message = refused(data)
    assert "line counts do not match" in message and "1 old and 1 new" in message
    assert f"line {line_of(data, b'diff --git a/n.py')}:" in message


def test_real_patch_with_edited_counts_is_refused(tmp_path):
    data = make_patch(
        {"a.py": "".join(f"{i}\n" for i in range(30))},
        {"a.py": "".join(f"{i}\n" for i in range(30) if i != 15)},
        tmp_path,
    )
    header = re.search(rb"^@@ -(\d+),(\d+) \+(\d+),(\d+) @@", data, re.MULTILINE)
    o, ol, n, nl = (int(x) for x in header.groups())
    bigger = data.replace(header[0], f"@@ -{o},{ol + 1} +{n},{nl + 1} @@".encode())
    smaller = data.replace(header[0], f"@@ -{o},{ol - 1} +{n},{nl - 1} @@".encode())
    assert "ends early" in refused(bigger)
    assert "longer than its header says" in refused(smaller)


def test_malformed_hunk_header_is_refused():
    message = refused(hand(modify(b"m.py", b"@@ -1,x +1,3 @@\n one\n")))
    assert "malformed hunk header" in message


def test_crlf_damage_is_refused(tmp_path):
    data = make_patch({"a.py": "a\nb\n"}, {"a.py": "a\nB\n"}, tmp_path).replace(b"\n", b"\r\n")
    message = refused(data)
    assert "CRLF" in message and "dos2unix" in message
    assert f"line {line_of(data, b'diff --git')}:" in message


def test_crlf_damage_after_the_diff_line_is_refused():
    data = hand(
        b"diff --git a/m.py b/m.py\n" + (IDX + b"--- a/m.py\n+++ b/m.py\n").replace(b"\n", b"\r\n") + SIMPLE_HUNK
    )
    assert "CRLF" in refused(data)


def test_file_content_with_crlf_is_not_damage(tmp_path):
    data = make_patch({"w.bat": "a\r\nb\r\n"}, {"w.bat": "a\r\nB\r\n"}, tmp_path)
    (hunk,) = parse_patch(data, "crlf-content.patch").files[0].hunks
    assert hunk.new_lines == (b"a\r\n", b"B\r\n")


def test_empty_context_line_without_its_space_is_whitespace_damage(tmp_path):
    data = make_patch({"a.py": "a\n\nb\nc\n"}, {"a.py": "a\n\nB\nc\n"}, tmp_path)
    assert b"\n \n" in data
    damaged = data.replace(b"\n \n", b"\n\n", 1)
    message = refused(damaged)
    assert "whitespace damage" in message and "a.py" in message and "hunk 1" in message


def test_context_line_stripped_of_leading_space_is_refused(tmp_path):
    data = make_patch({"a.py": "alpha\nbeta\ngamma\n"}, {"a.py": "alpha\nBETA\ngamma\n"}, tmp_path)
    damaged = data.replace(b"\n alpha\n", b"\nalpha\n")
    assert damaged != data
    message = refused(damaged)
    assert "a.py" in message and "'alpha'" in message
    assert f"line {line_of(damaged, b'alpha')}:" in message


def test_text_between_file_diffs_is_refused():
    data = hand(modify(b"a.py", SIMPLE_HUNK), b"this line is not part of any diff\n", modify(b"b.py", SIMPLE_HUNK))
    message = refused(data)
    assert "unexpected text between file diffs" in message
    assert f"line {line_of(data, b'this line')}:" in message


def test_file_appearing_twice_is_refused():
    data = hand(modify(b"a.py", SIMPLE_HUNK), modify(b"a.py", SIMPLE_HUNK.replace(b"TWO", b"2")))
    message = refused(data)
    assert "a.py appears twice" in message
    diff_lines = [n for n, line in enumerate(data.split(b"\n"), 1) if line.startswith(b"diff --git")]
    assert f"line {diff_lines[1]}:" in message


def test_file_diff_without_hunks_or_mode_is_refused():
    assert "without hunks" in refused(hand(b"diff --git a/m.py b/m.py\n" + IDX, modify(b"n.py", SIMPLE_HUNK)))


def test_minus_without_plus_is_refused():
    assert "must be followed by '+++ '" in refused(hand(b"diff --git a/m.py b/m.py\n" + IDX + b"--- a/m.py\n"))


def test_dev_null_without_new_file_mode_is_refused():
    data = hand(b"diff --git a/n.py b/n.py\n" + IDX + b"--- /dev/null\n+++ b/n.py\n@@ -0,0 +1 @@\n+x\n")
    assert "new file mode" in refused(data)
    data = hand(b"diff --git a/n.py b/n.py\n" + IDX + b"--- a/n.py\n+++ /dev/null\n@@ -1 +0,0 @@\n-x\n")
    assert "deleted file mode" in refused(data)


def test_plain_diff_u_output_is_refused(tmp_path):
    write_tree(tmp_path, {"old/a.py": "a\nb\n", "new/a.py": "a\nB\n"})
    out = subprocess.run(["diff", "-u", "old/a.py", "new/a.py"], cwd=tmp_path, capture_output=True).stdout
    assert out.startswith(b"--- old/a.py")
    message = refused(out, "plain.diff")
    assert "not a git-style diff" in message and "git format-patch" in message


@pytest.mark.parametrize(
    "data",
    [b"", b"\n\n", b"From: J <j@example.org>\nSubject: [PATCH] nothing\n\nNo diff.\n"],
    ids=["empty", "blank", "headers-only"],
)
def test_patch_without_diff_is_refused(data):
    assert "contains no diff" in refused(data, "empty.patch")


def test_read_patch_names_the_file(tmp_path):
    (tmp_path / "0007-bad.patch").write_bytes(hand(modify(b"../x", SIMPLE_HUNK)))
    with pytest.raises(PatchError, match=r"^0007-bad\.patch: line \d+: "):
        read_patch(tmp_path / "0007-bad.patch")
