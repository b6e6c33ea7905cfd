"""`flagscale patch …` (= `tools/patch.py …`): the devtool-style patch workflow."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import typer

from flagscale.cli.app import (
    BackendOpt,
    DeviceOpt,
    RootOpt,
    SourceOpt,
    console,
    device_name,
    download_progress,
    patch_app,
    project,
    reported,
)

if TYPE_CHECKING:
    from flagscale.patches.rebase import RebaseResult


@patch_app.command("checkout")
def patch_checkout(
    backend: str, dest: Path, device: str | None = DeviceOpt, source: str = SourceOpt, root: Path | None = RootOpt
) -> None:
    """Create DEST: a git repo of the pinned upstream with one commit per patch, ready to edit."""
    from flagscale.patches.workflow import checkout

    with reported():
        proj = project(root)
        commits = checkout(proj, backend, dest, device_name(proj, device), source)
        typer.echo(
            f"{dest}: {len(commits)} patch commit(s) on the pinned upstream; edit, commit, then run "
            f"`tools/patch.py export {backend}{f' --device {device}' if device else ''} {dest}`"
        )


@patch_app.command("export")
def patch_export(backend: str, repo: Path, device: str | None = DeviceOpt, root: Path | None = RootOpt) -> None:
    """Write REPO's commits back to the series; only changed patches are rewritten."""
    from flagscale.patches.workflow import export

    with reported():
        proj = project(root)
        result = export(proj, backend, repo, device_name(proj, device))
        for path in result.written:
            typer.echo(f"wrote   {path.relative_to(proj.root)}")
        for path in result.removed:
            typer.echo(f"removed {path.relative_to(proj.root)}")
        typer.echo(f"{len(result.written)} written, {len(result.unchanged)} unchanged, {len(result.removed)} removed")


@patch_app.command("rebase")
def patch_rebase(
    backend: str | None = typer.Argument(None, help="Backend to rebase (omit with --continue / --abort)."),
    to: str | None = typer.Option(None, "--to", help="New release version of the pin's sdist."),
    sha256: str | None = typer.Option(None, help="Expected sha256 of the new sdist (default: the index's)."),
    source: str | None = typer.Option(None, "--source", help="Local tree of the new pin."),
    old_source: str = typer.Option("auto", "--old-source", help="Source of the current pin."),
    workspace: Path | None = typer.Option(
        None, "--workspace", help="Keep the rebase here: a git repo of the new pin, stopped at the first conflict."
    ),
    drop_upstreamed: bool = typer.Option(
        False, "--drop-upstreamed", help="Remove patches the new release already contains from their series."
    ),
    resume: Path | None = typer.Option(None, "--continue", help="Go on with the rebase in this workspace."),
    abort: Path | None = typer.Option(None, "--abort", help="Give up the rebase in this workspace (removes it)."),
    root: Path | None = RootOpt,
) -> None:
    """Rebase every series of BACKEND onto release --to; write patches and pin only when every patch went through.

    Every patch is tried and reported (clean, offset, merged (strategy), conflict with file, lines and both
    sides, already-upstream, dependent-on-conflict). With --workspace, resolve the conflict in progress there,
    `git add` (or commit), and run `--continue DIR`; `--abort DIR` leaves everything as it was.
    """
    from flagscale.patches.rebase import abort_rebase, continue_rebase, rebase

    with reported():
        if abort is not None:
            if resume is not None or backend or to:
                raise typer.BadParameter("--abort DIR takes no backend, --to or --continue")
            abort_rebase(abort)
            typer.echo(f"removed {abort}; nothing was written")
            return
        if resume is not None:
            if backend or to:
                raise typer.BadParameter("--continue DIR takes no backend or --to (they are in the workspace)")
            _conclude(continue_rebase(resume, drop_upstreamed or None))
            return
        if not backend or not to:
            raise typer.BadParameter("name the backend and --to VERSION (or --continue DIR / --abort DIR)")
        proj = project(root)
        result = rebase(
            proj,
            backend,
            to,
            sha256,
            source,
            old_source,
            workspace=workspace,
            drop_upstreamed=drop_upstreamed,
        )
        _conclude(result)


def _conclude(result: RebaseResult) -> None:
    """Print a finished rebase, or raise RebaseConflict (its report is printed) saying what to do next."""
    from flagscale.cli.render import print_rebase_report
    from flagscale.errors import RebaseConflict

    release = f"{result.new_pin.sdist.name} {result.new_pin.sdist.version}"
    if not result.wiggle:
        console(stderr=True).print(
            "note: wiggle is not installed, so word-level merges were not tried (apt-get install wiggle)"
        )
    if result.written:
        print_rebase_report(result.report)
        for row in result.upstreamed:
            typer.echo(f"dropped {row.series}/{row.name}: already in {row.absorbed_by}")
        typer.echo(f"{result.summary}\nrebased onto {release}: series and third_party/upstreams.toml written")
        return
    if result.workspace is not None and result.in_progress:
        message = (
            f"{result.summary}. Stopped at {result.in_progress} in {result.workspace}: resolve the diff3 conflict "
            f"markers there, `git add` the files (or commit), then `flagscale patch rebase --continue "
            f"{result.workspace}` (`--abort {result.workspace}` gives up); nothing was written"
        )
    elif result.conflicts:
        message = (
            f"{result.summary}. {len(result.conflicts)} patch(es) need a hand on {release}; nothing was written. "
            "Rebase again with --workspace DIR to resolve them there"
        )
    else:
        where = (
            f"--continue {result.workspace} --drop-upstreamed" if result.workspace else "again with --drop-upstreamed"
        )
        message = (
            f"{result.summary}. {len(result.upstreamed)} patch(es) are already in {release}; nothing was written. "
            f"Run {where} to remove them from their series"
        )
    raise RebaseConflict(message, list(result.report))


@patch_app.command("check")
def patch_check(
    device: str | None = DeviceOpt,
    backend: str | None = BackendOpt,
    source: str = SourceOpt,
    root: Path | None = RootOpt,
) -> None:
    """Does every (device, backend) cell's series apply to its pin? Non-zero exit if any does not."""
    from flagscale.cli.render import print_check_results
    from flagscale.patches.workflow import check

    with reported():
        proj = project(root)
        results = check(proj, backend, device_name(proj, device), source)
        print_check_results(results)
        if any(r.status == "FAIL" for r in results):
            raise typer.Exit(1)


@patch_app.command("lint")
def patch_lint(root: Path | None = RootOpt) -> None:
    """Check every series folder: headers, whitespace damage, and that `series` lists exactly its files."""
    from flagscale.patches.series import lint_folder

    with reported():
        proj = project(root)
        folders = sorted(
            {p.parent for p in proj.root.glob("patches/*/*") if p.parent.is_dir()}
            | {p.parent for p in proj.root.glob("hardware/*/patches/*/*")}
        )
        problems = [problem for folder in folders for problem in lint_folder(folder)]
        for problem in problems:
            typer.echo(problem)
        typer.echo(f"{len(folders)} series checked, {len(problems)} problem(s)")
        if problems:
            raise typer.Exit(1)


@patch_app.command("apply")
def patch_apply(
    backend: str,
    dest: Path | None = typer.Argument(None, help="Also copy the patched tree here."),
    device: str | None = DeviceOpt,
    source: str = SourceOpt,
    root: Path | None = RootOpt,
) -> None:
    """Apply the common (and device) series to the pin; print the cached patched tree's path."""
    from flagscale.patches.apply import copy_tree
    from flagscale.patches.tree import patched_tree
    from flagscale.upstream.target import Target

    with reported():
        proj = project(root)
        tree = patched_tree(Target.of(proj, backend, device_name(proj, device), source), progress=download_progress())
        console(stderr=True).print(
            f"{len(tree.patches)} patch(es) on {tree.source.origin}{' (cached)' if tree.cache_hit else ''}"
        )
        if dest is not None:
            if dest.exists() and any(dest.iterdir()):
                raise typer.BadParameter(f"{dest} is not empty")
            dest.mkdir(parents=True, exist_ok=True)
            copy_tree(tree.path, dest)
            typer.echo(dest)
        else:
            typer.echo(tree.path)
