"""flagscale.wheels.wheelfile: re-versioning and reproducible re-packing of wheels, on small wheels the tests
write with zipfile (unsorted entries, wall-clock times, odd permissions, a stale RECORD)."""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import time
import zipfile
from pathlib import Path

import pytest

from flagscale.errors import FlagScaleError
from flagscale.wheels.wheelfile import WheelEdit, read_dist_info_file, rewrite_wheel, source_date_epoch, wheel_parts

METADATA = (
    "Metadata-Version: 2.1\n"
    "Name: toy-pkg\n"
    "Version: 1.0\n"
    "Summary: a toy\n"
    "Requires-Dist: numpy>=1.20\n"
    "Requires-Dist: Torch==2.1; platform_system == 'Linux'\n"
    "Requires-Dist: rich[jupyter]>=13\n"
    "Provides-Extra: test\n"
    "\n"
    "The long description.\n"
    "Requires-Dist: not-a-header (this is body text)\n"
)


def _entry(zout: zipfile.ZipFile, name: str, data: bytes, mode: int, when=(2024, 5, 17, 13, 37, 42)) -> None:
    info = zipfile.ZipInfo(name, date_time=when)
    info.create_system = 3
    info.external_attr = (mode | 0o100000) << 16
    zout.writestr(info, data)


def make_wheel(folder: Path, when=(2024, 5, 17, 13, 37, 42), extra: dict[str, tuple[bytes, int]] | None = None) -> Path:
    """toy_pkg-1.0: deliberately unsorted, a directory entry, group/other-writable and exec modes, stale RECORD."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "toy_pkg-1.0-py3-none-any.whl"
    entries = {
        "toy_pkg-1.0.dist-info/WHEEL": (
            b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
            0o644,
        ),
        "toy_pkg/zeta.py": (b"Z = 1\n", 0o600),
        "toy_pkg-1.0.dist-info/METADATA": (METADATA.encode(), 0o664),
        "toy_pkg/__init__.py": (b"from toy_pkg.zeta import Z\n", 0o666),
        "toy_pkg/bin/run.sh": (b"#!/bin/sh\necho run\n", 0o700),
        "toy_pkg-1.0.data/scripts/toy-run": (b"#!python\nprint('toy')\n", 0o777),
        "toy_pkg-1.0.data/data/share/toy.txt": (b"shared\n", 0o444),
        "toy_pkg-1.0.dist-info/RECORD": (b"toy_pkg/zeta.py,sha256=stale,1\n", 0o644),
        "toy_pkg-1.0.dist-info/entry_points.txt": (b"[console_scripts]\ntoy = toy_pkg:main\n", 0o644),
        **(extra or {}),
    }
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zout:
        dir_info = zipfile.ZipInfo("toy_pkg/", date_time=when)
        dir_info.external_attr = (0o40755 << 16) | 0x10
        zout.writestr(dir_info, b"")
        for name, (data, mode) in entries.items():
            _entry(zout, name, data, mode, when)
    return path


def _record(zin: zipfile.ZipFile, dist_info: str) -> list[list[str]]:
    return list(csv.reader(io.StringIO(zin.read(f"{dist_info}/RECORD").decode())))


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


@pytest.fixture(autouse=True)
def _no_ambient_epoch(monkeypatch):
    monkeypatch.delenv("SOURCE_DATE_EPOCH", raising=False)


def test_new_version_renames_dist_info_and_data(tmp_path):
    out = rewrite_wheel(make_wheel(tmp_path / "in"), tmp_path / "out", WheelEdit(version="1.0+fs.cpu.1a2b3c4d"))
    assert out == tmp_path / "out" / "toy_pkg-1.0+fs.cpu.1a2b3c4d-py3-none-any.whl"
    assert wheel_parts(out) == ("toy_pkg", "1.0+fs.cpu.1a2b3c4d", "py3-none-any")
    with zipfile.ZipFile(out) as zin:
        names = zin.namelist()
        metadata = zin.read("toy_pkg-1.0+fs.cpu.1a2b3c4d.dist-info/METADATA").decode()
    assert not [n for n in names if n.startswith(("toy_pkg-1.0.dist-info/", "toy_pkg-1.0.data/"))], names
    assert {
        "toy_pkg-1.0+fs.cpu.1a2b3c4d.data/scripts/toy-run",
        "toy_pkg-1.0+fs.cpu.1a2b3c4d.data/data/share/toy.txt",
        "toy_pkg-1.0+fs.cpu.1a2b3c4d.dist-info/WHEEL",
        "toy_pkg-1.0+fs.cpu.1a2b3c4d.dist-info/entry_points.txt",
        "toy_pkg-1.0+fs.cpu.1a2b3c4d.dist-info/RECORD",
        "toy_pkg/__init__.py",
        "toy_pkg/bin/run.sh",
    } <= set(names)
    assert "toy_pkg/" not in names  # no directory entries
    assert "Version: 1.0+fs.cpu.1a2b3c4d\n" in metadata and "Version: 1.0\n" not in metadata
    assert metadata.startswith("Metadata-Version: 2.1\n")


def test_without_a_version_the_names_stay(tmp_path):
    out = rewrite_wheel(make_wheel(tmp_path / "in"), tmp_path / "out", WheelEdit())
    assert out.name == "toy_pkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(out) as zin:
        assert "Version: 1.0\n" in zin.read("toy_pkg-1.0.dist-info/METADATA").decode()


def test_record_is_regenerated_and_matches_every_entry(tmp_path):
    extra = {"toy_pkg/data, with comma.txt": (b"comma\n", 0o644)}
    out = rewrite_wheel(
        make_wheel(tmp_path / "in", extra=extra),
        tmp_path / "out",
        WheelEdit(
            version="1.0+fs.x",
            add_requires=("megatron-core @ file:///tmp/w.whl",),
            dist_info_files={"flagscale_build.json": b"{}\n"},
            files={"toy_pkg/_project/pins.toml": b"[x]\n"},
        ),
    )
    dist_info = "toy_pkg-1.0+fs.x.dist-info"
    with zipfile.ZipFile(out) as zin:
        rows = _record(zin, dist_info)
        contents = {n: zin.read(n) for n in zin.namelist()}
    assert "stale" not in contents[f"{dist_info}/RECORD"].decode()
    assert [r[0] for r in rows].count(f"{dist_info}/RECORD") == 1
    assert [f"{dist_info}/RECORD", "", ""] in rows
    listed = {r[0]: r for r in rows if r[0] != f"{dist_info}/RECORD"}
    assert set(listed) == set(contents) - {f"{dist_info}/RECORD"}
    for name, (_, digest, size) in listed.items():
        assert digest == f"sha256={_b64(contents[name])}", name
        assert int(size) == len(contents[name]), name
    assert "toy_pkg/data, with comma.txt" in listed  # csv-quoted, so pip and doctor read it back


def test_requires_dist_added_and_dropped(tmp_path):
    out = rewrite_wheel(
        make_wheel(tmp_path / "in"),
        tmp_path / "out",
        WheelEdit(
            version="1.0+cpu",
            add_requires=("megatron-core @ file:///tmp/m.whl", "torch==2.13.0"),
            drop_requires=("torch", "Rich"),
        ),
    )
    with zipfile.ZipFile(out) as zin:
        metadata = zin.read("toy_pkg-1.0+cpu.dist-info/METADATA").decode()
    head, body = metadata.split("\n\n", 1)
    requires = [line for line in head.splitlines() if line.startswith("Requires-Dist:")]
    assert requires == [
        "Requires-Dist: numpy>=1.20",
        "Requires-Dist: megatron-core @ file:///tmp/m.whl",
        "Requires-Dist: torch==2.13.0",
    ]
    # headers after the requirements keep their place; the body is untouched (even a Requires-Dist-looking line)
    assert head.splitlines()[-1] == "Provides-Extra: test"
    assert body == "The long description.\nRequires-Dist: not-a-header (this is body text)\n"


def test_requires_added_to_metadata_without_any(tmp_path):
    src = make_wheel(tmp_path / "in")
    plain = tmp_path / "plain" / src.name
    plain.parent.mkdir()
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(plain, "w") as zout:
        for info in zin.infolist():
            data = zin.read(info)
            if info.filename.endswith("METADATA"):
                data = b"Metadata-Version: 2.1\nName: toy-pkg\nVersion: 1.0\n"
            zout.writestr(info, data)
    out = rewrite_wheel(plain, tmp_path / "out", WheelEdit(add_requires=("a==1", "b==2")))
    with zipfile.ZipFile(out) as zin:
        metadata = zin.read("toy_pkg-1.0.dist-info/METADATA").decode()
    assert metadata == "Metadata-Version: 2.1\nName: toy-pkg\nVersion: 1.0\nRequires-Dist: a==1\nRequires-Dist: b==2\n"


def test_entries_sorted_with_dist_info_last_and_record_at_the_end(tmp_path):
    out = rewrite_wheel(
        make_wheel(tmp_path / "in"),
        tmp_path / "out",
        WheelEdit(version="2", dist_info_files={"flagscale_build.json": b"{}\n"}),
    )
    with zipfile.ZipFile(out) as zin:
        names = zin.namelist()
    dist_info = [n for n in names if n.startswith("toy_pkg-2.dist-info/")]
    others = [n for n in names if not n.startswith("toy_pkg-2.dist-info/")]
    assert names == others + dist_info
    assert others == sorted(others)
    assert dist_info[-1] == "toy_pkg-2.dist-info/RECORD"
    assert dist_info[:-1] == sorted(dist_info[:-1])
    assert "toy_pkg-2.dist-info/flagscale_build.json" in dist_info


def test_two_rewrites_are_byte_identical_whatever_the_input_times(tmp_path):
    edit = WheelEdit(version="1.0+fs.cpu.deadbeef", add_requires=("x==1",), dist_info_files={"p.json": b"{}"})
    first = rewrite_wheel(make_wheel(tmp_path / "a", when=(2024, 1, 2, 3, 4, 6)), tmp_path / "out1", edit)
    time.sleep(1.1)  # a wall-clock time leaking into the zip would show
    second = rewrite_wheel(make_wheel(tmp_path / "b", when=(2025, 6, 7, 8, 9, 10)), tmp_path / "out2", edit)
    assert first.name == second.name
    assert first.read_bytes() == second.read_bytes()
    again = rewrite_wheel(first, tmp_path / "out3", WheelEdit())  # re-packing our own output is a fixed point
    assert again.read_bytes() == first.read_bytes()


def test_timestamps_follow_source_date_epoch(tmp_path, monkeypatch):
    src = make_wheel(tmp_path / "in")
    out = rewrite_wheel(src, tmp_path / "default", WheelEdit())
    with zipfile.ZipFile(out) as zin:
        assert {i.date_time for i in zin.infolist()} == {(1980, 1, 1, 0, 0, 0)}

    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    assert source_date_epoch() == 1700000000
    out = rewrite_wheel(src, tmp_path / "epoch", WheelEdit())
    with zipfile.ZipFile(out) as zin:
        assert {i.date_time for i in zin.infolist()} == {tuple(time.gmtime(1700000000)[:6])}
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000002")
    assert rewrite_wheel(src, tmp_path / "epoch2", WheelEdit()).read_bytes() != out.read_bytes()

    monkeypatch.setenv("SOURCE_DATE_EPOCH", "0")  # before 1980: zip cannot store it, clamp
    assert source_date_epoch() == 315532800
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "yesterday")
    with pytest.raises(FlagScaleError, match="SOURCE_DATE_EPOCH='yesterday'"):
        rewrite_wheel(src, tmp_path / "bad", WheelEdit())


def test_modes_are_normalized(tmp_path):
    out = rewrite_wheel(
        make_wheel(tmp_path / "in"), tmp_path / "out", WheelEdit(version="3", files={"toy_pkg/extra.txt": b"x"})
    )
    with zipfile.ZipFile(out) as zin:
        modes = {i.filename: i.external_attr >> 16 for i in zin.infolist()}
        assert {i.create_system for i in zin.infolist()} == {3}
        assert {i.compress_type for i in zin.infolist()} == {zipfile.ZIP_DEFLATED}
    expected = {
        "toy_pkg/bin/run.sh": 0o755,
        "toy_pkg-3.data/scripts/toy-run": 0o755,  # any exec bit -> 0o755
        "toy_pkg/zeta.py": 0o644,
        "toy_pkg/__init__.py": 0o644,
        "toy_pkg-3.data/data/share/toy.txt": 0o644,
        "toy_pkg/extra.txt": 0o644,
        "toy_pkg-3.dist-info/METADATA": 0o644,
        "toy_pkg-3.dist-info/RECORD": 0o644,
    }
    for name, mode in expected.items():
        assert modes[name] == 0o100000 | mode, (name, oct(modes[name]))
    assert all(m in (0o100644, 0o100755) for m in modes.values()), {n: oct(m) for n, m in modes.items()}


def test_installs_with_pip_semantics(tmp_path):
    """What pip checks on install: the dist-info matches the file name, and RECORD covers everything."""
    out = rewrite_wheel(make_wheel(tmp_path / "in"), tmp_path / "out", WheelEdit(version="1.0+fs.cpu.0"))
    name, version, _ = wheel_parts(out)
    with zipfile.ZipFile(out) as zin:
        dist_infos = {n.split("/")[0] for n in zin.namelist() if ".dist-info/" in n}
        assert dist_infos == {f"{name}-{version}.dist-info"}
        assert zin.testzip() is None


def test_added_files_and_reading_them_back(tmp_path):
    out = rewrite_wheel(
        make_wheel(tmp_path / "in"),
        tmp_path / "out",
        WheelEdit(
            version="1.0+cpu",
            dist_info_files={"flagscale_build.json": b'{"device": "cpu"}\n'},
            files={"toy_pkg/_project/third_party/upstreams.toml": b"[toy]\n", "toy_pkg/zeta.py": b"Z = 2\n"},
        ),
    )
    assert read_dist_info_file(out, "flagscale_build.json") == b'{"device": "cpu"}\n'
    assert read_dist_info_file(out, "missing.json") is None
    with zipfile.ZipFile(out) as zin:
        assert zin.read("toy_pkg/_project/third_party/upstreams.toml") == b"[toy]\n"
        assert zin.read("toy_pkg/zeta.py") == b"Z = 2\n"  # `files` replaces an entry of the same name


def test_rewrite_in_place_overwrites_atomically(tmp_path):
    src = make_wheel(tmp_path / "in")
    out = rewrite_wheel(src, src.parent, WheelEdit())
    assert out == src
    assert not list(src.parent.glob("*.part"))
    with zipfile.ZipFile(out) as zin:
        assert zin.namelist()[-1] == "toy_pkg-1.0.dist-info/RECORD"


def test_not_a_wheel(tmp_path):
    with pytest.raises(FlagScaleError, match="not a wheel file name"):
        wheel_parts(tmp_path / "toy.zip")
    bad = tmp_path / "toy_pkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(bad, "w") as zout:
        zout.writestr("toy_pkg/__init__.py", b"")
        zout.writestr("toy_pkg-1.0.dist-info/WHEEL", b"Wheel-Version: 1.0\n")
    with pytest.raises(FlagScaleError, match="no toy_pkg-1.0.dist-info/METADATA"):
        rewrite_wheel(bad, tmp_path / "out", WheelEdit(version="2"))
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())
