"""The strict apply engine: no fuzz, all or nothing, nothing written outside the tree.

Applying is split in two. `plan_patches` reads the original tree and computes every resulting file
in memory, refusing hostile paths and non-matching hunks before anything is written. `write_plan`
then writes the result (rolling back on an OS error), and `apply_to_new_tree` writes it into a
staging copy that is renamed into place only when complete.

Hunk placement follows `git apply` exactly (search order, must-match-beginning/end rules), so the
trees we produce are byte-identical to git's.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import tempfile
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from flagscale.errors import ApplyError, PatchError
from flagscale.patches.patchfile import FileChange, Hunk, Patch
from flagscale.upstream.cache import remove_tree

_MISSING = object()
_WRITERS = 8  # threads writing files (see _write_all)
_PARALLEL_FROM = 32  # fewer changed files: one thread, no pool to start


@dataclass(frozen=True)
class FileState:
    content: bytes | None  # None: the file does not exist
    executable: bool = False


@dataclass(frozen=True)
class Placement:
    """Where one hunk landed: `offset` lines away from where its header said."""

    patch: str
    path: str
    hunk: int
    offset: int


@dataclass
class Plan:
    """Every file a series changes: original and final state, in first-touched order."""

    originals: dict[str, FileState] = field(default_factory=dict)
    finals: dict[str, FileState] = field(default_factory=dict)
    placements: list[Placement] = field(default_factory=list)

    def offsets(self, patch: str | None = None) -> list[Placement]:
        return [p for p in self.placements if p.offset and (patch is None or p.patch == patch)]


def plan_patches(
    root: Path,
    patches: Sequence[Patch],
    *,
    to_tree: Callable[[str], str | None] = lambda p: p,
    pin_label: str = "the upstream",
    hint: str = "",
) -> Plan:
    """Compute the result of applying `patches` in order to the tree at `root`; write nothing."""
    plan = Plan()
    folders: set[str] = set()  # folders already proven to be real (not symlinked) directories
    for patch in patches:
        for change in patch.files:
            _plan_file(root, plan, folders, patch, change, to_tree, pin_label, hint)
    return plan


def _plan_file(
    root: Path,
    plan: Plan,
    folders: set[str],
    patch: Patch,
    change: FileChange,
    to_tree: Callable[[str], str | None],
    pin_label: str,
    hint: str,
) -> None:
    where = f"{patch.name}: {change.path}"
    tree_path = to_tree(change.path)
    if tree_path is None:
        raise ApplyError(
            f"{where}: this file is not shipped in {pin_label}'s sdist; "
            "use the submodule source (--source submodule) or drop the file from the patch"
        )
    if tree_path not in plan.finals:
        original = _read_original(str(root), tree_path, where, folders)
        plan.originals[tree_path] = original
        plan.finals[tree_path] = original
    current = plan.finals[tree_path]
    if change.op == "add" and current.content is not None:
        raise ApplyError(f"{where}: the patch creates this file but it already exists in {pin_label}{hint}")
    if change.op != "add" and current.content is None:
        raise ApplyError(f"{where}: the patch changes this file but it does not exist in {pin_label}{hint}")
    image = _Image(current.content or b"")
    for hunk in change.hunks:
        offset = image.apply(hunk, f"{where}: hunk {hunk.number} ({hunk.header})", pin_label, hint)
        plan.placements.append(Placement(patch.name, change.path, hunk.number, offset))
    if change.op == "delete":
        if image.content:
            raise ApplyError(
                f"{where}: the patch deletes this file but {pin_label}'s copy has more "
                f"content than the patch removes{hint}"
            )
        plan.finals[tree_path] = FileState(None)
        return
    executable = current.executable if change.new_mode is None else change.new_mode == "100755"
    plan.finals[tree_path] = FileState(image.content, executable)


class _Image:
    """One file's content while one file diff applies to it, as bytes: lines are what ends in LF.

    Hunks are placed as `git apply` places them: the search starts at the hunk's *new* position and tries
    +1, -1, +2, ... lines away; hunks at the top (old start 0 or 1) must match at the beginning, hunks
    without trailing context at the end; a hunk may not match over lines an earlier hunk of the same file
    diff wrote. Working on bytes (find, count, one splice per hunk) instead of a list of lines keeps every
    step in C: splitting and joining whole files was most of the time of a large series."""

    def __init__(self, content: bytes) -> None:
        self.content = content
        self._size: int | None = None  # lines, counted when a hunk needs it (most never do)
        self.written: list[tuple[int, int]] = []  # line spans earlier hunks wrote, [start, end)

    @property
    def size(self) -> int:
        if self._size is None:
            content = self.content
            self._size = content.count(b"\n") + (1 if content and not content.endswith(b"\n") else 0)
        return self._size

    def apply(self, hunk: Hunk, where: str, pin_label: str, hint: str) -> int:
        """Splice the hunk in; returns its offset in lines from where its header said."""
        pre, post = b"".join(hunk.old_lines), b"".join(hunk.new_lines)
        n, m = len(hunk.old_lines), len(hunk.new_lines)
        expected = hunk.new_start - 1 if hunk.new_start else 0
        # The search starts at min(expected, size); past the end, every match is backwards of both, in the
        # same order, so the file's lines need counting only for hunks that must match at its end.
        found = self._find(pre, n, expected, hunk.old_start <= 1, hunk.trailing == 0)
        if found is None:
            raise ApplyError(f"{where} does not apply to {pin_label} (context differs; no fuzz is allowed){hint}")
        line, at = found
        view = memoryview(self.content)  # one copy of the file per hunk, not three
        self.content = b"".join((view[:at], post, view[at + len(pre) :]))
        if self._size is not None:
            self._size += m - n
        self.written = [(s + m - n, e + m - n) if s >= line + n else (s, e) for s, e in self.written]
        self.written.append((line, line + m))
        return line - expected

    def _ok(self, line: int, n: int, match_beginning: bool, match_end: bool) -> bool:
        if (match_beginning and line != 0) or (match_end and line + n != self.size):
            return False
        return not any(s < line + n and line < e for s, e in self.written)

    def _find(self, pre: bytes, n: int, line: int, match_beginning: bool, match_end: bool) -> tuple[int, int] | None:
        """(line, byte offset) of the match `git apply` picks, or None: of the places where the lines
        match, the first of the search order, i.e. the nearest to `line`, forwards before backwards."""
        if n == 0:
            at = 0 if match_beginning else self.size if match_end else min(line, self.size)
            return (at, self._offset_of_line(at)) if self._ok(at, 0, match_beginning, match_end) else None
        content = self.content
        ends_line = pre.endswith(b"\n")  # else the match must end the file (its last line has no newline)
        best: tuple[tuple[int, bool], int, int] | None = None
        counted, counted_to = 0, 0  # newlines before byte offset counted_to
        at = content.find(pre)
        while at != -1:
            if (at == 0 or content[at - 1] == 10) and (ends_line or at + len(pre) == len(content)):
                counted += content.count(b"\n", counted_to, at)
                counted_to = at
                if self._ok(counted, n, match_beginning, match_end):
                    rank = (abs(counted - line), counted < line)
                    if best is None or rank < best[0]:
                        best = (rank, counted, at)
                    if counted >= line:
                        break  # later matches are further forwards
            at = content.find(pre, at + 1)
        return (best[1], best[2]) if best else None

    def _offset_of_line(self, line: int) -> int:
        if line == 0:
            return 0
        head = self.content.split(b"\n", line)  # only for hunks without old lines (a file's first lines)
        return len(self.content) - len(head[-1]) if len(head) > line else len(self.content)


def _read_original(root: str, tree_path: str, where: str, folders: set[str]) -> FileState:
    """Read a file the patch touches, refusing symlinks anywhere on its path."""
    parts = tree_path.split("/")
    for depth in range(len(parts) - 1):
        folder = "/".join(parts[: depth + 1])
        if folder in folders:
            continue
        try:
            st = os.lstat(os.path.join(root, folder))
        except FileNotFoundError:
            return FileState(None)
        except NotADirectoryError:
            raise PatchError(f"{where}: {'/'.join(parts[:depth])} is a file, not a folder") from None
        if stat.S_ISLNK(st.st_mode):
            raise PatchError(f"{where}: refusing to write through the symlink {folder}")
        if not stat.S_ISDIR(st.st_mode):
            raise PatchError(f"{where}: {folder} is not a folder")
        folders.add(folder)
    full = os.path.join(root, tree_path)
    try:
        st = os.lstat(full)
    except FileNotFoundError:
        return FileState(None)
    except NotADirectoryError:
        raise PatchError(f"{where}: {'/'.join(parts[:-1])} is not a folder") from None
    if stat.S_ISLNK(st.st_mode):
        raise PatchError(f"{where}: refusing to write through the symlink {tree_path}")
    if not stat.S_ISREG(st.st_mode):
        raise PatchError(f"{where}: is not a regular file in the tree")
    return FileState(_read_all(full, st.st_size), bool(st.st_mode & 0o100))


def _read_all(path: str, size: int) -> bytes:
    """A file's bytes with plain os calls (open() adds a buffered reader and three syscalls per file)."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        chunks = [os.read(fd, size + 1)]  # +1: a short read is the end of a regular file, so one call
        while len(chunks[-1]) == (size + 1 if len(chunks) == 1 else 1 << 20):  # the file grew meanwhile
            chunks.append(os.read(fd, 1 << 20))
    finally:
        os.close(fd)
    return b"".join(chunks)


def write_plan(plan: Plan, root: Path, *, new_inodes: bool = False) -> None:
    """Write the plan's final states under `root`; on any OS error, restore what was written.

    A changed file this tree alone holds is rewritten in place; `new_inodes` gives every changed file a new
    inode (a staging copy, whose files may be hard links to the source)."""
    base = str(root)
    changed = [(path, final) for path, final in plan.finals.items() if final != plan.originals[path]]
    done: list[str] = []
    made_dirs: list[str] = []
    removed_dirs: list[str] = []
    try:
        known: set[str] = set()
        for path, final in changed:
            if final.content is not None:
                made_dirs += _make_parents(base, path, known)
        done, error = _write_all(base, changed, new_inodes)
        if error is not None:
            raise error
        for path, final in changed:
            if final.content is None:
                removed_dirs += _prune_empty_parents(base, path)
    except OSError as exc:
        for folder in reversed(removed_dirs):
            os.makedirs(folder, exist_ok=True)
        for path in reversed(done):
            original = plan.originals[path]
            if original.content is None:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(base, path))
            else:
                _write_file(os.path.join(base, path), original)
        for folder in reversed(made_dirs):
            with contextlib.suppress(OSError):
                os.rmdir(folder)
        raise ApplyError(f"writing the patched tree failed ({exc}); it was restored to its previous state") from None


def _write_all(base: str, changed: list[tuple[str, FileState]], new_inodes: bool) -> tuple[list[str], OSError | None]:
    """Write (or delete) every changed file; (the paths done, the first error in plan order or None).

    Many files go through a few threads: a write waits on the file system (journal, allocation) with the
    GIL released, so the waits overlap, as a parallel checkout does."""

    def one(item: tuple[str, FileState]) -> None:
        path, final = item
        full = os.path.join(base, path)
        if final.content is None:
            os.unlink(full)
        else:
            _write_file(full, final, new_inodes)

    def changed_it(error: BaseException | None) -> bool:  # an in-place write that failed midway counts
        return error is None or getattr(error, "partly_written", False)

    if len(changed) < _PARALLEL_FROM:
        done: list[str] = []
        for item in changed:
            try:
                one(item)
            except OSError as exc:
                return done + [item[0]] * changed_it(exc), exc
            done.append(item[0])
        return done, None
    with ThreadPoolExecutor(_WRITERS) as pool:
        futures = [pool.submit(one, item) for item in changed]
    errors = [f.exception() for f in futures]
    first = next((e for e in errors if e is not None), None)
    if first is not None and not isinstance(first, OSError):
        raise first
    return [path for (path, _), e in zip(changed, errors, strict=True) if changed_it(e)], first


def apply_to_new_tree(plan: Plan, source: Path, dest: Path, *, link: bool = False) -> None:
    """Create `dest` as a copy of `source` with the plan applied; `dest` appears only when complete.

    `link=True` hard-links unchanged files (only for read-only cache trees: a write to one would
    change both). Changed files are always new inodes, so the source is never touched.
    """
    if dest.exists():
        raise ApplyError(f"{dest} already exists; remove it or choose another destination")
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        copy_tree(source, staging, link=link)
        write_plan(plan, staging, new_inodes=True)
        os.rename(staging, dest)
    except BaseException:
        remove_tree(staging)
        raise


def copy_tree(source: Path, dest: Path, *, link: bool = False) -> None:
    """Copy (or hard-link) a tree into an existing empty folder, leaving folders writable."""
    shutil.copytree(
        source, dest, symlinks=True, copy_function=_link_or_copy if link else shutil.copy2, dirs_exist_ok=True
    )
    for dirpath, _, _ in os.walk(dest):
        os.chmod(dirpath, 0o755)


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another file system
        shutil.copy2(src, dst)


def _write_file(target: str, state: FileState, new_inode: bool = False) -> None:
    """Write `state` at `target`, never through a hard link (cache trees link unchanged files to the source).

    A file only this tree holds (one link) is rewritten in place and a new file is created where it goes: no
    inode to allocate or free, no rename, which is most of what writing a large series costs. Any other file
    (linked, read-only to us, or not a regular file) gets a new inode written beside it and renamed over."""
    mode = 0o755 if state.executable else 0o644
    content = state.content or b""
    if new_inode:
        return _replace_file(target, content, mode)
    try:
        fd = os.open(target, os.O_WRONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        try:
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
        except OSError:
            fd = -1
        else:
            _write_fd(fd, content, mode, None)
            return
    except OSError:  # read-only to us, a symlink (O_NOFOLLOW), ...: a new inode will do
        fd = -1
    if fd >= 0:
        st = os.fstat(fd)
        if st.st_nlink == 1 and stat.S_ISREG(st.st_mode):
            try:
                _write_fd(fd, content, mode, st.st_mode)
            except OSError as exc:
                exc.partly_written = True  # type: ignore[attr-defined]  # write_plan restores this file too
                raise
            return
        os.close(fd)
    _replace_file(target, content, mode)


def _replace_file(target: str, content: bytes, mode: int) -> None:
    """A new inode beside the target, renamed over it."""
    folder, name = os.path.split(target)
    tmp = os.path.join(folder, f".{name}.fs-tmp")
    _write_fd(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), content, mode, None)
    try:
        os.replace(tmp, target)
    except OSError:
        os.unlink(tmp)
        raise


def _write_fd(fd: int, content: bytes, mode: int, old_mode: int | None) -> None:
    """Write `content` from the start of `fd`, cut the file there, set its mode; closes `fd`."""
    try:
        view = memoryview(content)
        while view:
            view = view[os.write(fd, view) :]
        if old_mode is not None:
            os.ftruncate(fd, len(content))
        if old_mode is None or stat.S_IMODE(old_mode) != mode:
            os.fchmod(fd, mode)  # exact, whatever the umask
    finally:
        os.close(fd)


def _make_parents(base: str, path: str, known: set[str]) -> list[str]:
    """Create the missing folders above `path`; `known` remembers folders that exist, across calls."""
    made = []
    parts = path.split("/")[:-1]
    for depth in range(1, len(parts) + 1):
        folder = "/".join(parts[:depth])
        if folder in known:
            continue
        full = os.path.join(base, folder)
        try:
            os.mkdir(full)
            made.append(full)
        except FileExistsError:
            pass
        known.add(folder)
    return made


def _prune_empty_parents(base: str, path: str) -> list[str]:
    """Like git apply: deleting a file removes folders it leaves empty."""
    removed = []
    current = os.path.dirname(os.path.join(base, path))
    while current != base and os.path.isdir(current) and not os.listdir(current):
        os.rmdir(current)
        removed.append(current)
        current = os.path.dirname(current)
    return removed
