"""The rebase: every patch tried and reported, automatic merges, already-upstream patches, and the workspace
round trip (stop at a conflict, resolve, --continue, --abort). Toy upstreams with real git; one real release."""

from __future__ import annotations

import shutil
import tomllib
from pathlib import Path

import pytest
from conftest import TOY_BASE, copy_project, git, make_patch, write_tree
from test_workflow import REPO_BASE, add_series, snapshot, toy_series  # noqa: F401 (toy_series: a fixture)
from typer.testing import CliRunner

from flagscale.cli import app
from flagscale.errors import ConfigError
from flagscale.patches.rebase import abort_rebase, continue_rebase, rebase, resolve_adjacent
from flagscale.patches.series import read_series
from flagscale.patches.workflow import check, export
from flagscale.upstream.project import Project

SHA = "1" * 64
WIGGLE = shutil.which("wiggle") is not None


def new_release(tmp_path: Path, edit) -> Path:
    files = {**TOY_BASE, "PKG-INFO": TOY_BASE["PKG-INFO"].replace("1.0", "1.1")}
    edit(files)
    return write_tree(tmp_path / "toy-1.1", files)


def replace_line(files: dict, path: str, old: str, new: str) -> None:
    assert old in files[path]
    files[path] = files[path].replace(old, new)


def toy_rebase(project, old: Path, new: Path, cache, **kwargs):
    project.__dict__.pop("pins", None)  # the pins file may have changed since the last call
    return rebase(project, "toy", "1.1", sha256=SHA, source=str(new), old_source=str(old), cache=cache, **kwargs)


def statuses(result) -> dict[tuple[str, str], str]:
    return {(r.series, r.name): r.result for r in result.report}


def test_clean_offset_writes_patches_and_pin(toy_series, toy_upstream, cache, tmp_path):  # noqa: F811
    new = new_release(tmp_path, lambda f: f.update({"toy/__init__.py": "header 1\nheader 2\n" + f["toy/__init__.py"]}))
    result = toy_rebase(toy_series, toy_upstream, new, cache)
    assert [(r.series, r.name, r.status) for r in result.report] == [
        ("common", "0001-spell-out-five.patch", "offset"),
        ("common", "0002-device-accessor.patch", "clean"),
        ("device:npu", "0001-npu-accel.patch", "clean"),
    ]
    assert result.written and result.complete
    pins = tomllib.loads((toy_series.root / "third_party/upstreams.toml").read_text())
    assert pins["toy"]["sdist"]["version"] == "1.1" and pins["toy"]["tag"] == "v1.1"
    assert pins["toy"]["sdist"]["sha256"] == SHA
    refreshed = (toy_series.common_series_dir("toy") / "0001-spell-out-five.patch").read_bytes()
    assert b"@@ -4,7 +4,7 @@" in refreshed  # the hunk moved with the two new header lines
    toy_series.__dict__.pop("pins", None)
    assert {r.status for r in check(toy_series, source=str(new), cache=cache)} == {"ok"}


def _stack_spell_out_thirty(project, tmp_path: Path) -> None:
    """A third common patch stacked on 0001's file (made on top of 0001's result)."""
    common = project.common_series_dir("toy")
    after_p1 = {**REPO_BASE, "python/toy/__init__.py": TOY_BASE["toy/__init__.py"].replace("line 5\n", "line five\n")}
    third = make_patch(
        after_p1,
        {"python/toy/__init__.py": after_p1["python/toy/__init__.py"].replace("line 30\n", "line thirty\n")},
        tmp_path,
        subject="toy: spell out thirty",
    )
    add_series(
        common,
        {
            "0001-spell-out-five.patch": (common / "0001-spell-out-five.patch").read_bytes(),
            "0002-device-accessor.patch": (common / "0002-device-accessor.patch").read_bytes(),
            "0003-spell-out-thirty.patch": third,
        },
    )


def test_every_patch_is_tried_after_a_conflict(toy_series, toy_upstream, cache, tmp_path):  # noqa: F811
    _stack_spell_out_thirty(toy_series, tmp_path)
    before = snapshot(toy_series.root)
    new = new_release(tmp_path, lambda f: replace_line(f, "toy/__init__.py", "line 5\n", "line V\n"))
    result = toy_rebase(toy_series, toy_upstream, new, cache)
    assert statuses(result) == {
        ("common", "0001-spell-out-five.patch"): "conflict",
        ("common", "0002-device-accessor.patch"): "clean",
        ("common", "0003-spell-out-thirty.patch"): "dependent-on-conflict",
        ("device:npu", "0001-npu-accel.patch"): "clean",
    }
    conflict, stacked_row = result.report[0], result.report[2]
    assert [(c.path, c.start, c.end, c.upstream, c.patch, c.base) for c in conflict.conflicts] == [
        ("python/toy/__init__.py", 5, 5, "line V", "line five", "line 5")
    ]
    assert "python/toy/__init__.py line 5" in conflict.detail
    assert stacked_row.depends_on == "common/0001-spell-out-five.patch" and "without it: clean" in stacked_row.detail
    assert not result.complete and not result.written
    assert snapshot(toy_series.root) == before  # series and pin untouched


def test_device_patch_on_a_conflicting_common_patch(toy_series, toy_upstream, cache, tmp_path):  # noqa: F811
    # 0002 rewrites device() and adds accel.py, which the npu patch changes; 1.1 changes the same line of device().
    new = new_release(tmp_path, lambda f: replace_line(f, "toy/device.py", "'cuda'", "'xpu'"))
    result = toy_rebase(toy_series, toy_upstream, new, cache)
    assert statuses(result) == {
        ("common", "0001-spell-out-five.patch"): "clean",
        ("common", "0002-device-accessor.patch"): "conflict",
        ("device:npu", "0001-npu-accel.patch"): "dependent-on-conflict",
    }
    (region,) = result.report[1].conflicts
    assert (region.path, region.upstream, region.patch) == (
        "python/toy/device.py",
        "    return 'xpu'",
        "    return accel()",
    )
    npu = result.report[2]
    assert npu.depends_on == "common/0002-device-accessor.patch"
    assert "python/toy/accel.py" in npu.detail  # without 0002 its file does not exist: said, not skipped


def _strategy_series(project, tmp_path: Path) -> None:
    """Three patches that strict apply refuses on the new release, each for a different merge to fix."""
    three_way = make_patch(  # its context line 2 changes upstream: a 3-way merge is enough
        REPO_BASE,
        {"python/toy/__init__.py": TOY_BASE["toy/__init__.py"].replace("line 5\n", "line five\n")},
        tmp_path,
        subject="toy: spell out five",
    )
    insertion = make_patch(  # adds a line next to one the release changes: git calls that a conflict
        REPO_BASE,
        {"python/toy/device.py": "# the accelerator in use\n" + TOY_BASE["toy/device.py"]},
        tmp_path,
        subject="toy: say what device() is",
    )
    words = make_patch(  # changes another word of the line the release changes: wiggle's word merge
        REPO_BASE,
        {"python/toy/bin/run.sh": "#!/bin/sh\necho run fast\n"},
        tmp_path,
        subject="toy: run fast",
    )
    add_series(
        project.common_series_dir("toy"),
        {"0001-three-way.patch": three_way, "0002-insertion.patch": insertion, "0003-words.patch": words},
    )
    add_series(project.device_series_dir("npu", "toy"), {})


def _strategy_release(files: dict) -> None:
    replace_line(files, "toy/__init__.py", "line 2\n", "LINE 2\n")
    replace_line(files, "toy/device.py", "def device():", "def device(index=0):")
    replace_line(files, "toy/bin/run.sh", "echo run", "echo walk")


def test_merges_before_declaring_a_conflict(toy_project, toy_upstream, cache, tmp_path):
    _strategy_series(toy_project, tmp_path)
    new = new_release(tmp_path, _strategy_release)
    result = toy_rebase(toy_project, toy_upstream, new, cache)
    assert statuses(result) == {
        ("common", "0001-three-way.patch"): "merged (3-way myers)",
        ("common", "0002-insertion.patch"): "merged (adjacent insertion)",
        ("common", "0003-words.patch"): "merged (wiggle)" if WIGGLE else "conflict",
    }
    if not WIGGLE:
        assert "wiggle is not installed" in result.report[2].detail
        return
    assert result.written
    common = toy_project.common_series_dir("toy")
    assert b"+echo walk fast" in (common / "0003-words.patch").read_bytes()
    assert b"+# the accelerator in use\n def device(index=0):" in (common / "0002-insertion.patch").read_bytes()
    toy_project.__dict__.pop("pins", None)
    assert {r.status for r in check(toy_project, source=str(new), cache=cache)} == {"ok"}  # strict apply on 1.1


def test_already_upstream_is_reported_and_dropped_on_request(toy_series, toy_upstream, cache, tmp_path):  # noqa: F811
    before = snapshot(toy_series.root)
    new = new_release(tmp_path, lambda f: replace_line(f, "toy/__init__.py", "line 5\n", "line five\n"))
    kept = toy_rebase(toy_series, toy_upstream, new, cache)
    row = kept.report[0]
    assert (row.name, row.status, row.absorbed_by) == ("0001-spell-out-five.patch", "already-upstream", "toy 1.1")
    assert not kept.complete and not kept.written and snapshot(toy_series.root) == before
    dropped = toy_rebase(toy_series, toy_upstream, new, cache, drop_upstreamed=True)
    assert dropped.written and [r.status for r in dropped.report] == ["already-upstream", "clean", "clean"]
    common = toy_series.common_series_dir("toy")
    assert not (common / "0001-spell-out-five.patch").exists()
    assert read_series(common, "common").names == ("0002-device-accessor.patch",)
    toy_series.__dict__.pop("pins", None)
    assert {r.status for r in check(toy_series, source=str(new), cache=cache)} == {"ok"}


def diff3(release: str, base: str, patch: str) -> bytes:
    return f"a\n<<<<<<< HEAD\n{release}||||||| base\n{base}=======\n{patch}>>>>>>> patch\nz\n".encode()


@pytest.mark.parametrize(
    ("release", "base", "patch", "merged"),
    [
        ("", "import old\n", "import ours\nimport old\n", "a\nimport ours\nz\n"),  # insert next to a removal
        ("x = 2\n", "x = 1\n", "x = 1\n# ours\n", "a\nx = 2\n# ours\nz\n"),  # insert after a change
        ("", "from u import log\n\n", "from u import log\nimport ours\n\n", "a\nimport ours\nz\n"),  # among
        ("y\n", "", "x\n", None),  # both insert at one place: order unknown
        ("x = 2\n", "x = 1\n", "x = 3\n", None),  # both change one line
    ],
)
def test_adjacent_insertion_regions(release, base, patch, merged):
    assert resolve_adjacent(diff3(release, base, patch)) == (merged.encode() if merged else None)


def _two_conflicts(project, tmp_path: Path) -> Path:
    """Patch 1 and 3 conflict with the release; 2 touches another file; the npu patch is on top."""
    _stack_spell_out_thirty(project, tmp_path)

    def edit(files):
        # the same word as the patches: no merge (not even wiggle's word merge) can keep both
        replace_line(files, "toy/__init__.py", "line 5\n", "line V\n")
        replace_line(files, "toy/__init__.py", "line 30\n", "line XXX\n")

    return new_release(tmp_path, edit)


def test_workspace_round_trip(toy_series, toy_upstream, cache, tmp_path):  # noqa: F811
    new = _two_conflicts(toy_series, tmp_path)
    before = snapshot(toy_series.root)
    ws = tmp_path / "ws"
    args = ["--sha256", SHA, "--source", str(new), "--old-source", str(toy_upstream), "--root", str(toy_series.root)]
    run = CliRunner().invoke(app, ["patch", "rebase", "toy", "--to", "1.1", "--workspace", str(ws), *args])
    assert run.exit_code == 1, run.output
    assert "Stopped at common/0001-spell-out-five.patch" in " ".join(run.output.split())
    assert "line V" in run.output and "line five" in run.output  # both sides printed
    assert snapshot(toy_series.root) == before
    init = ws / "python/toy/__init__.py"
    text = init.read_text()
    assert "<<<<<<< " in text and "||||||| " in text and "line five" in text  # diff3 markers
    assert git(ws, "log", "-1", "--format=%s").stdout.strip().startswith("upstream: Toy v1.1")
    with pytest.raises(ConfigError, match="unmerged"):
        continue_rebase(ws)
    # Resolve the first conflict and stage it: --continue commits it and stops at the next one.
    resolved = TOY_BASE["toy/__init__.py"].replace("line 5\n", "line V (five)\n").replace("line 30\n", "line XXX\n")
    write_tree(ws, {"python/toy/__init__.py": resolved})
    git(ws, "add", "python/toy/__init__.py")
    second = continue_rebase(ws)
    assert second.in_progress == "common/0003-spell-out-thirty.patch" and not second.written
    assert "line thirty" in init.read_text() and "<<<<<<< " in init.read_text()
    # Resolve the second one and commit it ourselves.
    write_tree(ws, {"python/toy/__init__.py": resolved.replace("line XXX\n", "line XXX (thirty)\n")})
    git(ws, "commit", "-qa", "--no-edit")  # the message (and author) git prepared for the patch
    run = CliRunner().invoke(app, ["patch", "rebase", "--continue", str(ws)])
    assert run.exit_code == 0, run.output
    assert "series and third_party/upstreams.toml written" in run.output
    toy_series.__dict__.pop("pins", None)
    assert {r.status for r in check(toy_series, source=str(new), cache=cache)} == {"ok"}
    common = toy_series.common_series_dir("toy")
    assert b"+line V (five)" in (common / "0001-spell-out-five.patch").read_bytes()
    assert read_series(common, "common").names == (
        "0001-spell-out-five.patch",
        "0002-device-accessor.patch",
        "0003-spell-out-thirty.patch",
    )
    assert export(toy_series, "toy", ws).written == []  # the workspace is a checkout of what was written


def test_abort_leaves_everything_as_before(toy_series, toy_upstream, cache, tmp_path):  # noqa: F811
    new = _two_conflicts(toy_series, tmp_path)
    before = snapshot(toy_series.root)
    ws = tmp_path / "ws"
    result = toy_rebase(toy_series, toy_upstream, new, cache, workspace=ws)
    assert result.in_progress == "common/0001-spell-out-five.patch"
    assert (ws / ".git" / "flagscale-rebase.json").is_file()
    write_tree(ws, {"python/toy/__init__.py": "half resolved\n"})
    git(ws, "add", "-A")
    continue_rebase(ws)  # moves on to the second conflict
    run = CliRunner().invoke(app, ["patch", "rebase", "--abort", str(ws)])
    assert run.exit_code == 0, run.output
    assert not ws.exists() and snapshot(toy_series.root) == before  # byte for byte
    with pytest.raises(ConfigError, match="not a rebase workspace"):
        abort_rebase(tmp_path)


# ----------------------------------------------------------------------------------- a real release
MEGATRON_0170 = ("0.17.0", "ff66c206ed164bc602ff00310388605fac41f284262176e17246a9e94163b205")


def take_release_side(path: Path) -> None:
    """Resolve every diff3 region of `path` to the new release's side (the patch gives up those lines)."""
    out, section = [], None
    for line in path.read_text().splitlines(keepends=True):
        if line.startswith("<<<<<<< "):
            section = "release"
        elif section and line.startswith(("||||||| ", "=======")):
            section = "other"
        elif section and line.startswith(">>>>>>> "):
            section = None
        elif section in (None, "release"):
            out.append(line)
    path.write_text("".join(out))


def resolve_in_progress(ws: Path) -> None:
    unmerged = git(ws, "diff", "--name-only", "--diff-filter=U").stdout.split()
    assert unmerged
    for rel in unmerged:
        take_release_side(ws / rel)
    git(ws, "add", *unmerged)


@pytest.mark.integration
def test_real_release_workspace_round_trip(real_cache, tmp_path):
    """FlagScale's megatron series onto megatron-core 0.17.0: two patches conflict for real. Resolve them in
    the workspace, --continue finishes and every cell applies to 0.17.0; --abort restores every byte."""
    project = copy_project(tmp_path / "project")
    before = snapshot(project.root)
    version, sha = MEGATRON_0170

    def start(ws: Path):
        project.__dict__.pop("pins", None)
        return rebase(project, "megatron", version, sha, old_source="sdist", cache=real_cache, workspace=ws)

    first = start(tmp_path / "ws1")
    assert {r.status for r in first.report} <= {"clean", "offset", "merged", "conflict"}  # nothing skipped
    assert first.in_progress and all(c.upstream or c.patch for r in first.conflicts for c in r.conflicts)
    abort_rebase(tmp_path / "ws1")
    assert not (tmp_path / "ws1").exists() and snapshot(project.root) == before

    ws = tmp_path / "ws2"
    result = start(ws)
    stops = []
    while result.in_progress:
        stops.append(result.in_progress)
        resolve_in_progress(ws)
        result = continue_rebase(ws)
    assert len(stops) == len(first.conflicts) >= 1 and stops[0] == first.in_progress
    assert result.written and Project(project.root).pins.resolve("megatron").sdist.version == version
    results = check(Project(project.root), "megatron", source="sdist", cache=real_cache)
    assert results and all(r.status == "ok" for r in results), results
