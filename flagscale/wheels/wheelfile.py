"""Rewrite a built wheel: new (local) version, extra requirements and files, reproducible bytes.

Upstream build systems stamp wall-clock times and directory order into their zips; we re-pack every
wheel we hand out with sorted entries, one fixed timestamp (SOURCE_DATE_EPOCH) and normalized
permissions, so the same inputs give byte-identical wheels.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import os
import re
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from flagscale.errors import BuildError, ConfigError

_EPOCH_1980 = 315532800  # zip cannot store earlier times


@dataclass(frozen=True)
class WheelEdit:
    version: str | None = None  # None keeps the wheel's version
    add_requires: tuple[str, ...] = ()
    drop_requires: tuple[str, ...] = ()  # distribution names whose Requires-Dist lines are removed
    dist_info_files: dict[str, bytes] = field(default_factory=dict)  # name -> bytes, inside .dist-info/
    files: dict[str, bytes] = field(default_factory=dict)  # archive path -> bytes (package data)


def source_date_epoch() -> int:
    raw = os.environ.get("SOURCE_DATE_EPOCH")
    if raw is None:
        return _EPOCH_1980
    try:
        return max(int(raw), _EPOCH_1980)
    except ValueError:
        raise ConfigError(f"SOURCE_DATE_EPOCH={raw!r} is not an integer number of seconds") from None


def wheel_parts(path: Path) -> tuple[str, str, str]:
    """(distribution, version, tags) from a wheel file name."""
    match = re.match(r"^([^-]+)-([^-]+)-(.+)\.whl$", path.name)
    if not match:
        raise BuildError(f"{path.name} is not a wheel file name")
    return match.group(1), match.group(2), match.group(3)


def rewrite_wheel(source: Path, out_dir: Path, edit: WheelEdit) -> Path:
    name, old_version, tags = wheel_parts(source)
    version = edit.version or old_version
    old_prefix, new_prefix = f"{name}-{old_version}", f"{name}-{version}"
    entries: dict[str, tuple[bytes, bool]] = {}
    with zipfile.ZipFile(source) as zin:
        for info in zin.infolist():
            if info.is_dir():
                continue
            arcname = info.filename
            for suffix in (".dist-info/", ".data/"):
                if arcname.startswith(old_prefix + suffix):
                    arcname = new_prefix + arcname[len(old_prefix) :]
            executable = bool((info.external_attr >> 16) & 0o111)
            entries[arcname] = (zin.read(info), executable)
    dist_info = f"{new_prefix}.dist-info"
    entries.pop(f"{dist_info}/RECORD", None)
    metadata_name = f"{dist_info}/METADATA"
    if metadata_name not in entries:
        raise BuildError(f"{source.name}: no {old_prefix}.dist-info/METADATA; not a valid wheel")
    metadata = entries[metadata_name][0].decode("utf-8")
    entries[metadata_name] = (_edit_metadata(metadata, version, edit).encode("utf-8"), False)
    for rel, data in edit.dist_info_files.items():
        entries[f"{dist_info}/{rel}"] = (data, False)
    for arcname, data in edit.files.items():
        entries[arcname] = (data, False)
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / f"{name}-{version}-{tags}.whl"
    write_wheel(target, entries, dist_info)
    return target


def _edit_metadata(text: str, version: str, edit: WheelEdit) -> str:
    head, sep, body = text.partition("\n\n")
    lines = head.splitlines()
    drop = {_normalize(n) for n in edit.drop_requires}
    kept = []
    for line in lines:
        if line.startswith("Version:"):
            line = f"Version: {version}"
        elif (
            line.startswith("Requires-Dist:")
            and _normalize(re.split(r"[\s;<>=!~\[(@]", line[14:].strip(), maxsplit=1)[0]) in drop
        ):
            continue
        kept.append(line)
    last_requires = max((i for i, line in enumerate(kept) if line.startswith("Requires-Dist:")), default=len(kept) - 1)
    kept[last_requires + 1 : last_requires + 1] = [f"Requires-Dist: {r}" for r in edit.add_requires]
    return "\n".join(kept) + "\n" + (sep[1:] + body if sep else "")


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def record_hash(data: bytes) -> str:
    """A RECORD hash entry (`sha256=<urlsafe base64, unpadded>`), as PEP 376/427 define it."""
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def write_wheel(target: Path, entries: dict[str, tuple[bytes, bool]], dist_info: str) -> None:
    """Write a wheel deterministically: sorted entries, dist-info last, fixed time, RECORD regenerated."""
    date_time = time.gmtime(source_date_epoch())[:6]
    record_name = f"{dist_info}/RECORD"
    ordered = sorted(n for n in entries if not n.startswith(dist_info + "/"))
    ordered += sorted(n for n in entries if n.startswith(dist_info + "/") and n != record_name)
    record = io.StringIO()
    record_rows = csv.writer(record, lineterminator="\n")  # quotes names with commas, as pip reads them
    tmp = target.with_name(target.name + ".part")
    with zipfile.ZipFile(tmp, "w") as zout:
        for arcname in ordered:
            data, executable = entries[arcname]
            _write_entry(zout, arcname, data, executable, date_time)
            record_rows.writerow([arcname, record_hash(data), len(data)])
        record_rows.writerow([record_name, "", ""])
        _write_entry(zout, record_name, record.getvalue().encode(), False, date_time)
    os.replace(tmp, target)


def _write_entry(zout: zipfile.ZipFile, arcname: str, data: bytes, executable: bool, date_time) -> None:
    info = zipfile.ZipInfo(arcname, date_time=date_time)
    info.compress_type = zipfile.ZIP_DEFLATED
    info.create_system = 3
    info.external_attr = ((0o755 if executable else 0o644) | 0o100000) << 16
    zout.writestr(info, data, compresslevel=6)


def read_dist_info_file(wheel: Path, name: str) -> bytes | None:
    with zipfile.ZipFile(wheel) as zin:
        for arcname in zin.namelist():
            parts = arcname.split("/")
            if len(parts) == 2 and parts[0].endswith(".dist-info") and parts[1] == name:
                return zin.read(arcname)
    return None
