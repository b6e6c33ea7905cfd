"""devtool-style patch workflow: checkout a pin as a git repo with one commit per patch, export the
commits back to patch files, rebase the series onto a new pin, and check every (device, backend) cell."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

from flagscale.errors import ConfigError, FlagScaleError, GitError
from flagscale.patches.apply import plan_patches, write_plan
from flagscale.patches.patchfile import Patch, read_patch
from flagscale.patches.series import read_series, series_for, series_header, write_series
from flagscale.patches.tree import load_series_patches, patched_tree
from flagscale.upstream import git as g
from flagscale.upstream.cache import Cache, remove_tree
from flagscale.upstream.index import find_sdist
from flagscale.upstream.pins import Pin
from flagscale.upstream.project import Project
from flagscale.upstream.sources import Source, materialize
from flagscale.upstream.target import Target

TRAILER = "FlagScale-Patch"
STATE_FILE = "flagscale-checkout.json"


# ----------------------------------------------------------------------------------------- checkout
def checkout(
    project: Project,
    backend: str,
    dest: Path,
    device: str | None = None,
    source: str = "auto",
    cache: Cache | None = None,
) -> list[str]:
    """Create `dest` as a git repo of the pin (repository layout) plus one commit per patch."""
    target = Target.of(project, backend, device, source, cache)
    pin = target.pin
    if dest.exists() and any(dest.iterdir()):
        raise ConfigError(f"{dest} is not empty; choose a new folder for the checkout")
    src = materialize(target)
    labelled = load_series_patches(project, pin.backend, device)
    dest.mkdir(parents=True, exist_ok=True)
    try:
        base = _base_repo(src, dest)
        commits = _commit_patches(dest, labelled, pin, pin.backend, device)
        state = {
            "backend": pin.backend,
            "device": device,
            "base": base,
            "source": src.key,
            "pin": {"version": pin.sdist.version, "sha256": pin.sdist.sha256, "commit": pin.commit},
            "project": str(project.root),
        }
        (dest / ".git" / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")
    except BaseException:
        remove_tree(dest)
        raise
    return commits


def _base_repo(src: Source, dest: Path) -> str:
    """Lay the source out in repository paths and commit it as the base."""
    _base_repo_files(src, dest)
    g.init_repo(dest)
    return g.commit_all(dest, f"upstream: {src.pin.label}\n\nFlagScale-Source: {src.key}\n", env=g.BOT_IDENTITY)


def _commit_patches(
    repo: Path, labelled: list[tuple[str, Patch]], pin: Pin, backend: str, device: str | None
) -> list[str]:
    commits = []
    for label, patch in labelled:
        plan = plan_patches(
            repo,
            [patch],
            pin_label=pin.label,
            hint=f"; the series does not apply to its own pin: run `tools/patch.py check --backend {backend}`",
        )
        write_plan(plan, repo)
        env = {**g.BOT_IDENTITY, **_author_env(patch)}
        commits.append(g.commit_all(repo, _commit_message(patch, label), env=env))
    return commits


def _author_env(patch: Patch) -> dict[str, str]:
    from email.utils import parseaddr

    name, email = parseaddr(patch.headers.get("From", ""))
    env: dict[str, str] = {}
    if email:
        env.update(GIT_AUTHOR_NAME=name or email, GIT_AUTHOR_EMAIL=email)
    if patch.headers.get("Date"):
        env.update(GIT_AUTHOR_DATE=patch.headers["Date"], GIT_COMMITTER_DATE=patch.headers["Date"])
    return env


def _commit_message(patch: Patch, label: str) -> str:
    body = f"\n\n{patch.body}" if patch.body else ""
    return f"{patch.subject or patch.name}{body}\n\n{TRAILER}: {label}/{patch.name}\n"


# ------------------------------------------------------------------------------------------- export
@dataclass(frozen=True)
class ExportResult:
    written: list[Path]
    unchanged: list[Path]
    removed: list[Path]


def export(project: Project, backend: str, repo: Path, device: str | None = None) -> ExportResult:
    """Turn the checkout's commits back into the series; rewrite only what changed."""
    state = _checkout_state(repo, project.pins.resolve(backend).backend, device)
    if g.out(repo, "status", "--porcelain", "--untracked-files=no").strip():
        raise ConfigError(f"{repo} has uncommitted changes; commit them (one commit per patch) and export again")
    commits = g.out(repo, "rev-list", "--reverse", f"{state['base']}..HEAD").split()
    if g.out(repo, "rev-list", "--merges", f"{state['base']}..HEAD").strip():
        raise ConfigError(f"{repo}: merge commits cannot become patches; rebase them away first")
    folders = {"common": project.common_series_dir(state["backend"])}
    if device:
        folders[f"device:{device}"] = project.device_series_dir(device, state["backend"])
    outputs = _render_commits(repo, commits, folders, device)
    return _write_series(folders, outputs)


def _checkout_state(repo: Path, backend: str, device: str | None) -> dict:
    file = repo / ".git" / STATE_FILE
    if not file.is_file():
        raise ConfigError(
            f"{repo} is not a FlagScale checkout; create one with `tools/patch.py checkout {backend} DIR`"
        )
    state = json.loads(file.read_text())
    if state["backend"] != backend or state["device"] != device:
        raise ConfigError(
            f"{repo} is a checkout of backend {state['backend']} device {state['device']}; "
            f"export it with the same --backend/--device"
        )
    return state


def _render_commits(
    repo: Path, commits: list[str], folders: dict[str, Path], device: str | None
) -> list[tuple[str, str, bytes]]:
    """(series label, file name, bytes) per commit, in commit order."""
    outputs: list[tuple[str, str, bytes]] = []
    taken = {label: {p.name for p in folder.glob("*.patch")} for label, folder in folders.items()}
    messages = [g.out(repo, "log", "-1", "--format=%B", commit) for commit in commits]
    known = [_trailer(message, folders) for message in messages]
    # A commit without our trailer was exported before if an unclaimed patch has its subject:
    # reuse that name, so exporting twice changes nothing.
    claimed = {k for k in known if k}
    by_subject: dict[str, tuple[str, str]] = {}
    for label, folder in folders.items():
        for path in folder.glob("*.patch"):
            if (label, path.name) not in claimed:
                by_subject.setdefault(read_patch(path).subject, (label, path.name))
    known = [
        k or by_subject.pop(message.splitlines()[0].strip() if message else "", None)
        for k, message in zip(known, messages, strict=False)
    ]
    last_common = max((i for i, k in enumerate(known) if k and k[0] == "common"), default=-1)
    label = "common"
    for index, (commit, message, found) in enumerate(zip(commits, messages, known, strict=False)):
        if found:
            new_label, name = found
        else:
            # A new commit joins the series before it; in a device checkout, everything after the
            # last common patch belongs to the device.
            new_label = f"device:{device}" if device and index > last_common else label
            name = _new_name(message, taken[new_label])
        if label.startswith("device:") and new_label == "common":
            raise ConfigError(
                f"commit {commit[:12]} ({name}) is a common patch after device patches; "
                "reorder the commits so common patches come first"
            )
        label = new_label
        taken[label].add(name)
        outputs.append((label, name, _strip_trailer(g.format_patch(repo, commit))))
    return outputs


def _trailer(message: str, folders: dict[str, Path]) -> tuple[str, str] | None:
    match = re.search(rf"^{TRAILER}: (\S+)/(\S+)$", message, re.MULTILINE)
    return (match.group(1), match.group(2)) if match and match.group(1) in folders else None


def _new_name(message: str, taken: set[str]) -> str:
    subject = message.splitlines()[0] if message else "patch"
    slug = re.sub(r"[^a-z0-9]+", "-", subject.lower()).strip("-")[:52].rstrip("-") or "patch"
    numbers = [int(n[:4]) for n in taken if n[:4].isdigit()]
    return f"{(max(numbers) + 1 if numbers else 1):04d}-{slug}.patch"


def _strip_trailer(data: bytes) -> bytes:
    """Drop our bookkeeping trailer (and the blank line before it) from the message part."""
    return re.sub(rb"\n\n" + TRAILER.encode() + rb": [^\n]*\n", b"\n", data, count=1)


def _write_series(folders: dict[str, Path], outputs: list[tuple[str, str, bytes]]) -> ExportResult:
    written, unchanged, removed = [], [], []
    for label, folder in folders.items():
        old_names = read_series(folder, label).names
        new = [(name, data) for lab, name, data in outputs if lab == label]
        folder.mkdir(parents=True, exist_ok=True)
        for name, data in new:
            path = folder / name
            if path.is_file() and path.read_bytes() == data:
                unchanged.append(path)
                continue
            tmp = path.with_name(f".{name}.tmp")
            tmp.write_bytes(data)
            os.replace(tmp, path)
            written.append(path)
        new_names = [name for name, _ in new]
        for name in old_names:
            if name not in new_names:
                (folder / name).unlink(missing_ok=True)
                removed.append(folder / name)
        if new_names or old_names:
            write_series(folder, new_names, series_header(folder))
    return ExportResult(written, unchanged, removed)


# ------------------------------------------------------------------------------------------- rebase
# The rebase itself lives in flagscale.patches.rebase; these helpers are shared with it.
def _new_pin(pin: Pin, version: str, sha256: str | None) -> Pin:
    """The pin moved to `version`; its sha256 comes from the user or from the index (verified on download)."""
    if sha256 is None:
        sha256 = find_sdist(pin.sdist.name, version).sha256
    if not re.fullmatch(r"[0-9a-f]{64}", sha256.lower()):
        raise ConfigError(f"--sha256 {sha256!r} is not a sha256 hex digest")
    tag = pin.tag_format.format(version=version) if pin.tag_format else None
    sdist = dataclasses.replace(pin.sdist, version=version, sha256=sha256.lower())
    return dataclasses.replace(pin, sdist=sdist, tag=tag, commit=None, commit_hint=None)


def _import_tree(repo: Path, src: Source, parent: str) -> str:
    """Commit the new pin's tree (repository layout) as a child of the old base."""
    with tempfile.TemporaryDirectory(prefix="flagscale-newpin-") as tmp:
        staged = Path(tmp) / "t"
        staged.mkdir()
        _base_repo_files(src, staged)
        g.git(repo, "checkout", "-q", "--detach", parent)
        for entry in repo.iterdir():
            if entry.name != ".git":
                remove_tree(entry)
        from flagscale.patches.apply import copy_tree

        copy_tree(staged, repo)
    return g.commit_all(repo, f"upstream: {src.pin.label}\n\nFlagScale-Source: {src.key}\n", env=g.BOT_IDENTITY)


def _base_repo_files(src: Source, dest: Path) -> None:
    for dirpath, _, filenames in os.walk(src.tree):
        rel_dir = os.path.relpath(dirpath, src.tree)
        for name in filenames:
            repo_path = src.to_repo_path(name if rel_dir == "." else f"{rel_dir}/{name}")
            if repo_path is None:
                continue
            target = dest / repo_path
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes((Path(dirpath) / name).read_bytes())
            os.chmod(target, 0o755 if os.stat(Path(dirpath) / name).st_mode & 0o100 else 0o644)


def write_pin(project: Project, pin: Pin) -> None:
    """Record a new pin in upstreams.toml, keeping its comments and layout."""
    import tomlkit

    path = project.pins.path
    doc = tomlkit.parse(path.read_text(encoding="utf-8"))
    table = doc[pin.backend]
    for key, value in (("tag", pin.tag), ("commit", pin.commit), ("commit_hint", pin.commit_hint)):
        if value is None:
            table.pop(key, None)
        else:
            table[key] = value
    table["sdist"]["version"] = pin.sdist.version
    table["sdist"]["sha256"] = pin.sdist.sha256
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(tomlkit.dumps(doc), encoding="utf-8")
    os.replace(tmp, path)


# -------------------------------------------------------------------------------------------- check
@dataclass(frozen=True)
class CellResult:
    backend: str
    device: str | None
    patches: int
    status: str  # ok | offset | FAIL
    detail: str = ""


def cells(project: Project, backend: str | None = None, device: str | None = None) -> list[tuple[str, str | None]]:
    """Every (backend, device) pair to check: each backend alone, and with every device that supports it."""
    from flagscale.hardware.registry import load_devices

    backends = [project.pins.resolve(backend).backend] if backend else project.pins.names
    devices = load_devices(project)
    if device is not None and device not in devices:
        raise ConfigError(f"unknown device {device!r}; known devices: {', '.join(devices)}")
    out: list[tuple[str, str | None]] = []
    for b in backends:
        if device is None:
            out.append((b, None))
        for name, dev in devices.items():
            if (device is None or name == device) and b in dev.backends:
                out.append((b, name))
    return out


def check(
    project: Project,
    backend: str | None = None,
    device: str | None = None,
    source: str = "auto",
    cache: Cache | None = None,
) -> list[CellResult]:
    cache = cache or Cache()  # one cache for every cell
    results = []
    for b, d in cells(project, backend, device):
        try:
            tree = patched_tree(Target.of(project, b, d, source, cache))
            manifest = json.loads((tree.path.parent / "manifest.json").read_text())
            offsets = manifest.get("offsets", [])
            status = "offset" if offsets else "ok"
            detail = ", ".join(offsets[:3]) + (" …" if len(offsets) > 3 else "")
            results.append(CellResult(b, d, len(tree.patches), status, detail))
        except (FlagScaleError, GitError) as exc:
            count = sum(len(s.names) for s in series_for(project, b, d)) if _series_ok(project, b, d) else 0
            results.append(CellResult(b, d, count, "FAIL", str(exc)))
    return results


def _series_ok(project: Project, backend: str, device: str | None) -> bool:
    try:
        series_for(project, backend, device)
        return True
    except FlagScaleError:
        return False


def rebase(project: Project, backend: str, to_version: str, *args, **kwargs) -> list:
    """The rebase as a list of per-patch reports; raises RebaseConflict (nothing written) unless it completed.

    Kept for callers of the first API; `flagscale.patches.rebase.rebase` returns the full RebaseResult.
    """
    from flagscale.errors import RebaseConflict
    from flagscale.patches.rebase import rebase as full_rebase

    result = full_rebase(project, backend, to_version, *args, **kwargs)
    if not result.complete:
        raise RebaseConflict(
            f"{len(result.conflicts)} patch(es) conflict with {result.new_pin.label} and "
            f"{len(result.upstreamed)} are already in it; nothing was written",
            list(result.report),
        )
    return list(result.report)
