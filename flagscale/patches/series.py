"""Patch series: `series` files (common, then device) and the lint that keeps them reviewable."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from flagscale.errors import FlagScaleError, SeriesError
from flagscale.patches.patchfile import UPSTREAM_STATUSES, Patch, read_patch
from flagscale.upstream.project import Project

SERIES_FILE = "series"


@dataclass(frozen=True)
class Series:
    """One folder's ordered patches. `label` is `common` or `device:<name>`."""

    label: str
    folder: Path
    names: tuple[str, ...]

    @property
    def paths(self) -> list[Path]:
        return [self.folder / name for name in self.names]

    def load(self) -> list[Patch]:
        return [read_patch(path) for path in self.paths]


def read_series(folder: Path, label: str) -> Series:
    """The series in `folder`; a folder without one is an empty series."""
    file = folder / SERIES_FILE
    if not file.is_file():
        if folder.is_dir() and any(folder.glob("*.patch")):
            raise SeriesError(f"{folder}: has patches but no {SERIES_FILE} file; list them in {file}")
        return Series(label, folder, ())
    names = []
    for number, raw in enumerate(file.read_text(encoding="utf-8").splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        if "/" in line or line.startswith("."):
            raise SeriesError(f"{file}:{number}: {line!r} must be a file name in the same folder")
        if not (folder / line).is_file():
            raise SeriesError(f"{file}:{number}: lists {line!r}, which does not exist; add the file or remove the line")
        if line in names:
            raise SeriesError(f"{file}:{number}: lists {line!r} twice")
        names.append(line)
    return Series(label, folder, tuple(names))


def series_for(project: Project, backend: str, device: str | None = None) -> list[Series]:
    """Common series of `backend`, then the device's (if a device is given)."""
    out = [read_series(project.common_series_dir(backend), "common")]
    if device:
        out.append(read_series(project.device_series_dir(device, backend), f"device:{device}"))
    return out


def write_series(folder: Path, names: list[str], header: str = "") -> None:
    text = header + "".join(f"{name}\n" for name in names)
    file = folder / SERIES_FILE
    if not file.exists() or file.read_text(encoding="utf-8") != text:
        file.write_text(text, encoding="utf-8")


def series_header(folder: Path) -> str:
    """Leading comment lines of an existing series file, kept when it is rewritten."""
    file = folder / SERIES_FILE
    if not file.is_file():
        return ""
    lines = []
    for line in file.read_text(encoding="utf-8").splitlines(keepends=True):
        if not line.startswith("#"):
            break
        lines.append(line)
    return "".join(lines)


def lint_folder(folder: Path) -> list[str]:
    """Problems in one series folder: listing, headers and whitespace damage. Empty means clean."""
    problems: list[str] = []
    try:
        series = read_series(folder, folder.name)
    except SeriesError as exc:
        return [str(exc)]
    on_disk = sorted(p.name for p in folder.glob("*") if p.is_file() and p.name != SERIES_FILE)
    for name in on_disk:
        if name not in series.names:
            problems.append(
                f"{folder / name}: not listed in {folder / SERIES_FILE}"
                + ("" if name.endswith(".patch") else " (only .patch files belong here)")
            )
    for path in series.paths:
        problems += lint_patch(path)
    return problems


def lint_patch(path: Path) -> list[str]:
    data = path.read_bytes()
    try:
        patch = read_patch(path)
    except FlagScaleError as exc:
        return [f"{path}: {exc}"]
    problems = []
    for header in ("From", "Subject"):
        if not patch.headers.get(header):
            problems.append(f"{path}: missing the {header}: header (write patches with git format-patch)")
    if patch.headers.get("Subject") and not patch.body.strip():
        problems.append(f"{path}: no message body: say why the patch is needed")
    status = patch.trailer("Upstream-Status")
    if status is None:
        problems.append(f"{path}: missing 'Upstream-Status:' (one of {', '.join(UPSTREAM_STATUSES)})")
    elif status.split()[0] not in UPSTREAM_STATUSES:
        problems.append(f"{path}: Upstream-Status {status!r} must start with one of {', '.join(UPSTREAM_STATUSES)}")
    elif status.split()[0] in ("Submitted", "Backport", "Inappropriate") and len(status.split()) < 2:
        problems.append(f"{path}: Upstream-Status {status!r} needs a link or a [reason]")
    if not patch.trailer("Drop-When"):
        problems.append(f"{path}: missing 'Drop-When:' (when can FlagScale delete this patch?)")
    for number, line in enumerate(data.split(b"\n"), 1):
        if line.startswith(b"+") and not line.startswith(b"+++ ") and re.search(rb"[ \t]+\r?$", line[1:]):
            problems.append(f"{path}:{number}: added line ends in whitespace")
    return problems
