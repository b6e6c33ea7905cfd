"""flagscale.wheels.doctor on small wheels written with flagscale.wheels.wheelfile: unpacked into a temporary
site folder (read through importlib.metadata as installed distributions), and once installed by real
pip into a real (bare) virtual environment."""

from __future__ import annotations

import importlib.metadata as md
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from conftest import REPO_ROOT

from flagscale.wheels.backend_wheel import PROVENANCE_FILE
from flagscale.wheels.doctor import diagnose, verify_files
from flagscale.wheels.wheelfile import write_wheel

BACKEND_VERSION = "1.0+fs.cpu.0badc0de"


def tiny_wheel(
    out: Path,
    name: str,
    version: str,
    files: dict[str, bytes],
    provenance: dict | None,
    executable: tuple[str, ...] = (),
) -> Path:
    dist_info = f"{name}-{version}.dist-info"
    entries = {path: (data, path in executable) for path, data in files.items()}
    entries[f"{dist_info}/METADATA"] = (
        f"Metadata-Version: 2.1\nName: {name.replace('_', '-')}\nVersion: {version}\n".encode(),
        False,
    )
    entries[f"{dist_info}/WHEEL"] = (
        b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
        False,
    )
    if provenance is not None:
        entries[f"{dist_info}/{PROVENANCE_FILE}"] = (json.dumps(provenance).encode(), False)
    out.mkdir(parents=True, exist_ok=True)
    target = out / f"{name}-{version}-py3-none-any.whl"
    write_wheel(target, entries, dist_info)
    return target


def backend_wheel(out: Path, version: str = BACKEND_VERSION, provenance: bool = True, body: bytes = b"X = 1\n") -> Path:
    prov = {
        "backend": "toy",
        "device": "cpu",
        "key": "0badc0de",
        "patches": [
            {"series": "common", "name": "0001-a.patch", "sha256": "a" * 64},
            {"series": "device:cpu", "name": "0001-b.patch", "sha256": "b" * 64},
        ],
    }
    return tiny_wheel(
        out,
        "toy_pkg",
        version,
        {
            "toy_pkg/__init__.py": body,
            "toy_pkg/device.py": b"def device():\n    return 'cpu'\n",
            "toy_pkg/data, with comma.txt": b"quoted in RECORD\n",
            f"toy_pkg-{version}.data/scripts/toy-run": b"#!python\nprint('run')\n",
        },
        prov if provenance else None,
        executable=(f"toy_pkg-{version}.data/scripts/toy-run",),
    )


def flagscale_wheel(out: Path, expected_version: str = BACKEND_VERSION) -> Path:
    """A stand-in for the flagscale wheel: only its dist-info with the provenance doctor reads."""
    prov = {
        "toolchain": {"name": "flagscale", "version": "0.1.0"},
        "device": "cpu",
        "backends": [
            {
                "backend": "toy",
                "device": "cpu",
                "distribution": "toy_pkg",
                "version": expected_version,
                "patches": [{"series": "common", "name": "0001-a.patch", "sha256": "a" * 64}],
            }
        ],
    }
    return tiny_wheel(out, "flagscale", "0.1.0+cpu", {}, prov)


def unpack(wheel: Path, site: Path) -> md.PathDistribution:
    site.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel) as zin:
        zin.extractall(site)
        (dist_info,) = {n.split("/")[0] for n in zin.namelist() if ".dist-info/" in n}
    return md.PathDistribution(site / dist_info)


@pytest.fixture
def site(tmp_path, monkeypatch) -> Path:
    """A site folder that is the only place importlib.metadata looks for installed distributions."""
    folder = tmp_path / "site"
    folder.mkdir()
    monkeypatch.setattr(sys, "path", [str(folder)])
    return folder


# verify_files -------------------------------------------------------------------------------------


def test_verify_files_clean(tmp_path):
    dist = unpack(backend_wheel(tmp_path / "w"), tmp_path / "site")
    assert dist.version == BACKEND_VERSION
    assert json.loads(dist.read_text(PROVENANCE_FILE))["backend"] == "toy"
    assert verify_files(dist) == ([], [])


def test_verify_files_names_changed_and_missing_files(tmp_path):
    site = tmp_path / "site"
    dist = unpack(backend_wheel(tmp_path / "w"), site)
    (site / "toy_pkg/__init__.py").write_bytes(b"X = 2\n")
    (site / "toy_pkg/data, with comma.txt").write_bytes(b"edited\n")
    (site / "toy_pkg/device.py").unlink()
    changed, missing = verify_files(dist)
    assert sorted(changed) == ["toy_pkg/__init__.py", "toy_pkg/data, with comma.txt"]
    assert missing == ["toy_pkg/device.py"]


def test_verify_files_same_size_edit_and_dist_info_edit(tmp_path):
    """A one-byte change that keeps the size, and a changed METADATA, are both caught (hash, not size)."""
    site = tmp_path / "site"
    version = BACKEND_VERSION
    dist = unpack(backend_wheel(tmp_path / "w"), site)
    (site / "toy_pkg/__init__.py").write_bytes(b"X = 3\n")
    metadata = site / f"toy_pkg-{version}.dist-info/METADATA"
    metadata.write_text(metadata.read_text() + "Summary: edited\n")
    changed, missing = verify_files(dist)
    assert set(changed) == {"toy_pkg/__init__.py", f"toy_pkg-{version}.dist-info/METADATA"}
    assert missing == []


def test_verify_files_without_record(tmp_path):
    site = tmp_path / "site"
    dist = unpack(backend_wheel(tmp_path / "w"), site)
    (site / f"toy_pkg-{BACKEND_VERSION}.dist-info/RECORD").unlink()
    assert verify_files(dist) == ([], [])  # nothing to check against (doctor relies on RECORD)


# diagnose -----------------------------------------------------------------------------------------


def test_diagnose_ok(site, tmp_path):
    unpack(flagscale_wheel(tmp_path / "w"), site)
    unpack(backend_wheel(tmp_path / "w"), site)
    report = diagnose()
    assert (report.flagscale_version, report.device, report.ok) == ("0.1.0+cpu", "cpu", True)
    (health,) = report.backends
    assert (health.backend, health.version, health.expected_version, health.device, health.patches) == (
        "toy",
        BACKEND_VERSION,
        BACKEND_VERSION,
        "cpu",
        2,
    )


def test_diagnose_changed_file(site, tmp_path):
    unpack(flagscale_wheel(tmp_path / "w"), site)
    unpack(backend_wheel(tmp_path / "w"), site)
    with open(site / "toy_pkg/device.py", "a") as f:
        f.write("# local edit\n")
    report = diagnose()
    assert not report.ok
    assert report.backends[0].changed == ["toy_pkg/device.py"]


def test_diagnose_replaced_by_a_plain_install(site, tmp_path):
    unpack(flagscale_wheel(tmp_path / "w"), site)
    unpack(backend_wheel(tmp_path / "w", version="1.0", provenance=False), site)
    (health,) = diagnose().backends
    assert health.version == "1.0" and "replaced by 1.0" in health.problem
    assert "flagscale install --backend toy" in health.problem


def test_diagnose_not_installed(site, tmp_path):
    unpack(flagscale_wheel(tmp_path / "w"), site)
    (health,) = diagnose().backends
    assert (health.version, health.problem) == (None, "not installed")


def test_diagnose_other_fs_build_than_flagscale_was_built_with(site, tmp_path):
    unpack(flagscale_wheel(tmp_path / "w", expected_version="1.0+fs.cpu.11111111"), site)
    unpack(backend_wheel(tmp_path / "w"), site)
    (health,) = diagnose().backends
    assert not health.ok
    assert health.problem == f"installed {BACKEND_VERSION}, flagscale 0.1.0+cpu was built with 1.0+fs.cpu.11111111"


def test_diagnose_backend_without_flagscale_wheel(site, tmp_path):
    """`flagscale install` from a checkout: only the backend carries provenance."""
    unpack(backend_wheel(tmp_path / "w"), site)
    report = diagnose()
    assert report.flagscale_version is None and report.ok
    assert [h.backend for h in report.backends] == ["toy"]


def test_diagnose_ignores_a_broken_dist_info(site, tmp_path):
    """An empty leftover dist-info folder (an interrupted pip) must not crash doctor."""
    unpack(flagscale_wheel(tmp_path / "w"), site)
    unpack(backend_wheel(tmp_path / "w"), site)
    (site / "leftover-0.1.dist-info").mkdir()
    assert diagnose().ok


def test_diagnose_checks_the_distribution_python_imports(tmp_path, monkeypatch):
    """Two copies on sys.path: the first one is what `import` and `importlib.metadata` use, so it is
    the one doctor checks (an edited shadowed copy further down the path does not matter)."""
    first, second = tmp_path / "first", tmp_path / "second"
    unpack(flagscale_wheel(tmp_path / "w"), first)
    unpack(backend_wheel(tmp_path / "w"), first)
    unpack(backend_wheel(tmp_path / "w"), second)
    (second / "toy_pkg/device.py").write_text("edited\n")
    monkeypatch.setattr(sys, "path", [str(first), str(second)])
    assert diagnose().ok
    monkeypatch.setattr(sys, "path", [str(second), str(first)])
    report = diagnose()
    assert report.backends[0].changed == ["toy_pkg/device.py"]


# a real pip install ------------------------------------------------------------------------------


def _pip() -> list[str]:
    return [sys.executable, "-m", "pip"]


def test_doctor_after_a_real_pip_install(tmp_path):
    """pip rewrites RECORD on install (scripts moved to bin/ with a new shebang and hash, INSTALLER
    added): doctor must accept exactly what pip wrote, then notice an edit and a replacement."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    wheels = [backend_wheel(tmp_path / "w"), flagscale_wheel(tmp_path / "w")]
    pip = [*_pip(), "--python", str(python), "install", "--no-deps", "--no-index", "--quiet"]
    subprocess.run([*pip, *map(str, wheels)], check=True)
    assert (venv / "bin" / "toy-run").is_file()
    probe = (
        "import json, sys; sys.path.insert(0, sys.argv[1]); from flagscale.wheels.doctor import diagnose; "
        "r = diagnose(); "
        "print(json.dumps([r.ok] + [[b.backend, b.version, b.changed, b.missing, b.problem] for b in r.backends]))"
    )

    def doctor():
        out = subprocess.run([str(python), "-c", probe, str(REPO_ROOT)], check=True, capture_output=True, text=True)
        return json.loads(out.stdout)

    assert doctor() == [True, ["toy", BACKEND_VERSION, [], [], ""]]
    (venv / "bin" / "toy-run").write_text("#!/bin/sh\necho tampered\n")
    ok, (_, _, changed, missing, _) = doctor()
    assert not ok and changed == ["../../../bin/toy-run"] and missing == []

    plain = backend_wheel(tmp_path / "plain", version="1.0", provenance=False)
    subprocess.run([*pip, str(plain)], check=True)
    ok, (backend, version, _, _, problem) = doctor()
    assert (ok, backend, version) == (False, "toy", "1.0")
    assert problem.startswith("replaced by 1.0 without FlagScale's patches")
