"""Parse one `git format-patch` file strictly, in bytes.

We parse by hand rather than with unidiff: strict apply needs byte-exact lines (unidiff decodes text
and rewrites line endings of "\\ No newline" markers), it must reject text between file sections that
unidiff skips, and errors must name the patch line.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from email.header import decode_header, make_header
from email.parser import BytesHeaderParser
from email.policy import compat32
from pathlib import Path

from flagscale.errors import PatchError

_HUNK = re.compile(rb"^@@ -(\d+)(?:,(\d+))? \+(\d+)(?:,(\d+))? @@(.*)$")
_REGULAR_MODES = {"100644", "100755"}
_EXTENDED = (
    b"old mode ",
    b"new mode ",
    b"deleted file mode ",
    b"new file mode ",
    b"index ",
    b"similarity index ",
    b"dissimilarity index ",
    b"rename from ",
    b"rename to ",
    b"copy from ",
    b"copy to ",
)
UPSTREAM_STATUSES = ("Pending", "Submitted", "Accepted", "Backport", "Denied", "Inappropriate")


@dataclass(frozen=True)
class Hunk:
    number: int  # 1-based within its file
    header: str
    old_start: int
    old_len: int
    new_start: int
    new_len: int
    old_lines: tuple[bytes, ...]  # context + removed, with their exact line endings
    new_lines: tuple[bytes, ...]  # context + added
    leading: int  # context lines before the first change
    trailing: int  # context lines after the last change
    patch_line: int


@dataclass(frozen=True)
class FileChange:
    path: str  # repository path, a/ b/ prefixes stripped
    op: str  # modify | add | delete
    old_mode: str | None
    new_mode: str | None
    hunks: tuple[Hunk, ...]
    patch_line: int


@dataclass(frozen=True)
class Patch:
    name: str
    data: bytes
    files: tuple[FileChange, ...]
    headers: dict[str, str] = field(default_factory=dict)
    body: str = ""

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    @property
    def subject(self) -> str:
        return re.sub(r"^\[PATCH[^\]]*\]\s*", "", self.headers.get("Subject", "")).strip()

    def trailer(self, key: str) -> str | None:
        match = re.search(rf"^{re.escape(key)}:[ \t]*(.+)$", self.body, re.MULTILINE)
        return match.group(1).strip() if match else None


def read_patch(path: Path) -> Patch:
    return parse_patch(path.read_bytes(), path.name)


def parse_patch(data: bytes, name: str) -> Patch:
    lines = _split_lines(data)
    first_diff = next((i for i, line in enumerate(lines) if line.startswith(b"diff --git ")), None)
    if first_diff is None:
        if any(line.startswith((b"--- ", b"+++ ")) for line in lines):
            raise PatchError(
                f"{name}: not a git-style diff (no 'diff --git' line); regenerate it with git format-patch"
            )
        raise PatchError(f"{name}: contains no diff")
    headers, body = _parse_message(b"".join(lines[:first_diff]))
    files = _Parser(name, lines, first_diff).parse()
    return Patch(name=name, data=data, files=tuple(files), headers=headers, body=body)


def _split_lines(data: bytes) -> list[bytes]:
    """Lines with their endings, split on LF only (a CR is part of its line's content)."""
    if b"\r" not in data:
        return data.splitlines(keepends=True)  # C speed; for bytes, identical to splitting on LF without a CR
    lines = data.split(b"\n")
    last = lines.pop()
    return [line + b"\n" for line in lines] + ([last] if last else [])


def _parse_message(message: bytes) -> tuple[dict[str, str], str]:
    """Mail headers and the commit message body (up to the '---' separator)."""
    if message.startswith(b"From ") and b"\n" in message:
        message = message.split(b"\n", 1)[1]  # mbox separator line
    if not re.match(rb"^[A-Za-z-]+:", message):
        return {}, message.decode("utf-8", "replace")
    parsed = BytesHeaderParser(policy=compat32).parsebytes(message)
    headers = {key: " ".join(str(make_header(decode_header(value))).split()) for key, value in parsed.items()}
    payload = parsed.get_payload()  # a str for a single-part message such as a patch
    body = payload.decode("utf-8", "replace") if isinstance(payload, bytes) else str(payload or "")
    body = re.split(r"^---[ \t]*$", body, maxsplit=1, flags=re.MULTILINE)[0]
    return headers, body.strip("\n")


class _Parser:
    def __init__(self, name: str, lines: list[bytes], start: int) -> None:
        self.name, self.lines, self.i = name, lines, start

    def fail(self, message: str, line: int | None = None) -> PatchError:
        return PatchError(f"{self.name}: line {(line if line is not None else self.i) + 1}: {message}")

    def parse(self) -> list[FileChange]:
        files: list[FileChange] = []
        seen: set[str] = set()
        while self.i < len(self.lines):
            line = self.lines[self.i]
            if line.startswith(b"diff --git "):
                change = self.file_change()
                if change.path in seen:
                    raise self.fail(f"{change.path} appears twice in one patch", change.patch_line - 1)
                seen.add(change.path)
                files.append(change)
            elif line.rstrip(b"\n") == b"-- ":
                break  # format-patch signature: the rest is the tool's version
            elif line.strip() == b"":
                self.i += 1
            else:
                raise self.fail(
                    f"unexpected text between file diffs: {_show(line)} (a hunk's line counts may be wrong)"
                )
        return files

    def file_change(self) -> FileChange:
        start = self.i
        diff_line = self.lines[self.i]
        if diff_line.endswith(b"\r\n"):
            raise self.fail(
                "CRLF line endings in the diff headers (the patch was damaged by a Windows "
                "editor or mailer); restore LF endings, e.g. `dos2unix`, and check again"
            )
        self.i += 1
        modes: dict[bytes, str] = {}
        while self.i < len(self.lines) and self.lines[self.i].startswith(_EXTENDED):
            ext = self.lines[self.i]
            if ext.startswith((b"rename ", b"copy ", b"similarity", b"dissimilarity")):
                raise self.fail("renames and copies are not supported; export the patch with --no-renames")
            for key in (b"old mode ", b"new mode ", b"deleted file mode ", b"new file mode "):
                if ext.startswith(key):
                    mode = ext[len(key) :].strip().decode("ascii", "replace")
                    if mode not in _REGULAR_MODES:
                        what = {"120000": "a symlink", "160000": "a submodule"}.get(mode, f"mode {mode}")
                        raise self.fail(f"refusing to create or change {what}: only regular files may be patched")
                    modes[key] = mode
            self.i += 1
        nxt = self.lines[self.i] if self.i < len(self.lines) else b""
        if nxt.startswith((b"Binary files ", b"GIT binary patch")):
            raise self.fail("binary patches cannot be reviewed or verified; ship the file another way")
        old_path = new_path = None
        if nxt.startswith(b"--- "):
            old_path = self.path_of(nxt[4:], b"a/")
            self.i += 1
            plus = self.lines[self.i] if self.i < len(self.lines) else b""
            if not plus.startswith(b"+++ "):
                raise self.fail("'--- ' must be followed by '+++ '")
            new_path = self.path_of(plus[4:], b"b/")
            self.i += 1
        else:  # mode-only change or empty new/deleted file: names only on the diff --git line
            old_path, new_path = self.paths_from_diff_line(diff_line, start)
        if b"new file mode " in modes or old_path is None:
            op, path = "add", new_path
            if b"new file mode " not in modes:
                raise self.fail("a diff from /dev/null must say 'new file mode'", start)
        elif b"deleted file mode " in modes or new_path is None:
            op, path = "delete", old_path
            if b"deleted file mode " not in modes:
                raise self.fail("a diff to /dev/null must say 'deleted file mode'", start)
        else:
            op, path = "modify", new_path
            if old_path != new_path:
                raise self.fail(
                    f"renames are not supported ({old_path} -> {new_path}); export with --no-renames", start
                )
        if path is None:
            raise self.fail("no file name", start)
        hunks: list[Hunk] = []
        while self.i < len(self.lines) and self.lines[self.i].startswith(b"@@"):
            hunks.append(self.hunk(len(hunks) + 1, path))
        if op == "modify" and not hunks and b"new mode " not in modes:
            raise self.fail(f"{path}: file diff without hunks or mode change", start)
        old_mode = modes.get(b"old mode ") or modes.get(b"deleted file mode ")
        new_mode = modes.get(b"new mode ") or modes.get(b"new file mode ")
        return FileChange(path, op, old_mode, new_mode, tuple(hunks), start + 1)

    def path_of(self, raw: bytes, prefix: bytes) -> str | None:
        raw = raw.rstrip(b"\n")
        if raw.endswith(b"\r"):
            raise self.fail(
                "CRLF line endings in the diff headers (the patch was damaged by a Windows "
                "editor or mailer); restore LF endings, e.g. `dos2unix`, and check again"
            )
        raw = raw.split(b"\t", 1)[0]
        if raw == b"/dev/null":
            return None
        if raw.startswith(b'"'):
            raw = _c_unquote(raw)
        if not raw.startswith(prefix):
            raise self.fail(f"path {_show(raw)} lacks the {prefix.decode()} prefix (patches use -p1 paths)")
        return self.safe(raw[len(prefix) :])

    def paths_from_diff_line(self, line: bytes, at: int) -> tuple[str, str]:
        rest = line[len(b"diff --git ") :].rstrip(b"\n")
        if rest.startswith(b'"'):  # git C-quotes unusual names: "a/t\303\251st" "b/t\303\251st"
            end = 1
            while end < len(rest) and (rest[end] != ord('"') or rest[end - 1] == ord("\\")):
                end += 1
            a, b = _c_unquote(rest[: end + 1]), rest[end + 1 :].strip()
            b = _c_unquote(b) if b.startswith(b'"') else b
        else:
            half = (len(rest) - 1) // 2
            a, b = rest[:half], rest[half + 1 :]
        if not (a.startswith(b"a/") and b.startswith(b"b/") and a[2:] == b[2:]):
            raise self.fail("cannot read the file name from the 'diff --git' line", at)
        path = self.safe(a[2:])
        return path, path

    def safe(self, raw: bytes) -> str:
        """Refuse absolute paths, '..', '.git' and other names that could escape or corrupt a tree."""
        try:
            path = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail(f"path {_show(raw)} is not UTF-8") from None
        parts = path.split("/")
        if path.startswith("/") or not path:
            raise self.fail(f"absolute path {path!r} refused: patches may only touch files inside the tree")
        if any(part in ("", ".", "..") for part in parts):
            raise self.fail(f"path {path!r} refused: '..', '.' and empty components could leave the tree")
        if ".git" in parts or "\0" in path:
            raise self.fail(f"path {path!r} refused: patches may not write git metadata")
        return path

    def hunk(self, number: int, path: str) -> Hunk:
        at = self.i
        header_line = self.lines[self.i]
        match = _HUNK.match(header_line.rstrip(b"\n"))
        if not match:
            if header_line.endswith(b"\r\n"):
                raise self.fail(
                    "CRLF line endings in the diff headers (the patch was damaged by a Windows "
                    "editor or mailer); restore LF endings, e.g. `dos2unix`, and check again"
                )
            raise self.fail(f"malformed hunk header {_show(header_line)}")
        old_start, new_start = int(match[1]), int(match[3])
        old_len = 1 if match[2] is None else int(match[2])
        new_len = 1 if match[4] is None else int(match[4])
        header = header_line.rstrip(b"\n").decode("utf-8", "replace")
        self.i += 1
        old: list[bytes] = []
        new: list[bytes] = []
        tags: list[bytes] = []
        old_left, new_left = old_len, new_len
        lines, i, end = self.lines, self.i, len(self.lines)  # locals: this loop sees every line of a series
        while old_left > 0 or new_left > 0:
            if i >= end:
                self.i = i
                raise self.fail(
                    f"{path}: hunk {number} ({header}) ends early: its header promises "
                    f"{old_len} old and {new_len} new lines",
                    at,
                )
            line = lines[i]
            tag = line[:1]
            if tag == b" " and old_left > 0 and new_left > 0:
                text = line[1:]
                old.append(text)
                new.append(text)
                old_left -= 1
                new_left -= 1
            elif tag == b"-" and old_left > 0:
                old.append(line[1:])
                old_left -= 1
            elif tag == b"+" and new_left > 0:
                new.append(line[1:])
                new_left -= 1
            elif tag == b"\\" and tags:
                self.no_newline(tags[-1], old, new)
                i += 1
                continue
            else:
                self.i = i
                if line in (b"\n", b"\r\n"):
                    raise self.fail(
                        f"{path}: hunk {number} ({header}): context line without its leading space "
                        "(whitespace damage from an editor or mailer); regenerate the patch"
                    )
                raise self.fail(
                    f"{path}: hunk {number} ({header}): line counts do not match the hunk body "
                    f"(got {_show(line)} with {old_left} old and {new_left} new lines still expected)"
                )
            tags.append(tag)
            i += 1
        self.i = i
        if self.i < len(self.lines) and self.lines[self.i].startswith(b"\\") and tags:
            self.no_newline(tags[-1], old, new)
            self.i += 1
        if (
            self.i < len(self.lines)
            and self.lines[self.i][:1] in (b" ", b"-", b"+")
            and not self.lines[self.i].startswith((b"--- ", b"+++ ", b"-- \n"))
        ):
            raise self.fail(
                f"{path}: hunk {number} ({header}) is longer than its header says "
                f"({old_len} old, {new_len} new lines); fix the counts or regenerate the patch"
            )
        changes = [k for k, t in enumerate(tags) if t != b" "]
        leading = changes[0] if changes else len(tags)
        trailing = len(tags) - 1 - changes[-1] if changes else 0
        return Hunk(
            number, header, old_start, old_len, new_start, new_len, tuple(old), tuple(new), leading, trailing, at + 1
        )

    def no_newline(self, tag: bytes, old: list[bytes], new: list[bytes]) -> None:
        """'\\ No newline at end of file' strips the newline of the line before it."""
        targets = {b" ": (old, new), b"-": (old,), b"+": (new,)}[tag]
        for lines in targets:
            if lines and lines[-1].endswith(b"\n"):
                lines[-1] = lines[-1][:-1]


def _c_unquote(raw: bytes) -> bytes:
    """git's C-style quoting of unusual file names ("a/t\\303\\251st")."""
    body = raw.strip(b'"')
    out = bytearray()
    i = 0
    escapes = {
        ord("n"): 10,
        ord("t"): 9,
        ord('"'): 34,
        ord("\\"): 92,
        ord("a"): 7,
        ord("b"): 8,
        ord("f"): 12,
        ord("r"): 13,
        ord("v"): 11,
    }
    while i < len(body):
        c = body[i]
        if c == 92 and i + 1 < len(body):
            n = body[i + 1]
            if 48 <= n <= 55:
                out.append(int(body[i + 1 : i + 4], 8))
                i += 4
                continue
            out.append(escapes.get(n, n))
            i += 2
            continue
        out.append(c)
        i += 1
    return bytes(out)


def _show(line: bytes) -> str:
    text = line.rstrip(b"\n").decode("utf-8", "replace")
    return repr(text if len(text) < 60 else text[:57] + "...")
