"""The typer applications and what every command shares: options, console, error reporting, progress.

Commands live beside this module by area (upstream, patch, wheels, hardware, tasks) and print tables
through flagscale.cli.render. Only typer loads at start-up: rich and the core load inside commands.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from flagscale import __version__
from flagscale.errors import FlagScaleError, RebaseConflict, error_line

if TYPE_CHECKING:
    from rich.console import Console

    from flagscale.upstream.project import Project

app = typer.Typer(
    help="FlagScale: pinned upstreams + reviewed patches -> device-specific builds.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
upstream_app = typer.Typer(help="Upstream pins and their sources.", no_args_is_help=True)
patch_app = typer.Typer(help="Patch series: checkout, export, rebase, check, lint, apply.", no_args_is_help=True)
ci_app = typer.Typer(help="The per-chip CI matrix from the hardware registry.", no_args_is_help=True)
app.add_typer(upstream_app, name="upstream")
app.add_typer(patch_app, name="patch")
app.add_typer(ci_app, name="ci")

RootOpt = typer.Option(None, "--root", help="FlagScale checkout (default: found from the current folder).")
DeviceOpt = typer.Option(None, "--device", "-d", help="Device whose series applies after the common one.")
SourceOpt = typer.Option("auto", "--source", help="auto | submodule | sdist | PATH to a local tree.")
BackendOpt = typer.Option(None, "--backend", "-b", help="Only this backend.")


def console(stderr: bool = False) -> Console:
    from rich.console import Console

    stream = sys.stderr if stderr else sys.stdout
    # Logs and CI are not terminals: do not squeeze tables into 80 columns there.
    return Console(stderr=stderr, highlight=False, width=None if stream.isatty() else 200)


@contextmanager
def reported() -> Iterator[None]:
    """Print a FlagScaleError as its one `error:` line (no traceback) and exit with its status."""
    try:
        yield
    except FlagScaleError as exc:
        if isinstance(exc, RebaseConflict):
            from flagscale.cli.render import print_rebase_report

            print_rebase_report(exc.report)
        print_error(exc)
        raise typer.Exit(exc.exit_code) from None


def print_error(exc: Exception) -> None:
    from rich.markup import escape

    line = error_line(exc)
    # soft_wrap: an error is one line however long its paths (a log, a test, grep read it whole)
    console(stderr=True).print(f"[red]error:[/red]{escape(line[len('error:') :])}", soft_wrap=True)


def setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, stream=sys.stderr, format="%(message)s")


def project(root: Path | None) -> Project:
    from flagscale.upstream.project import Project

    return Project.find(root)


def device_name(project: Project, device: str | None) -> str | None:
    """A device name or alias as the registry's name (None stays None)."""
    if device is None:
        return None
    from flagscale.hardware.registry import resolve_device

    return resolve_device(project, device).name


def default_device(project: Project, device: str | None) -> str:
    """--device, else the device the installed flagscale was built for, else cpu."""
    from flagscale.runner.environment import device_name as job_device_name

    return device_name(project, job_device_name(device)) or "cpu"


def backends(project: Project, backend: str) -> list[str]:
    names = [b.strip() for b in backend.split(",") if b.strip()]
    if not names:
        raise typer.BadParameter("name at least one backend, e.g. --backend megatron")
    return [project.pins.resolve(b).backend for b in names]


def download_progress():
    """A download progress callback: a bar on a terminal, nothing in logs."""
    if not sys.stderr.isatty():
        return None
    from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn

    bar = Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        console=console(stderr=True),
        transient=True,
    )
    task = None

    def update(done: int, total: int) -> None:
        nonlocal task
        if task is None:
            bar.start()
            task = bar.add_task("download", total=total or None)
        bar.update(task, completed=done)
        if total and done >= total:
            bar.stop()

    return update


def steps():
    """Progress for long steps: one line per step (a terminal or a log both read it)."""
    err = console(stderr=True)
    return lambda message: err.print(f"[bold]»[/bold] {message}")


@app.callback(invoke_without_command=True)
def main(
    version: bool = typer.Option(False, "--version", help="Print the version and exit."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log each step."),
) -> None:
    setup_logging(verbose)
    if version:
        typer.echo(__version__)
        raise typer.Exit()
