"""`flagscale` command line: a thin face over the core. Heavy modules are imported inside commands."""

from __future__ import annotations

import logging
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import typer

from flagscale import __version__
from flagscale.errors import FlagScaleError, RebaseConflict

app = typer.Typer(help="FlagScale: pinned upstreams + reviewed patches -> device-specific builds.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
upstream_app = typer.Typer(help="Upstream pins and their sources.", no_args_is_help=True)
patch_app = typer.Typer(help="Patch series: checkout, export, rebase, check, lint, apply.", no_args_is_help=True)
app.add_typer(upstream_app, name="upstream")
app.add_typer(patch_app, name="patch")
ci_app = typer.Typer(help="The per-chip CI matrix from the hardware registry.", no_args_is_help=True)
app.add_typer(ci_app, name="ci")

RootOpt = typer.Option(None, "--root", help="FlagScale checkout (default: found from the current folder).")
DeviceOpt = typer.Option(None, "--device", "-d", help="Device whose series applies after the common one.")
SourceOpt = typer.Option("auto", "--source", help="auto | submodule | sdist | PATH to a local tree.")


def _console(stderr: bool = False):
    from rich.console import Console

    stream = sys.stderr if stderr else sys.stdout
    # Logs and CI are not terminals: do not squeeze tables into 80 columns there.
    return Console(stderr=stderr, highlight=False, width=None if stream.isatty() else 200)


@contextmanager
def _reported():
    """Print FlagScale errors as one clear line (no traceback) and exit non-zero."""
    try:
        yield
    except RebaseConflict as exc:
        _print_report(exc.report)
        _print_error(exc)
        raise typer.Exit(1)
    except FlagScaleError as exc:
        _print_error(exc)
        raise typer.Exit(2)


def _print_error(exc: Exception) -> None:
    from rich.markup import escape

    _console(stderr=True).print(f"[red]error:[/red] {escape(str(exc))}")


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, stream=sys.stderr,
                        format="%(message)s")


def _project(root: Optional[Path]):
    from flagscale.upstream.project import Project

    return Project.find(root)


def _device(project, device: Optional[str]) -> Optional[str]:
    if device is None:
        return None
    from flagscale.hardware.registry import resolve_device

    return resolve_device(project, device).name


def _progress():
    """A download progress callback: a bar on a terminal, nothing in logs."""
    if not sys.stderr.isatty():
        return None
    from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn

    bar = Progress("[progress.description]{task.description}", BarColumn(), DownloadColumn(),
                   TransferSpeedColumn(), console=_console(stderr=True), transient=True)
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


@app.callback(invoke_without_command=True)
def main(version: bool = typer.Option(False, "--version", help="Print the version and exit."),
         verbose: bool = typer.Option(False, "--verbose", "-v", help="Log each step.")) -> None:
    _setup_logging(verbose)
    if version:
        typer.echo(__version__)
        raise typer.Exit()


# ------------------------------------------------------------------------------------------ upstream
@upstream_app.command("status")
def upstream_status(root: Optional[Path] = RootOpt) -> None:
    """Show every pin: tag, commit, release sdist, submodule state, and what is cached."""
    from rich.table import Table

    from flagscale.upstream.cache import Cache
    from flagscale.upstream.sources import submodule_state

    with _reported():
        project = _project(root)
        cache = Cache()
        table = Table("backend", "upstream", "tag", "commit", "sdist", "sha256", "submodule", "cached")
        for pin in project.pins:
            path, head = submodule_state(project, pin)
            sub = "not initialized" if path is None else (
                f"at {head[:12]}" + ("" if not pin.commit or head == pin.commit else " (differs from pin!)"))
            cached = "yes" if cache.path("sources", f"sdist-{pin.sdist.sha256}").exists() else "no"
            commit = pin.commit[:12] if pin.commit else (f"~{pin.commit_hint}" if pin.commit_hint else "unresolved")
            table.add_row(pin.backend, pin.name, pin.tag or "-", commit, f"{pin.sdist.name} {pin.sdist.version}",
                          pin.sdist.sha256[:12] + "…", sub, cached)
        _console().print(table)


@upstream_app.command("fetch")
def upstream_fetch(backend: str, source: str = SourceOpt, root: Optional[Path] = RootOpt) -> None:
    """Materialize BACKEND's pinned source into the read-only cache and print its path."""
    from flagscale.upstream.sources import materialize
    from flagscale.upstream.target import Target

    with _reported():
        project = _project(root)
        src = materialize(Target.of(project, backend, None, source), progress=_progress())
        _console(stderr=True).print(f"{src.pin.backend}: {src.origin}")
        typer.echo(src.tree)


# --------------------------------------------------------------------------------------------- patch
@patch_app.command("checkout")
def patch_checkout(backend: str, dest: Path, device: Optional[str] = DeviceOpt, source: str = SourceOpt,
                   root: Optional[Path] = RootOpt) -> None:
    """Create DEST: a git repo of the pinned upstream with one commit per patch, ready to edit."""
    from flagscale.patches.workflow import checkout

    with _reported():
        project = _project(root)
        commits = checkout(project, backend, dest, _device(project, device), source)
        typer.echo(f"{dest}: {len(commits)} patch commit(s) on the pinned upstream; edit, commit, then run "
                   f"`tools/patch.py export {backend}{f' --device {device}' if device else ''} {dest}`")


@patch_app.command("export")
def patch_export(backend: str, repo: Path, device: Optional[str] = DeviceOpt, root: Optional[Path] = RootOpt) -> None:
    """Write REPO's commits back to the series; only changed patches are rewritten."""
    from flagscale.patches.workflow import export

    with _reported():
        project = _project(root)
        result = export(project, backend, repo, _device(project, device))
        for path in result.written:
            typer.echo(f"wrote   {path.relative_to(project.root)}")
        for path in result.removed:
            typer.echo(f"removed {path.relative_to(project.root)}")
        typer.echo(f"{len(result.written)} written, {len(result.unchanged)} unchanged, {len(result.removed)} removed")


@patch_app.command("rebase")
def patch_rebase(backend: str, to: str = typer.Option(..., "--to", help="New release version of the pin's sdist."),
                 sha256: Optional[str] = typer.Option(None, help="Expected sha256 of the new sdist."),
                 source: Optional[str] = typer.Option(None, "--source", help="Local tree of the new pin."),
                 old_source: str = typer.Option("auto", "--old-source", help="Source of the current pin."),
                 root: Optional[Path] = RootOpt) -> None:
    """Replay every series of BACKEND onto a new pin (3-way merge); write patches and pin only on success."""
    from flagscale.patches.workflow import rebase

    with _reported():
        report = rebase(_project(root), backend, to, sha256, source, old_source)
        _print_report(report)
        typer.echo(f"rebased {len(report)} patch(es) onto {to}; third_party/upstreams.toml updated")


def _print_report(report) -> None:
    if not report:
        return
    from rich.table import Table

    table = Table("series", "patch", "result", "detail")
    colour = {"clean": "green", "offset": "yellow", "merged": "yellow", "conflict": "red", "skipped": "red"}
    for row in report:
        table.add_row(row.series, row.name, f"[{colour[row.status]}]{row.status}[/]", row.detail)
    _console().print(table)


@patch_app.command("check")
def patch_check(device: Optional[str] = DeviceOpt,
                backend: Optional[str] = typer.Option(None, "--backend", "-b", help="Only this backend."),
                source: str = SourceOpt, root: Optional[Path] = RootOpt) -> None:
    """Does every (device, backend) cell's series apply to its pin? Non-zero exit if any does not."""
    from rich.table import Table

    from flagscale.patches.workflow import check

    with _reported():
        project = _project(root)
        results = check(project, backend, _device(project, device), source)
        table = Table("backend", "device", "patches", "result", "detail")
        colour = {"ok": "green", "offset": "yellow", "FAIL": "red"}
        for r in results:
            table.add_row(r.backend, r.device or "(common)", str(r.patches), f"[{colour[r.status]}]{r.status}[/]", r.detail)
        _console().print(table)
        failed = [r for r in results if r.status == "FAIL"]
        if failed:
            raise typer.Exit(1)


@patch_app.command("lint")
def patch_lint(root: Optional[Path] = RootOpt) -> None:
    """Check every series folder: headers, whitespace damage, and that `series` lists exactly its files."""
    from flagscale.patches.series import lint_folder

    with _reported():
        project = _project(root)
        folders = sorted({p.parent for p in project.root.glob("patches/*/*") if p.parent.is_dir()} |
                         {p.parent for p in project.root.glob("hardware/*/patches/*/*")})
        problems = [problem for folder in folders for problem in lint_folder(folder)]
        for problem in problems:
            typer.echo(problem)
        typer.echo(f"{len(folders)} series checked, {len(problems)} problem(s)")
        if problems:
            raise typer.Exit(1)


@patch_app.command("apply")
def patch_apply(backend: str, dest: Optional[Path] = typer.Argument(None, help="Also copy the patched tree here."),
                device: Optional[str] = DeviceOpt, source: str = SourceOpt, root: Optional[Path] = RootOpt) -> None:
    """Apply the common (and device) series to the pin; print the cached patched tree's path."""
    from flagscale.patches.apply import copy_tree
    from flagscale.patches.tree import patched_tree
    from flagscale.upstream.target import Target

    with _reported():
        project = _project(root)
        tree = patched_tree(Target.of(project, backend, _device(project, device), source), progress=_progress())
        _console(stderr=True).print(f"{len(tree.patches)} patch(es) on {tree.source.origin}"
                                    f"{' (cached)' if tree.cache_hit else ''}")
        if dest is not None:
            if dest.exists() and any(dest.iterdir()):
                raise typer.BadParameter(f"{dest} is not empty")
            dest.mkdir(parents=True, exist_ok=True)
            copy_tree(tree.path, dest)
            typer.echo(dest)
        else:
            typer.echo(tree.path)


def _steps():
    """Progress for long steps: one line per step (a terminal or a log both read it)."""
    console = _console(stderr=True)
    return lambda message: console.print(f"[bold]»[/bold] {message}")


def _backends(project, backend: str) -> list[str]:
    names = [b.strip() for b in backend.split(",") if b.strip()]
    if not names:
        raise typer.BadParameter("name at least one backend, e.g. --backend megatron")
    return [project.pins.resolve(b).backend for b in names]


def _default_device(project, device: Optional[str]) -> str:
    """--device, else the device the installed flagscale was built for, else cpu."""
    if device:
        return _device(project, device)
    import importlib.metadata as md
    import json

    try:
        text = md.distribution("flagscale").read_text("flagscale_build.json")
    except md.PackageNotFoundError:
        text = None
    built_for = json.loads(text).get("device") if text else None
    return _device(project, built_for or "cpu")


@app.command("install")
def install_cmd(backend: str = typer.Option(..., "--backend", "-b", help="Backend(s), comma-separated."),
                device: Optional[str] = DeviceOpt, source: str = SourceOpt, root: Optional[Path] = RootOpt) -> None:
    """Build (or reuse) the patched backend wheel(s) and install them with the device's runtime requirements."""
    from flagscale.wheels.install import install

    with _reported():
        project = _project(root)
        wheels = install(project, _backends(project, backend), _default_device(project, device), source, step=_steps())
        for wheel in wheels:
            typer.echo(f"installed {wheel.distribution} {wheel.version}{' (cached build)' if wheel.cache_hit else ''}")


@app.command("build")
def build_cmd(backend: str = typer.Option(..., "--backend", "-b", help="Backend(s), comma-separated."),
              out: Path = typer.Option(..., "--out", "-o", help="Wheelhouse folder to write."),
              device: Optional[str] = DeviceOpt, source: str = SourceOpt, root: Optional[Path] = RootOpt) -> None:
    """Write a wheelhouse: the flagscale wheel (X+device) and the patched backend wheels it pins."""
    from flagscale.wheels.install import build_wheelhouse

    with _reported():
        project = _project(root)
        for path in build_wheelhouse(project, _backends(project, backend), _default_device(project, device), out,
                                     source, step=_steps()):
            typer.echo(path)


@app.command("doctor")
def doctor_cmd() -> None:
    """Check that installed backends still match what FlagScale built (files, versions)."""
    from rich.table import Table

    from flagscale.wheels.doctor import diagnose

    report = diagnose()
    console = _console()
    console.print(f"flagscale {report.flagscale_version or '(not installed)'}, device {report.device or 'none'}")
    if not report.backends:
        console.print("no FlagScale-built backends installed")
        return
    table = Table("backend", "distribution", "version", "device", "patches", "state")
    for b in report.backends:
        state = "[green]ok[/]" if b.ok else "[red]" + "; ".join(filter(None, [
            b.problem, f"changed: {', '.join(b.changed)}" if b.changed else "",
            f"missing: {', '.join(b.missing)}" if b.missing else ""])) + "[/]"
        table.add_row(b.backend, b.distribution, b.version or "-", b.device or "-", str(b.patches), state)
    console.print(table)
    if not report.ok:
        raise typer.Exit(1)


@app.command("devices")
def devices_cmd(name: Optional[str] = typer.Argument(None, help="Show one device (`devices show D` works too)."),
                shown: Optional[str] = typer.Argument(None, hidden=True), root: Optional[Path] = RootOpt) -> None:
    """List the devices of the hardware registry, or show one."""
    from rich.table import Table

    from flagscale.hardware.registry import load_devices, resolve_device

    if name == "show":
        if shown is None:
            raise typer.BadParameter("devices show needs a device name, e.g. flagscale devices show cpu")
        name, shown = shown, None
    if shown is not None:
        raise typer.BadParameter(f"unexpected argument {shown!r}: use flagscale devices [show] DEVICE")
    with _reported():
        project = _project(root)
        if name:
            dev = resolve_device(project, name)
            for line in _device_lines(dev):
                typer.echo(line)
            return
        table = Table("device", "aliases", "torch", "collective", "backends", "description")
        for dev in load_devices(project).values():
            table.add_row(dev.name, ", ".join(dev.aliases), dev.torch_device or "-", dev.collective or "-",
                          ", ".join(dev.backends), dev.description)
        _console().print(table)


def _device_lines(dev) -> list[str]:
    def show(values) -> str:
        return ", ".join(values) if values else "-"

    lines = [f"{dev.name}: {dev.description}",
             f"vendor: {dev.vendor or '-'}",
             f"manifest: {dev.manifest}",
             f"aliases: {show(dev.aliases)}",
             f"torch device: {dev.torch_device or '-'} (extension module: {dev.torch_extension or '-'})",
             f"collective backend: {dev.collective or '-'}",
             f"visible devices variable: {dev.visible_devices_env or '-'}",
             f"backends: {show(dev.backends)}",
             f"runtime requires: {show(dev.runtime_requires)}"]
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
    lines.append(f"ci runners: {show(dev.ci.runs_on)}" + (f" (runs {show(runs)})" if dev.ci.runs_on else " (patch check and build only)"))
    return lines


# ------------------------------------------------------------------------------------------------ ci
@ci_app.command("matrix")
def ci_matrix(fmt: str = typer.Option("json", "--format", "-f", help="json: {\"include\": [...]} | github: "
                                      "name=value lines for $GITHUB_OUTPUT (matrix, count, run_matrix, run_count)."),
              device: Optional[str] = DeviceOpt,
              backend: Optional[str] = typer.Option(None, "--backend", "-b", help="Only this backend."),
              run_only: bool = typer.Option(False, "--run", help="Only the cells CI runs on the device's runners."),
              root: Optional[Path] = RootOpt) -> None:
    """The (device, backend) cells of the registry, as a GitHub Actions strategy.matrix (fromJSON)."""
    import json

    from flagscale.hardware.ci_matrix import github_outputs, matrix

    with _reported():
        project = _project(root)
        if fmt == "json":
            typer.echo(json.dumps(matrix(project, device, backend, run_only), indent=2))
        elif fmt == "github":
            if run_only:
                raise typer.BadParameter("--run applies to --format json; github output has both matrices")
            typer.echo(github_outputs(project, device, backend), nl=False)
        else:
            raise typer.BadParameter(f"--format {fmt!r}: use json or github")


@app.command("train")
def train_cmd(config_dir: Path = typer.Argument(..., help="Folder of the experiment YAML, e.g. examples/tiny_gpt/conf."),
              overrides: Optional[list[str]] = typer.Argument(
                  None, help="Hydra overrides: action=run|dryrun|stop|status, train.model.num_layers=4, ..."),
              config_name: str = typer.Option("train", "--config-name", "-c", help="Experiment YAML (without .yaml)."),
              foreground: bool = typer.Option(False, "--foreground", help="Run attached (schedulers, containers).")) -> None:
    """Train with Megatron on this device: launch, dry-run, stop or query a job (action=...)."""
    with _reported():
        from flagscale.runner.config import compose
        from flagscale.train import main as train_main

        extra = ["experiment.runner.foreground=true"] if foreground else []
        code = train_main(compose(config_dir, config_name, [*(overrides or []), *extra]))
    raise typer.Exit(code)


@app.command("serve", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def serve_cmd(config: str = typer.Argument(..., help="Experiment: a conf folder, a YAML file, or a model name under "
                                           "examples/ (one-click, e.g. tiny_llama)."),
              overrides: Optional[list[str]] = typer.Argument(
                  None, help="[MODEL_CONFIG_YAML] then Hydra overrides: action=run|dryrun|stop|status, "
                  "experiment.runner.port=8001, serve.0.engine_args.threads=2, ..."),
              config_name: str = typer.Option("serve", "--config-name", "-c", help="Experiment YAML (without .yaml).")) -> None:
    """Serve models with an OpenAI-compatible API (llama.cpp, vLLM, SGLang; direct or Ray Serve)."""
    with _reported():
        from flagscale.serve import main as serve_main
        from flagscale.serve.oneclick import compose_for

        code = serve_main(compose_for(config, config_name, list(overrides or []), task="serve"))
    raise typer.Exit(code)


@app.command("infer", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def infer_cmd(config: str = typer.Argument(..., help="Experiment: a conf folder, a YAML file, or a model name under "
                                           "examples/ (e.g. tiny_llama)."),
              overrides: Optional[list[str]] = typer.Argument(
                  None, help="Hydra overrides: action=run|dryrun, infer.generate.max_tokens=32, ..."),
              config_name: str = typer.Option("infer", "--config-name", "-c", help="Experiment YAML (without .yaml).")) -> None:
    """Offline batch generation: a prompts file in, a JSONL of completions out (llama.cpp, vLLM, SGLang)."""
    with _reported():
        from flagscale.infer import main as infer_main
        from flagscale.serve.oneclick import compose_for

        code = infer_main(compose_for(config, config_name, list(overrides or []), task="infer"))
    raise typer.Exit(code)


def run() -> None:
    app()


if __name__ == "__main__":
    run()
