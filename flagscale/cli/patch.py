"""`flagscale patch …` (= `tools/patch.py …`): the devtool-style patch workflow."""

from __future__ import annotations

from pathlib import Path

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
    backend: str,
    to: str = typer.Option(..., "--to", help="New release version of the pin's sdist."),
    sha256: str | None = typer.Option(None, help="Expected sha256 of the new sdist."),
    source: str | None = typer.Option(None, "--source", help="Local tree of the new pin."),
    old_source: str = typer.Option("auto", "--old-source", help="Source of the current pin."),
    root: Path | None = RootOpt,
) -> None:
    """Replay every series of BACKEND onto a new pin (3-way merge); write patches and pin only on success."""
    from flagscale.cli.render import print_rebase_report
    from flagscale.patches.workflow import rebase

    with reported():
        report = rebase(project(root), backend, to, sha256, source, old_source)
        print_rebase_report(report)
        typer.echo(f"rebased {len(report)} patch(es) onto {to}; third_party/upstreams.toml updated")


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
