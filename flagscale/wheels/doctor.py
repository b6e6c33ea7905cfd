"""`flagscale doctor`: does what is installed still match what FlagScale built?

Every wheel FlagScale builds carries `flagscale_build.json`; its RECORD lists each file's sha256.
Doctor re-hashes the installed files and names those changed or missing, and notices a backend that
a later plain `pip install` replaced (its version lost the `+fs.` label or its provenance is gone).
"""

from __future__ import annotations

import csv
import importlib.metadata as md
import io
from dataclasses import dataclass, field
from pathlib import Path

from flagscale.wheels.provenance import PinnedBackend, backend_provenance, installed_device_provenance
from flagscale.wheels.wheelfile import record_hash


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


def verify_files(dist: md.Distribution) -> tuple[list[str], list[str]]:
    """(changed, missing) files of an installed distribution, against its RECORD."""
    record = dist.read_text("RECORD") or ""
    changed, missing = [], []
    for row in csv.reader(io.StringIO(record)):
        if len(row) < 2 or not row[1].startswith("sha256="):
            continue
        path = Path(str(dist.locate_file(row[0])))
        if not path.is_file():
            missing.append(row[0])
            continue
        if record_hash(path.read_bytes()) != row[1]:
            changed.append(row[0])
    return changed, missing


def diagnose() -> Report:
    found_flagscale = installed_device_provenance()
    version, own = found_flagscale if found_flagscale else (None, None)
    expected = {_norm(b.distribution): b for b in own.backends} if own else {}
    found: dict[str, BackendHealth] = {}
    for dist in md.distributions():
        prov = backend_provenance(dist)
        if prov is None:
            continue  # not ours; also skips broken dist-info folders (no METADATA, so no Name)
        name = dist.metadata["Name"]
        key = _norm(name)
        if key == "flagscale" or key in found:
            continue  # a copy later on sys.path is shadowed: the first is what Python imports
        changed, missing = verify_files(dist)
        want = expected.get(key)
        found[key] = BackendHealth(
            prov.backend,
            name,
            dist.version,
            want.version if want else None,
            prov.device,
            len(prov.patches),
            changed,
            missing,
        )
    for key, want in expected.items():
        if key in found:
            health = found[key]
            if health.expected_version and health.version != health.expected_version:
                health.problem = (
                    f"installed {health.version}, flagscale {version} was built with {health.expected_version}"
                )
            continue
        found[key] = _absent(want)
    return Report(version, own.device if own else None, sorted(found.values(), key=lambda h: h.backend))


def _absent(want: PinnedBackend) -> BackendHealth:
    """A backend the flagscale wheel pins but no FlagScale build of which is installed."""
    prov = want.provenance
    try:
        installed = md.distribution(want.distribution)
    except md.PackageNotFoundError:
        return BackendHealth(
            prov.backend, want.distribution, None, want.version, prov.device, len(prov.patches), problem="not installed"
        )
    problem = (
        f"replaced by {installed.version} without FlagScale's patches (a plain pip install?); "
        f"reinstall with `flagscale install --backend {prov.backend}`"
    )
    return BackendHealth(
        prov.backend,
        want.distribution,
        installed.version,
        want.version,
        prov.device,
        len(prov.patches),
        problem=problem,
    )


def _norm(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")
