"""`flagscale upstream status | fetch | bump`: the pins, their sources, and moving a pin to another release."""

from __future__ import annotations

from pathlib import Path

import typer

from flagscale.cli.app import RootOpt, SourceOpt, console, download_progress, project, reported, upstream_app


@upstream_app.command("status")
def upstream_status(root: Path | None = RootOpt) -> None:
    """Show every pin: tag, commit, release sdist, submodule state, and what is cached."""
    from flagscale.cli.render import print_upstream_status
    from flagscale.upstream.cache import Cache

    with reported():
        print_upstream_status(project(root), Cache())


@upstream_app.command("fetch")
def upstream_fetch(backend: str, source: str = SourceOpt, root: Path | None = RootOpt) -> None:
    """Materialize BACKEND's pinned source into the read-only cache and print its path."""
    from flagscale.upstream.sources import materialize
    from flagscale.upstream.target import Target

    with reported():
        src = materialize(Target.of(project(root), backend, None, source), progress=download_progress())
        console(stderr=True).print(f"{src.pin.backend}: {src.origin}")
        typer.echo(src.tree)


@upstream_app.command("bump")
def upstream_bump(
    backend: str,
    to: str = typer.Option(..., "--to", help="The release version to move the pin to (its sdist on the index)."),
    sha256: str | None = typer.Option(None, help="Expected sha256 of the new sdist (default: the index's)."),
    old_source: str = typer.Option("auto", "--old-source", help="Source of the current pin."),
    report_dir: Path | None = typer.Option(None, "--report-dir", help="Where the report goes (default: the cache)."),
    python: str | None = typer.Option(None, "--python", help="Interpreter for the smoke test (default: this one)."),
    gguf: Path | None = typer.Option(None, "--gguf", help="llama.cpp: the GGUF to complete from (default: tiny)."),
    drop_upstreamed: bool = typer.Option(False, help="Drop patches the new release already contains."),
    root: Path | None = RootOpt,
) -> None:
    """Rebase, check, build and smoke-test BACKEND on another release; write pin + patches only if all pass."""
    from flagscale.cli.app import steps
    from flagscale.upstream.bump import bump

    with reported():
        proj = project(root)
        result = bump(
            proj,
            backend,
            to,
            sha256=sha256,
            old_source=old_source,
            report_dir=report_dir,
            python=python,
            gguf=gguf,
            drop_upstreamed=drop_upstreamed,
            step=steps(),
        )
        for stage in result.stages:
            mark = "ok  " if stage.ok else "FAIL"
            typer.echo(f"{mark} {stage.name}: {stage.summary}")
        for path in result.written:
            typer.echo(f"wrote {path.relative_to(proj.root)}")
        typer.echo(f"report: {result.report}")
        if result.workspace:
            typer.echo(f"rebase workspace: {result.workspace}")
        if not result.ok:
            from rich.markup import escape

            console(stderr=True).print(
                f"[red]error:[/red] {result.backend} stays at {result.old_version}: {escape(result.reason)}; "
                "nothing was written (see the report)"
            )
            raise typer.Exit(1)
