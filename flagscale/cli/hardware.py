"""`flagscale devices` and `flagscale ci matrix`: the hardware registry and the CI cells built from it."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from flagscale.cli.app import BackendOpt, DeviceOpt, RootOpt, app, ci_app, project, reported


@app.command("devices")
def devices_cmd(
    name: str | None = typer.Argument(None, help="Show one device (`devices show D` works too)."),
    shown: str | None = typer.Argument(None, hidden=True),
    root: Path | None = RootOpt,
) -> None:
    """List the devices of the hardware registry, or show one."""
    from flagscale.cli.render import device_lines, print_devices
    from flagscale.hardware.registry import load_devices, resolve_device

    if name == "show":
        if shown is None:
            raise typer.BadParameter("devices show needs a device name, e.g. flagscale devices show cpu")
        name, shown = shown, None
    if shown is not None:
        raise typer.BadParameter(f"unexpected argument {shown!r}: use flagscale devices [show] DEVICE")
    with reported():
        proj = project(root)
        if name:
            for line in device_lines(resolve_device(proj, name)):
                typer.echo(line)
            return
        print_devices(load_devices(proj).values())


@ci_app.command("matrix")
def ci_matrix(
    fmt: str = typer.Option(
        "json",
        "--format",
        "-f",
        help='json: {"include": [...]} | github: '
        "name=value lines for $GITHUB_OUTPUT (matrix, count, run_matrix, run_count).",
    ),
    device: str | None = DeviceOpt,
    backend: str | None = BackendOpt,
    run_only: bool = typer.Option(False, "--run", help="Only the cells CI runs on the device's runners."),
    root: Path | None = RootOpt,
) -> None:
    """The (device, backend) cells of the registry, as a GitHub Actions strategy.matrix (fromJSON)."""
    from flagscale.hardware.ci_matrix import github_outputs, matrix

    with reported():
        proj = project(root)
        if fmt == "json":
            typer.echo(json.dumps(matrix(proj, device, backend, run_only), indent=2))
        elif fmt == "github":
            if run_only:
                raise typer.BadParameter("--run applies to --format json; github output has both matrices")
            typer.echo(github_outputs(proj, device, backend), nl=False)
        else:
            raise typer.BadParameter(f"--format {fmt!r}: use json or github")
