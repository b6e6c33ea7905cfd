"""Tables and text the commands print: kept out of the command functions, which only gather and decide."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

from flagscale.cli.app import console

if TYPE_CHECKING:
    from flagscale.hardware.registry import Device
    from flagscale.patches.rebase import PatchReport
    from flagscale.patches.workflow import CellResult
    from flagscale.upstream.cache import Cache
    from flagscale.upstream.project import Project
    from flagscale.wheels.doctor import Report

_REBASE_COLOUR = {
    "clean": "green",
    "offset": "green",
    "merged": "yellow",
    "already-upstream": "cyan",
    "conflict": "red",
    "dependent-on-conflict": "magenta",
}
_CHECK_COLOUR = {"ok": "green", "offset": "yellow", "FAIL": "red"}


def print_upstream_status(project: Project, cache: Cache) -> None:
    from rich.table import Table

    from flagscale.upstream.sources import submodule_state

    table = Table("backend", "upstream", "tag", "commit", "sdist", "sha256", "submodule", "cached")
    for pin in project.pins:
        path, head = submodule_state(project, pin)
        sub = (
            "not initialized"
            if path is None or head is None
            else (f"at {head[:12]}" + ("" if not pin.commit or head == pin.commit else " (differs from pin!)"))
        )
        cached = "yes" if cache.path("sources", f"sdist-{pin.sdist.sha256}").exists() else "no"
        commit = pin.commit[:12] if pin.commit else (f"~{pin.commit_hint}" if pin.commit_hint else "unresolved")
        table.add_row(
            pin.backend,
            pin.name,
            pin.tag or "-",
            commit,
            f"{pin.sdist.name} {pin.sdist.version}",
            pin.sdist.sha256[:12] + "…",
            sub,
            cached,
        )
    console().print(table)


def print_rebase_report(report: Sequence[PatchReport]) -> None:
    """The per-patch table, then every conflict region with both sides."""
    if not report:
        return
    from rich.markup import escape
    from rich.table import Table

    table = Table("series", "patch", "result", "detail")
    for row in report:
        detail = row.detail
        if row.absorbed_by:
            detail = f"already in {row.absorbed_by}"
        table.add_row(row.series, row.name, f"[{_REBASE_COLOUR[row.status]}]{row.result}[/]", escape(detail))
    out = console()
    out.print(table)
    for row in report:
        if row.status != "conflict":
            continue
        for conflict in row.conflicts:
            out.print(f"[red]conflict[/] {row.series}/{row.name}: {escape(conflict.where)}")
            for side, text in (("new release", conflict.upstream), ("patch", conflict.patch)):
                out.print(f"  {side}:")
                for line in (text or "(nothing)").splitlines() or [""]:
                    out.print(f"    {escape(line)}", soft_wrap=True)


def print_check_results(results: Iterable[CellResult]) -> None:
    from rich.table import Table

    table = Table("backend", "device", "patches", "result", "detail")
    for r in results:
        table.add_row(
            r.backend, r.device or "(common)", str(r.patches), f"[{_CHECK_COLOUR[r.status]}]{r.status}[/]", r.detail
        )
    console().print(table)


def print_doctor_report(report: Report) -> None:
    from rich.table import Table

    out = console()
    out.print(f"flagscale {report.flagscale_version or '(not installed)'}, device {report.device or 'none'}")
    if not report.backends:
        out.print("no FlagScale-built backends installed")
        return
    table = Table("backend", "distribution", "version", "device", "patches", "state")
    for b in report.backends:
        state = (
            "[green]ok[/]"
            if b.ok
            else "[red]"
            + "; ".join(
                filter(
                    None,
                    [
                        b.problem,
                        f"changed: {', '.join(b.changed)}" if b.changed else "",
                        f"missing: {', '.join(b.missing)}" if b.missing else "",
                    ],
                )
            )
            + "[/]"
        )
        table.add_row(b.backend, b.distribution, b.version or "-", b.device or "-", str(b.patches), state)
    out.print(table)


def print_devices(devices: Iterable[Device]) -> None:
    from rich.table import Table

    table = Table("device", "aliases", "torch", "collective", "backends", "description")
    for dev in devices:
        table.add_row(
            dev.name,
            ", ".join(dev.aliases),
            dev.torch_device or "-",
            dev.collective or "-",
            ", ".join(dev.backends),
            dev.description,
        )
    console().print(table)


def device_lines(dev: Device) -> list[str]:
    """`flagscale devices show D`: every manifest field, one per line."""

    def show(values) -> str:
        return ", ".join(values) if values else "-"

    lines = [
        f"{dev.name}: {dev.description}",
        f"vendor: {dev.vendor or '-'}",
        f"manifest: {dev.manifest}",
        f"aliases: {show(dev.aliases)}",
        f"torch device: {dev.torch_device or '-'} (extension module: {dev.torch_extension or '-'})",
        f"collective backend: {dev.collective or '-'}",
        f"visible devices variable: {dev.visible_devices_env or '-'}",
        f"backends: {show(dev.backends)}",
        f"runtime requires: {show(dev.runtime_requires)}",
    ]
    for backend, build in dev.builds:
        parts = [f"{k}={v}" for k, v in build.environ().items()]
        parts += [f"-C {k}={v}" for k, v in build.config_settings]
        if build.drop_build_requires:
            parts.append(f"drops build requires: {show(build.drop_build_requires)}")
        if build.platform_plugin:
            parts.append(f"platform plugin: {build.platform_plugin}")
        if build.toolchain:
            parts.append(f"needs toolchain: {build.toolchain}")
        lines.append(f"build {backend}: {'; '.join(parts) or '-'}")
    runs = dev.ci.run_backends if dev.ci.run_backends is not None else dev.backends
    lines.append(
        f"ci runners: {show(dev.ci.runs_on)}"
        + (f" (runs {show(runs)})" if dev.ci.runs_on else " (patch check and build only)")
    )
    return lines
