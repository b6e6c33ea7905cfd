"""`flagscale upstream bump BACKEND --to VERSION`: move a pin to another release in one command.

The new release's sdist and sha256 come from the package index. Every series (common and every device) is
rebased onto it, every cell is checked, the cpu cell's wheel is built and smoke-tested (an import; for
megatron a few training steps of examples/tiny_gpt; for llama.cpp a completion from a tiny GGUF). All of it
runs on a staged copy of the checkout's pins, patches and devices; the new pin and the refreshed patches are
copied back only when every step passed. One markdown report says what happened either way.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from flagscale.errors import ConfigError, FlagScaleError, GitError
from flagscale.upstream.cache import Cache, remove_tree
from flagscale.upstream.index import Release, find_sdist
from flagscale.upstream.project import PINS_FILE, Project

Step = Callable[[str], None]
SMOKE_DEVICE = "cpu"  # the cell every machine can build and run
IMPORTS = {"megatron": "megatron.core", "llama.cpp": "llama_cpp", "vllm": "vllm", "sglang": "sglang"}
TRAIN_ITERS = 3


@dataclass(frozen=True)
class Stage:
    """One step of a bump: rebase | check | build | smoke."""

    name: str
    ok: bool
    summary: str
    details: tuple[str, ...] = ()  # markdown lines for the report (tables, commands, log tails)


@dataclass(frozen=True)
class BumpResult:
    backend: str
    old_version: str
    new_version: str
    release: Release
    stages: tuple[Stage, ...]
    report: Path
    written: tuple[Path, ...] = ()  # files of the checkout that changed (pin, patches, series)
    workspace: Path | None = None  # where to resolve a conflicting rebase (when the rebase leaves one)

    @property
    def ok(self) -> bool:
        return bool(self.stages) and all(s.ok for s in self.stages)

    @property
    def reason(self) -> str:
        """Why nothing was written: the first failed stage's summary."""
        failed = next((s for s in self.stages if not s.ok), None)
        return f"{failed.name} failed: {failed.summary}" if failed else ""


@dataclass
class _Run:
    """What a bump accumulates while it goes (the stages so far)."""

    stages: list[Stage] = field(default_factory=list)

    def add(self, stage: Stage) -> bool:
        self.stages.append(stage)
        return stage.ok


def bump(
    project: Project,
    backend: str,
    version: str,
    *,
    sha256: str | None = None,
    old_source: str = "auto",
    cache: Cache | None = None,
    report_dir: Path | None = None,
    python: str | None = None,
    gguf: Path | None = None,
    drop_upstreamed: bool = False,
    step: Step | None = None,
) -> BumpResult:
    """Rebase, check, build and smoke-test `backend` on release `version`; write pin + patches only if all pass.

    `python` is the interpreter the smoke test runs the new wheel with (it needs the backend's runtime, e.g.
    torch for megatron); `gguf` a model for llama.cpp's completion (default: a tiny one made offline).
    When the rebase does not go through, its workspace is left beside the report for `patch rebase --continue`.
    """
    cache = cache or Cache()
    say = step or (lambda _m: None)
    pin = project.pins.resolve(backend)
    if version == pin.sdist.version:
        raise ConfigError(f"{pin.backend} is already pinned to {version}; name another release with --to")
    say(f"{pin.backend}: looking up {pin.sdist.name} {version} on the package index")
    release = find_sdist(pin.sdist.name, version)
    if sha256 and sha256.lower() != release.sha256:
        raise ConfigError(
            f"--sha256 {sha256} does not match the index's {release.filename} ({release.sha256}); "
            "check which file you meant to trust"
        )
    out = report_dir or cache.root / "bumps"
    report, workspace = out / f"bump-{pin.backend}-{version}.md", out / f"bump-{pin.backend}-{version}-workspace"
    if workspace.exists():
        raise ConfigError(
            f"an earlier bump left its rebase workspace {workspace}: finish it with `flagscale patch rebase "
            f"--continue {workspace}` or drop it with `flagscale patch rebase --abort {workspace}`"
        )
    run = _Run()
    written: tuple[Path, ...] = ()
    left: Path | None = None
    with tempfile.TemporaryDirectory(prefix="flagscale-bump-") as tmp:
        snapshot = _files(project, pin.backend)  # before staging: a change from now on stops the write-back
        staged = stage_project(project, Path(tmp) / "project")
        rebased, left = _rebase(
            project, staged, pin.backend, release, old_source, cache, workspace, drop_upstreamed, say
        )
        staged = Project(staged.root)  # the rebase rewrote its pins file: read it afresh
        if run.add(rebased) and run.add(_check(staged, pin.backend, cache, say)):
            built, wheel = _build(staged, pin.backend, cache, say)
            if run.add(built) and wheel is not None:
                smoke = _smoke(
                    project, staged, pin.backend, wheel, Path(tmp), python or sys.executable, gguf, cache, say
                )
                run.add(smoke)
        if all(s.ok for s in run.stages):
            written = _write_back(project, staged, pin.backend, snapshot)
    result = BumpResult(pin.backend, pin.sdist.version, version, release, tuple(run.stages), report, written, left)
    write_report(result)
    return result


# ------------------------------------------------------------------------------------------- staging
def stage_project(project: Project, dest: Path) -> Project:
    """A scratch copy of the checkout's pins, patch series and device folders: what a bump may rewrite."""
    dest.mkdir(parents=True)
    for part in (PINS_FILE, Path("patches"), Path("hardware")):
        src = project.root / part
        if src.is_dir():
            shutil.copytree(src, dest / part, symlinks=True)
        elif src.is_file():
            (dest / part).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / part)
    return Project(dest)


def _owned(project: Project, backend: str) -> list[Path]:
    """The folders a bump of `backend` rewrites (relative to the checkout): every series of the backend."""
    folders = [project.common_series_dir(backend)]
    folders += [project.device_series_dir(d, backend) for d in project.devices]
    return [f.relative_to(project.root) for f in folders]


def _files(project: Project, backend: str) -> dict[Path, bytes]:
    out = {PINS_FILE: (project.root / PINS_FILE).read_bytes()}
    for folder in _owned(project, backend):
        if (project.root / folder).is_dir():
            for path in sorted((project.root / folder).iterdir()):
                if path.is_file():
                    out[path.relative_to(project.root)] = path.read_bytes()
    return out


def _write_back(project: Project, staged: Project, backend: str, snapshot: dict[Path, bytes]) -> tuple[Path, ...]:
    """Copy what the bump changed into the checkout: new and changed files first, the pin, then removals."""
    now = _files(project, backend)
    if now != snapshot:
        changed = sorted(str(p) for p in set(now) | set(snapshot) if now.get(p) != snapshot.get(p))
        raise ConfigError(f"{', '.join(changed)} changed while the bump ran; nothing was written: run the bump again")
    new = _files(staged, backend)
    written: list[Path] = []
    # The pin last among writes: a bump interrupted half-way leaves the old pin beside patches that
    # `patch check` reports, never a new pin with old patches.
    for rel in sorted((p for p in new if p != PINS_FILE and new[p] != snapshot.get(p)), key=str):
        _atomic_write(project.root / rel, new[rel])
        written.append(project.root / rel)
    if new[PINS_FILE] != snapshot[PINS_FILE]:
        _atomic_write(project.root / PINS_FILE, new[PINS_FILE])
        written.append(project.root / PINS_FILE)
    for rel in sorted((p for p in snapshot if p not in new), key=str):
        (project.root / rel).unlink(missing_ok=True)
        written.append(project.root / rel)
    return tuple(written)


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.bump-tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


# -------------------------------------------------------------------------------------------- stages
def _rebase(
    project: Project,
    staged: Project,
    backend: str,
    release: Release,
    old_source: str,
    cache: Cache,
    workspace: Path,
    drop_upstreamed: bool,
    say: Step,
) -> tuple[Stage, Path | None]:
    """Rebase the checkout's series without writing them; put the refreshed series and pin into `staged`.

    Returns the stage and the workspace left to resolve in (only when the rebase did not go through)."""
    from flagscale.patches.rebase import rebase
    from flagscale.patches.workflow import _write_series, write_pin

    say(f"{backend}: rebasing every series onto {release.version}")
    try:
        result = rebase(
            project,
            backend,
            release.version,
            release.sha256,
            None,
            old_source,
            cache,
            workspace=workspace,
            drop_upstreamed=drop_upstreamed,
            write=False,
        )
    except (FlagScaleError, GitError) as exc:
        remove_tree(workspace)
        return Stage("rebase", False, str(exc)), None
    table = _patch_table(result.report)
    if result.conflicts:
        where = "; ".join(f"{r.name}: {_regions(r)}" for r in result.conflicts)
        why = (
            f"{len(result.conflicts)} patch(es) did not go through ({where}); resolve them in {workspace} "
            f"and run `flagscale patch rebase --continue {workspace}`, or `--abort` it"
        )
        return Stage("rebase", False, why, table), workspace
    remove_tree(workspace)  # everything went through: nothing to resolve
    if not result.complete:
        names = ", ".join(r.name for r in result.upstreamed)
        why = f"{names} already upstream in {release.version}; bump with --drop-upstreamed to drop them"
        return Stage("rebase", False, why, table), None
    folders = {"common": staged.common_series_dir(backend)}
    folders |= {f"device:{d}": staged.device_series_dir(d, backend) for d in staged.devices}
    _write_series({k: v for k, v in folders.items() if v.is_dir()}, list(result.patches))
    write_pin(staged, result.new_pin)
    counts: dict[str, int] = {}
    for r in result.report:
        counts[r.result] = counts.get(r.result, 0) + 1
    summary = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
    return Stage("rebase", True, f"{len(result.report)} patch(es): {summary}", table), None


def _regions(r) -> str:
    """`2 conflict regions in 1 file`, or the status of a patch stacked on a conflicting one."""
    if not r.conflicts:
        return r.status + (f" on {r.depends_on}" if getattr(r, "depends_on", None) else "")
    files = len({c.path for c in r.conflicts})
    return f"{len(r.conflicts)} conflict region(s) in {files} file(s)"


def _patch_table(report: Sequence) -> tuple[str, ...]:
    rows = [f"| {r.series} | {r.name} | {r.result} | {_cell(r.detail)} |" for r in report]
    lines = ["| series | patch | result | detail |", "|---|---|---|---|", *rows]
    for r in report:
        for c in r.conflicts:  # both sides of every conflict region
            lines += ["", f"Conflict of {r.series}/{r.name} at `{c.where}`:", "", "new release:", "```"]
            lines += [*c.upstream.splitlines(), "```", "", "patch:", "```", *c.patch.splitlines(), "```"]
    return tuple(lines)


def _check(staged: Project, backend: str, cache: Cache, say: Step) -> Stage:
    from flagscale.patches.workflow import check

    say(f"{backend}: checking every cell on the new pin")
    results = check(staged, backend, None, "sdist", cache)
    failed = [r for r in results if r.status == "FAIL"]
    rows = [f"| {r.device or '(common only)'} | {r.patches} | {r.status} | {_cell(r.detail)} |" for r in results]
    table = ("| device | patches | status | detail |", "|---|---|---|---|", *rows)
    if failed:
        names = ", ".join(r.device or "(common only)" for r in failed)
        return Stage("check", False, f"{len(failed)} cell(s) do not apply: {names}", table)
    return Stage("check", True, f"{len(results)} cell(s) apply", table)


def _build(staged: Project, backend: str, cache: Cache, say: Step) -> tuple[Stage, Path | None]:
    from flagscale.upstream.target import Target
    from flagscale.wheels.install import build_in_isolation

    target = Target.of(staged, backend, SMOKE_DEVICE, "sdist", cache)
    try:
        wheel = build_in_isolation(target, step=say)
    except FlagScaleError as exc:
        return Stage("build", False, f"the {SMOKE_DEVICE} wheel did not build: {exc}"), None
    return Stage("build", True, f"{wheel.path.name} ({'cached' if wheel.cache_hit else 'built'})"), wheel.path


# --------------------------------------------------------------------------------------------- smoke
@dataclass(frozen=True)
class _Cmd:
    """One smoke command's outcome, for the report."""

    argv: tuple[str, ...]
    returncode: int
    output: str

    def lines(self) -> tuple[str, ...]:
        tail = self.output.strip().splitlines()[-12:]
        shown = ("```", *tail, "```", "") if tail else ()
        return (f"`{' '.join(self.argv)}` exit {self.returncode}", "", *shown)


def _smoke(
    project: Project,
    staged: Project,
    backend: str,
    wheel: Path,
    tmp: Path,
    python: str,
    gguf: Path | None,
    cache: Cache,
    say: Step,
) -> Stage:
    say(f"{backend}: smoke test of {wheel.name} with {python}")
    site = tmp / "site"
    env = _smoke_env(site)
    installed = _cmd(
        [python, "-m", "pip", "install", "-q", "--no-deps", "--no-compile", "--target", str(site), str(wheel)], env, tmp
    )
    if installed.returncode != 0:
        return Stage("smoke", False, f"pip could not install {wheel.name}", installed.lines())
    module = IMPORTS.get(backend, backend.replace(".", "_"))
    code = f"import {module} as m, importlib.metadata as md; print(m.__file__)"
    imported = _cmd([python, "-c", code], env, tmp)
    cmds = [installed, imported]
    if imported.returncode != 0:
        return Stage("smoke", False, f"`import {module}` failed: {_last_line(imported.output)}", _lines(cmds))
    if not imported.output.strip().splitlines()[-1].startswith(str(site)):
        why = f"`import {module}` found {imported.output.strip()}, not the new wheel; run with a clean environment"
        return Stage("smoke", False, why, _lines(cmds))
    if backend == "megatron":
        return _smoke_train(project, env, tmp, python, cmds)
    if backend == "llama.cpp":
        return _smoke_complete(staged, site, env, tmp, python, gguf, cache, cmds)
    return Stage("smoke", True, f"`import {module}` works", _lines(cmds))


def _smoke_env(site: Path) -> dict[str, str]:
    """The smoke commands' environment: the new wheel first on the path, nothing inherited that picks
    another megatron, rank or device, one thread, never the hub."""
    drop = ("PYTHONPATH", "VIRTUAL_ENV", "MEGATRON_DEVICE_TYPE", "MEGATRON_COLLECTIVE_BACKEND", "RANK", "WORLD_SIZE")
    env = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith(("MASTER_", "TORCHELASTIC_"))}
    env.update(
        PYTHONPATH=str(site),
        OMP_NUM_THREADS="1",
        PYTHONDONTWRITEBYTECODE="1",
        PYTHONWARNINGS="ignore",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
    )
    return env


def _smoke_train(project: Project, env: dict[str, str], tmp: Path, python: str, cmds: list[_Cmd]) -> Stage:
    """A few steps of examples/tiny_gpt with `flagscale train`, through the new megatron-core."""
    example = project.root / "examples" / "tiny_gpt"
    if not (example / "conf").is_dir():
        return Stage("smoke", False, f"{example} is missing: run the bump from a FlagScale checkout", _lines(cmds))
    data, exp = tmp / "data", tmp / "exp"
    corpus = _cmd([python, str(example / "make_corpus.py"), "--out", str(data), "--docs", "50"], env, tmp)
    cmds.append(corpus)
    if corpus.returncode != 0:
        return Stage("smoke", False, f"the tiny corpus was not made: {_last_line(corpus.output)}", _lines(cmds))
    train = [
        python,
        "-m",
        "flagscale.cli",
        "train",
        str(example / "conf"),
        "--foreground",
        f"experiment.exp_dir={exp}",
        f"train.data.data_path={data / 'corpus_text_document'}",
        f"train.model.train_iters={TRAIN_ITERS}",
        f"train.system.checkpoint.save_interval={TRAIN_ITERS * 100}",
    ]
    trained = _cmd(train, env, tmp, timeout=900)
    cmds.append(trained)
    metrics = exp / "logs" / "metrics.jsonl"
    losses = [json.loads(line)["loss"] for line in metrics.read_text().splitlines()] if metrics.is_file() else []
    if trained.returncode != 0 or len(losses) < TRAIN_ITERS or not all(math.isfinite(x) for x in losses):
        why = f"{len(losses)} of {TRAIN_ITERS} training steps logged (exit {trained.returncode})"
        tail = (
            (exp / "logs" / "node0.log").read_text(errors="replace") if (exp / "logs" / "node0.log").is_file() else ""
        )
        return Stage(
            "smoke", False, f"tiny_gpt did not train: {why}: {_last_line(tail or trained.output)}", _lines(cmds)
        )
    shown = ", ".join(f"{x:.4f}" for x in losses)
    return Stage("smoke", True, f"import and {TRAIN_ITERS} training steps of tiny_gpt (losses {shown})", _lines(cmds))


def _smoke_complete(
    staged: Project,
    site: Path,
    env: dict[str, str],
    tmp: Path,
    python: str,
    gguf: Path | None,
    cache: Cache,
    cmds: list[_Cmd],
) -> Stage:
    """A completion from a GGUF through the new wheel's bindings (a tiny one converted by the new pin)."""
    if gguf is None:
        made = _tiny_gguf(staged, env, tmp, python, cache, cmds)
        if isinstance(made, Stage):
            return made
        gguf = made
    # The wheel's own bindings (its libllama): llama-completion exits early at random when stdin is not a tty.
    code = (
        "import json, sys, llama_cpp\n"
        "m = llama_cpp.Llama(model_path=sys.argv[1], n_ctx=128, seed=0, verbose=False)\n"
        "print(json.dumps(m.create_completion('Hello', max_tokens=8, temperature=0.0)))\n"
    )
    completed = _cmd([python, "-c", code, str(gguf)], env, tmp)
    cmds.append(completed)
    try:
        tokens = json.loads(completed.output.strip().splitlines()[-1])["usage"]["completion_tokens"]
    except (IndexError, ValueError, KeyError, TypeError):
        tokens = 0
    if completed.returncode != 0 or not tokens:
        why = f"exit {completed.returncode}, {tokens} completion tokens"
        return Stage("smoke", False, f"the completion failed ({why}): {_last_line(completed.output)}", _lines(cmds))
    return Stage("smoke", True, f"import and a completion of {tokens} tokens from {gguf.name}", _lines(cmds))


def _tiny_gguf(staged: Project, env: dict[str, str], tmp: Path, python: str, cache: Cache, cmds: list[_Cmd]):
    """tools/make_tiny_model.py, converted with the new pin's convert_hf_to_gguf.py: a GGUF or a failed Stage."""
    from flagscale.patches.tree import patched_tree
    from flagscale.upstream.target import Target

    tools = Path(__file__).resolve().parents[2] / "tools"
    hf, out = tmp / "hf", tmp / "tiny.gguf"
    made = _cmd([python, str(tools / "make_tiny_model.py"), str(hf)], env, tmp)
    cmds.append(made)
    if made.returncode != 0:
        return Stage("smoke", False, f"the tiny model was not made: {_last_line(made.output)}", _lines(cmds))
    tree = patched_tree(Target.of(staged, "llama.cpp", SMOKE_DEVICE, "sdist", cache))
    root = tree.path / (tree.source.to_tree_path("") or "")
    conv_env = {**env, "PYTHONPATH": os.pathsep.join([str(root / "gguf-py"), env["PYTHONPATH"]])}
    argv = [python, str(root / "convert_hf_to_gguf.py"), str(hf), "--outfile", str(out), "--outtype", "f32"]
    converted = _cmd(argv, conv_env, tmp)
    cmds.append(converted)
    if converted.returncode != 0 or not out.is_file():
        return Stage("smoke", False, f"the new pin's converter failed: {_last_line(converted.output)}", _lines(cmds))
    return out


def _cmd(argv: list[str], env: dict[str, str], cwd: Path, timeout: float = 600) -> _Cmd:
    try:
        # errors=replace: a random model's tokens need not be UTF-8
        done = subprocess.run(argv, env=env, cwd=cwd, capture_output=True, text=True, errors="replace", timeout=timeout)
    except subprocess.TimeoutExpired:
        return _Cmd(tuple(argv), -1, f"timed out after {timeout:.0f} s")
    except OSError as exc:
        return _Cmd(tuple(argv), -1, str(exc))
    return _Cmd(tuple(argv), done.returncode, done.stdout + done.stderr)


def _lines(cmds: list[_Cmd]) -> tuple[str, ...]:
    return tuple(line for c in cmds for line in c.lines())


def _last_line(output: str) -> str:
    lines = [line.strip() for line in output.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "no output"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


# -------------------------------------------------------------------------------------------- report
def write_report(result: BumpResult) -> Path:
    """The bump's markdown report: verdict, the release, then each stage with its table or log tails."""
    verdict = (
        f"**Bumped**: wrote {len(result.written)} file(s)."
        if result.ok
        else f"**Not bumped**: {result.reason}. Nothing in the checkout was changed."
    )
    rel = result.release
    lines = [
        f"# Bump {result.backend}: {result.old_version} -> {result.new_version}",
        "",
        verdict,
        "",
        f"- sdist: `{rel.filename}` ({rel.url})",
        f"- sha256: `{rel.sha256}`",
    ]
    if result.workspace:
        lines.append(f"- rebase workspace: `{result.workspace}`")
    lines += [f"- written: `{p}`" for p in result.written]
    for stage in result.stages:
        lines += ["", f"## {stage.name}: {'ok' if stage.ok else 'FAILED'}", "", _cell(stage.summary), ""]
        lines += stage.details
    ran = {s.name for s in result.stages}
    skipped = [n for n in ("rebase", "check", "build", "smoke") if n not in ran]
    if skipped:
        lines += ["", f"Not run (an earlier step failed): {', '.join(skipped)}."]
    result.report.parent.mkdir(parents=True, exist_ok=True)
    result.report.write_text("\n".join(lines).rstrip() + "\n", encoding="utf-8")
    return result.report


__all__ = ["BumpResult", "Stage", "bump", "stage_project", "write_report"]
