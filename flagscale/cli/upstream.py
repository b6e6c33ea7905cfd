"""`flagscale upstream status | fetch`: the pins and their sources."""

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
