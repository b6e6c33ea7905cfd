"""A content-addressed, read-only cache shared by every FlagScale command.

Entries are built in a private temporary folder, made read-only, and published with one atomic
rename, under a per-entry file lock: a concurrent builder of the same key waits and then reuses the
entry, and a builder killed half-way leaves only a temporary folder that the next builder removes.
"""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path

CACHE_ENV = "FLAGSCALE_CACHE_DIR"


def cache_root() -> Path:
    configured = os.environ.get(CACHE_ENV)
    if configured:
        return Path(configured).expanduser().resolve()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "flagscale"


class Cache:
    def __init__(self, root: Path | None = None) -> None:
        self.root = root or cache_root()

    def path(self, kind: str, key: str) -> Path:
        return self.root / kind / key

    def get_or_create(self, kind: str, key: str, build: Callable[[Path], None]) -> tuple[Path, bool]:
        """Return (entry path, True if it was already cached). `build(tmp)` fills a fresh folder."""
        final = self.path(kind, key)
        if final.exists():
            return final, True
        from filelock import FileLock  # lazy: keeps `flagscale --help` light

        final.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(final.parent / f".{key}.lock")):
            if final.exists():
                return final, True
            for stale in final.parent.glob(f".{key}.tmp-*"):  # left by a killed builder of this key
                remove_tree(stale)
            tmp = Path(tempfile.mkdtemp(prefix=f".{key}.tmp-", dir=final.parent))
            try:
                build(tmp)
                make_read_only(tmp)
                os.rename(tmp, final)
            except BaseException:
                remove_tree(tmp)
                raise
        return final, False


def make_read_only(path: Path) -> None:
    """Drop write permission on a whole tree so nothing can edit a cache entry in place."""
    for dirpath, _dirnames, filenames in os.walk(path):
        for name in filenames:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            if not stat.S_ISLNK(st.st_mode):
                os.chmod(p, stat.S_IMODE(st.st_mode) & ~0o222)
    for dirpath, dirnames, _ in os.walk(path, topdown=False):
        for name in dirnames:
            p = os.path.join(dirpath, name)
            if not os.path.islink(p):
                os.chmod(p, 0o555)
    os.chmod(path, 0o555)


def remove_tree(path: Path) -> None:
    """rmtree that also removes read-only cache entries."""

    def make_writable_and_retry(func, p, _exc):
        os.chmod(os.path.dirname(p), 0o755)
        if not os.path.islink(p) and os.path.exists(p):
            os.chmod(p, 0o755)
        func(p)

    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path, onerror=make_writable_and_retry)
