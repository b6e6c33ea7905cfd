"""`flagscale install | build | doctor`: patched backend wheels into this environment or a wheelhouse."""

from __future__ import annotations

from pathlib import Path

import typer

from flagscale.cli.app import DeviceOpt, RootOpt, SourceOpt, app, backends, default_device, project, reported, steps

BackendsOpt = typer.Option(..., "--backend", "-b", help="Backend(s), comma-separated.")


@app.command("install")
def install_cmd(
    backend: str = BackendsOpt, device: str | None = DeviceOpt, source: str = SourceOpt, root: Path | None = RootOpt
) -> None:
    """Build (or reuse) the patched backend wheel(s) and install them with the device's runtime requirements."""
    from flagscale.wheels.install import install

    with reported():
        proj = project(root)
        wheels = install(proj, backends(proj, backend), default_device(proj, device), source, step=steps())
        for wheel in wheels:
            typer.echo(f"installed {wheel.distribution} {wheel.version}{' (cached build)' if wheel.cache_hit else ''}")


@app.command("build")
def build_cmd(
    backend: str = BackendsOpt,
    out: Path = typer.Option(..., "--out", "-o", help="Wheelhouse folder to write."),
    device: str | None = DeviceOpt,
    source: str = SourceOpt,
    root: Path | None = RootOpt,
) -> None:
    """Write a wheelhouse: the flagscale wheel (X+device) and the patched backend wheels it pins."""
    from flagscale.wheels.install import build_wheelhouse

    with reported():
        proj = project(root)
        for path in build_wheelhouse(
            proj, backends(proj, backend), default_device(proj, device), out, source, step=steps()
        ):
            typer.echo(path)


@app.command("doctor")
def doctor_cmd() -> None:
    """Check that installed backends still match what FlagScale built (files, versions)."""
    from flagscale.cli.render import print_doctor_report
    from flagscale.wheels.doctor import diagnose

    with reported():
        report = diagnose()
        print_doctor_report(report)
    if not report.ok:
        raise typer.Exit(1)
