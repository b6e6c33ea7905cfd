"""The strict apply engine: no fuzz, all or nothing, nothing written outside the tree.

Applying is split in two. `plan_patches` reads the original tree and computes every resulting file
in memory, refusing hostile paths and non-matching hunks before anything is written. `write_plan`
then writes the result (rolling back on an OS error), and `apply_to_new_tree` writes it into a
staging copy that is renamed into place only when complete.

Hunk placement follows `git apply` exactly (search order, must-match-beginning/end rules), so the
trees we produce are byte-identical to git's.
"""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from flagscale.errors import ApplyError, PatchError
from flagscale.patches.patchfile import FileChange, Hunk, Patch
from flagscale.upstream.cache import remove_tree

_MISSING = object()


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
    lines: dict[str, list[bytes]] = {}  # working copy of each touched file: split once, joined once
    folders: set[str] = set()  # folders already proven to be real (not symlinked) directories
    for patch in patches:
        for change in patch.files:
            _plan_file(root, plan, lines, folders, patch, change, to_tree, pin_label, hint)
    for path, image in lines.items():
        plan.finals[path] = FileState(b"".join(image), plan.finals[path].executable)
    return plan


def _plan_file(
    root: Path,
    plan: Plan,
    lines: dict[str, list[bytes]],
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
    current = plan.finals[tree_path]  # while planning, content is only an existence marker
    if change.op == "add" and current.content is not None:
        raise ApplyError(f"{where}: the patch creates this file but it already exists in {pin_label}{hint}")
    if change.op != "add" and current.content is None:
        raise ApplyError(f"{where}: the patch changes this file but it does not exist in {pin_label}{hint}")
    image = lines.pop(tree_path, None)
    if image is None:
        image = _split_lines(current.content or b"")
    written = [False] * len(image)  # like git apply: a hunk may not match over an earlier hunk's output
    for hunk in change.hunks:
        offset = _apply_hunk(image, written, hunk, f"{where}: hunk {hunk.number} ({hunk.header})", pin_label, hint)
        plan.placements.append(Placement(patch.name, change.path, hunk.number, offset))
    if change.op == "delete":
        if image:
            raise ApplyError(
                f"{where}: the patch deletes this file but {pin_label}'s copy has more "
                f"content than the patch removes{hint}"
            )
        plan.finals[tree_path] = FileState(None)
        return
    executable = current.executable if change.new_mode is None else change.new_mode == "100755"
    lines[tree_path] = image
    plan.finals[tree_path] = FileState(b"", executable)


def _split_lines(content: bytes) -> list[bytes]:
    if b"\r" not in content:
        return content.splitlines(keepends=True)  # C speed; for bytes it splits on \n only when no \r
    parts = content.split(b"\n")
    last = parts.pop()
    image = [line + b"\n" for line in parts]
    if last:
        image.append(last)
    return image


def _apply_hunk(image: list[bytes], written: list[bool], hunk: Hunk, where: str, pin_label: str, hint: str) -> int:
    pre, post = list(hunk.old_lines), list(hunk.new_lines)
    # git apply: hunks at the top (old start 0 or 1) must match at the beginning, hunks without
    # trailing context at the end; the search starts at the *new* position and alternates +1, -1, +2...
    match_beginning = hunk.old_start <= 1
    match_end = hunk.trailing == 0
    expected = hunk.new_start - 1 if hunk.new_start else 0
    found = _find(image, written, pre, min(expected, len(image)), match_beginning, match_end)
    if found is None:
        raise ApplyError(f"{where} does not apply to {pin_label} (context differs; no fuzz is allowed){hint}")
    image[found : found + len(pre)] = post
    written[found : found + len(pre)] = [True] * len(post)
    return found - expected


def _find(
    image: list[bytes], written: list[bool], pre: list[bytes], line: int, match_beginning: bool, match_end: bool
) -> int | None:
    n, size = len(pre), len(image)

    def matches(at: int) -> bool:
        if match_beginning and at != 0:
            return False
        if match_end and at + n != size:
            return False
        if at + n > size or (n and image[at] != pre[0]):  # the first line rules out most places cheaply
            return False
        return image[at : at + n] == pre and not any(written[at : at + n])

    backwards = forwards = line
    if matches(line):
        return line
    i = 0
    while not (backwards == 0 and forwards == size):
        if i % 2 == 0 and forwards < size or backwards == 0:
            forwards += 1
            current = forwards
        else:
            backwards -= 1
            current = backwards
        i += 1
        if matches(current):
            return current
    return None


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
    with open(full, "rb") as f:
        return FileState(f.read(), bool(st.st_mode & 0o100))


def write_plan(plan: Plan, root: Path) -> None:
    """Write the plan's final states under `root`; on any OS error, restore what was written."""
    done: list[str] = []
    made_dirs: list[Path] = []
    removed_dirs: list[Path] = []
    try:
        for path, final in plan.finals.items():
            if final == plan.originals[path]:
                continue
            if final.content is None:
                (root / path).unlink()
                removed_dirs += _prune_empty_parents(root, path)
            else:
                made_dirs += _make_parents(root, path)
                _write_file(root / path, final)
            done.append(path)
    except OSError as exc:
        for folder in reversed(removed_dirs):
            folder.mkdir(exist_ok=True)
        for path in reversed(done):
            original = plan.originals[path]
            if original.content is None:
                (root / path).unlink(missing_ok=True)
            else:
                _write_file(root / path, original)
        for folder in reversed(made_dirs):
            try:
                folder.rmdir()
            except OSError:
                pass
        raise ApplyError(f"writing the patched tree failed ({exc}); it was restored to its previous state") from None


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
        write_plan(plan, staging)
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


def _write_file(target: Path, state: FileState) -> None:
    """Write a new inode next to the target and rename it over (never writes through a hard link)."""
    tmp = target.with_name(f".{target.name}.fs-tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        view = memoryview(state.content or b"")
        while view:
            view = view[os.write(fd, view) :]
        os.fchmod(fd, 0o755 if state.executable else 0o644)
    finally:
        os.close(fd)
    os.replace(tmp, target)


def _make_parents(root: Path, path: str) -> list[Path]:
    made = []
    current = root
    for part in path.split("/")[:-1]:
        current = current / part
        if not current.exists():
            current.mkdir()
            made.append(current)
    return made


def _prune_empty_parents(root: Path, path: str) -> list[Path]:
    """Like git apply: deleting a file removes folders it leaves empty."""
    removed = []
    current = (root / path).parent
    while current != root and not any(current.iterdir()):
        current.rmdir()
        removed.append(current)
        current = current.parent
    return removed
