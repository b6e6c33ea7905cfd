"""`flagscale doctor`: does what is installed still match what FlagScale built?

Every wheel FlagScale builds carries `flagscale_build.json`; its RECORD lists each file's sha256.
Doctor re-hashes the installed files and names those changed or missing, and notices a backend that
a later plain `pip install` replaced (its version lost the `+fs.` label or its provenance is gone).
"""

from __future__ import annotations

import base64
import csv
import hashlib
import importlib.metadata as md
import io
import json
from dataclasses import dataclass, field
from pathlib import Path

from flagscale.wheels.backend_wheel import PROVENANCE_FILE


@dataclass
class BackendHealth:
    backend: str
    distribution: str
    version: str | None  # None: not installed
    expected_version: str | None
    device: str | None
    patches: int
    changed: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    problem: str = ""

    @property
    def ok(self) -> bool:
        return not (self.problem or self.changed or self.missing)


@dataclass
class Report:
    flagscale_version: str | None
    device: str | None
    backends: list[BackendHealth]

    @property
    def ok(self) -> bool:
        return all(b.ok for b in self.backends)


def _provenance(dist: md.Distribution) -> dict | None:
    text = dist.read_text(PROVENANCE_FILE)
    return json.loads(text) if text else None


def verify_files(dist: md.Distribution) -> tuple[list[str], list[str]]:
    """(changed, missing) files of an installed distribution, against its RECORD."""
    record = dist.read_text("RECORD") or ""
    changed, missing = [], []
    for row in csv.reader(io.StringIO(record)):
        if len(row) < 2 or not row[1].startswith("sha256="):
            continue
        path = Path(dist.locate_file(row[0]))
        if not path.is_file():
            missing.append(row[0])
            continue
        digest = base64.urlsafe_b64encode(hashlib.sha256(path.read_bytes()).digest()).rstrip(b"=").decode()
        if digest != row[1][len("sha256="):]:
            changed.append(row[0])
    return changed, missing


def diagnose() -> Report:
    try:
        flagscale = md.distribution("flagscale")
        own = _provenance(flagscale) or {}
        version = flagscale.version
    except md.PackageNotFoundError:
        own, version = {}, None
    expected = {b["distribution"]: b for b in own.get("backends", [])}
    found: dict[str, BackendHealth] = {}
    for dist in md.distributions():
        prov = _provenance(dist)
        if prov is None or "backend" not in prov:
            continue  # also skips broken dist-info folders (no METADATA, so no Name)
        name = dist.metadata["Name"]
        key = _norm(name)
        if key == "flagscale" or key in found:
            continue  # a copy later on sys.path is shadowed: the first is what Python imports
        changed, missing = verify_files(dist)
        want = next((e for d, e in expected.items() if _norm(d) == key), None)
        found[key] = BackendHealth(prov["backend"], name, dist.version, want["version"] if want else None,
                                   prov.get("device"), len(prov.get("patches", [])), changed, missing)
    for dist_name, want in expected.items():
        key = _norm(dist_name)
        if key in found:
            health = found[key]
            if health.expected_version and health.version != health.expected_version:
                health.problem = f"installed {health.version}, flagscale {version} was built with {health.expected_version}"
            continue
        try:
            installed = md.distribution(dist_name)
            problem = (f"replaced by {installed.version} without FlagScale's patches (a plain pip install?); "
                       f"reinstall with `flagscale install --backend {want['backend']}`")
            found[key] = BackendHealth(want["backend"], dist_name, installed.version, want["version"],
                                       want.get("device"), len(want.get("patches", [])), problem=problem)
        except md.PackageNotFoundError:
            found[key] = BackendHealth(want["backend"], dist_name, None, want["version"], want.get("device"),
                                       len(want.get("patches", [])), problem="not installed")
    return Report(version, own.get("device"), sorted(found.values(), key=lambda h: h.backend))


def _norm(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")
