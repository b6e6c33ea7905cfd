"""Rebase every patch series of a backend onto another release of its upstream.

Every patch of every series (common, then each device's on top of it) is tried, in order, on top of
the patches before it that went through:

1. the strict apply engine (`clean`, or `offset` when a hunk moved);
2. already upstream: the patch reverse-applies to the new release, or a 3-way merge of it adds
   nothing (`already-upstream`; `drop_upstreamed` removes it from its series);
3. automatic merges, each accepted only if the refreshed patch passes the strict engine on the new
   release, gives exactly the merged files, and merged Python files that compiled still compile:
   git's 3-way merge with the myers, patience, histogram and minimal diff algorithms; "adjacent
   insertion" (one side only added lines next to or among lines the other changed, which git calls a
   conflict); then Debian's word-level `wiggle` when it is installed (`merged`, with the strategy);
4. otherwise `conflict`, with the file, the line range and both sides of every conflict region.

A patch that touches a file of a conflicting patch (or of a patch that depends on one) is still tried
against the best base there is (the release plus the patches that went through) and reported
`dependent-on-conflict`, naming the patch it depends on; nothing is ever skipped.

With a workspace, the rebase leaves a git repository of the new release with every patch that went
through committed (as `patch checkout` commits them) and the first conflicting patch in progress
with diff3 conflict markers; `continue_rebase` goes on after the user resolved it, and
`abort_rebase` removes the workspace. Nothing in the project is written before the rebase finishes.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

from flagscale.errors import ApplyError, ConfigError, PatchError
from flagscale.patches.patchfile import Patch, parse_patch
from flagscale.patches.series import read_series
from flagscale.patches.tree import load_series_patches
from flagscale.patches.workflow import (
    STATE_FILE as CHECKOUT_STATE_FILE,
)
from flagscale.patches.workflow import (
    _base_repo,
    _import_tree,
    _new_pin,
    _render_commits,
    _strip_trailer,
    _write_series,
    write_pin,
)
from flagscale.upstream import git as g
from flagscale.upstream.cache import Cache, remove_tree
from flagscale.upstream.pins import Pin
from flagscale.upstream.project import Project
from flagscale.upstream.sources import materialize
from flagscale.upstream.target import Target

log = logging.getLogger(__name__)

STATE_FILE = "flagscale-rebase.json"
STATUSES = ("clean", "offset", "merged", "already-upstream", "conflict", "dependent-on-conflict")
MERGE_ALGORITHMS = ("myers", "patience", "histogram", "minimal")
_SIDE_LINES = 6  # lines of each side kept in a conflict's short form


# ------------------------------------------------------------------------------------------- report
@dataclass(frozen=True)
class Conflict:
    """One conflict region: where it is in the file as rebased so far (new release + earlier patches)."""

    path: str
    start: int  # 1-based first line of the release's side; 0 when the whole file conflicts
    end: int  # last line (start - 1 when the release's side is empty: the patch inserts after start - 1)
    upstream: str  # the new release's side
    patch: str  # the patch's side
    base: str = ""  # the old release's lines both sides changed

    @property
    def where(self) -> str:
        if self.start == 0:
            return self.path
        if self.end > self.start:
            return f"{self.path} lines {self.start}-{self.end}"
        return f"{self.path} line {self.start}" + (" (insertion)" if self.end < self.start else "")


@dataclass(frozen=True)
class PatchReport:
    """What happened to one patch. `series` is `common` or `device:<name>`."""

    series: str
    name: str
    status: str  # one of STATUSES
    detail: str = ""
    strategy: str | None = None  # merged: e.g. "3-way patience", "wiggle"
    conflicts: tuple[Conflict, ...] = ()
    depends_on: str | None = None  # dependent-on-conflict: "<series>/<patch>" it is stacked on
    absorbed_by: str | None = None  # already-upstream: the release that contains it

    @property
    def result(self) -> str:
        return f"merged ({self.strategy})" if self.status == "merged" else self.status

    @property
    def automatic(self) -> bool:
        """Went through with no human touch."""
        return self.status in ("clean", "offset", "merged", "already-upstream")


@dataclass(frozen=True)
class RebaseResult:
    """A rebase's outcome. `patches` is the refreshed series, (series, name, bytes) in order, without
    the patches dropped as already upstream; complete only when `complete`."""

    backend: str
    old_pin: Pin
    new_pin: Pin
    report: tuple[PatchReport, ...]
    patches: tuple[tuple[str, str, bytes], ...]
    drop_upstreamed: bool
    wiggle: bool  # whether wiggle was there to try
    workspace: Path | None = None
    written: bool = False  # series and pin written to the project
    in_progress: str | None = None  # "<series>/<patch>" left with conflict markers in the workspace

    @property
    def conflicts(self) -> list[PatchReport]:
        return [r for r in self.report if r.status in ("conflict", "dependent-on-conflict")]

    @property
    def upstreamed(self) -> list[PatchReport]:
        return [r for r in self.report if r.status == "already-upstream"]

    @property
    def summary(self) -> str:
        """One line: counts per result and the share that went through with no human touch."""
        counts: dict[str, int] = {}
        for row in self.report:
            key = "merged" if row.status == "merged" else row.status
            counts[key] = counts.get(key, 0) + 1
        parts = ", ".join(f"{counts[s]} {s}" for s in STATUSES if s in counts)
        auto = sum(r.automatic for r in self.report)
        share = f"{auto}/{len(self.report)} ({100 * auto // max(len(self.report), 1)}%)"
        return f"{len(self.report)} patch(es): {parts}; {share} with no human touch"

    @property
    def complete(self) -> bool:
        """Every patch went through (an already upstream one only if it is dropped): ready to write."""
        return not self.conflicts and (self.drop_upstreamed or not self.upstreamed)


# --------------------------------------------------------------------------------------------- API
def rebase(
    project: Project,
    backend: str,
    to_version: str,
    sha256: str | None = None,
    source: str | None = None,
    old_source: str = "auto",
    cache: Cache | None = None,
    *,
    workspace: Path | None = None,
    drop_upstreamed: bool = False,
    write: bool = True,
) -> RebaseResult:
    """Rebase every series of `backend` onto release `to_version` and report on every patch.

    `sha256` of the new sdist comes from the package index when not given; `source` is a local tree
    of the new release, `old_source` the source of the current pin. The project is written (refreshed
    patches, series files, `third_party/upstreams.toml`) only if `write` and the result is `complete`;
    with `write=False` the refreshed patch bytes are in `result.patches` and nothing is written.
    With `workspace` (a new folder) the rebase repository is kept there; when the result is not
    complete, the first conflicting patch is left in progress for `continue_rebase`.
    """
    if workspace is not None and workspace.exists() and any(workspace.iterdir()):
        raise ConfigError(f"{workspace} is not empty; choose a new folder for the rebase workspace")
    cache = cache or Cache()
    old = Target.of(project, backend, None, old_source, cache)
    old_pin = old.pin
    new_pin = _new_pin(old_pin, to_version, sha256)
    old_src = materialize(old)
    new_src = materialize(old.with_pin(new_pin, source or "sdist"))
    devices = [d for d in project.devices if read_series(project.device_series_dir(d, old_pin.backend), "").names]
    with _repo_dir(workspace) as repo:
        old_base = _base_repo(old_src, repo)
        g.git(repo, "config", "merge.conflictStyle", "diff3")
        new_base = _import_tree(repo, new_src, old_base)
        stacks = [_old_stack(project, repo, old_pin, old_base, None)]
        old_common = stacks[0].patches[-1][1] if stacks[0].patches else old_base
        stacks += [_old_stack(project, repo, old_pin, old_common, d) for d in devices]
        state = _State(
            project=str(project.root),
            backend=old_pin.backend,
            to_version=to_version,
            sha256=new_pin.sdist.sha256,
            release=new_pin.sdist.name + " " + new_pin.sdist.version,
            drop_upstreamed=drop_upstreamed,
            new_base=new_base,
            stacks=stacks,
        )
        replayer = _Replayer(repo, new_pin.label, state.release)
        report = _preview(replayer, state)
        result = RebaseResult(
            old_pin.backend, old_pin, new_pin, tuple(report), (), drop_upstreamed, replayer.wiggle is not None
        )
        if result.complete:
            result = _finish(project, repo, state, result, write)
        elif workspace is not None:
            state.report = [asdict(r) for r in report]
            _stop_at_first_conflict(replayer, state, report)
        if workspace is not None:
            _write_checkout_state(repo, state, new_pin)
            if not state.report:
                state.report = [asdict(r) for r in report]
            state.finished = result.written
            state.save(repo)
            if not result.complete:
                return _workspace_result(state, old_pin, new_pin, replayer, workspace)
            g.git(repo, "checkout", "-q", state.stacks[0].branch)
            return _with(result, workspace=workspace)
    return result


def continue_rebase(workspace: Path, drop_upstreamed: bool | None = None, write: bool = True) -> RebaseResult:
    """Go on after the user resolved the patch in progress (committed it, or `git add`ed the files).

    Replays the remaining patches, stopping at the next conflict, or finishes: writes the refreshed
    series and the new pin (when `write`). `drop_upstreamed` changes the choice made at the start.
    """
    state = _State.load(workspace)
    project = Project(Path(state.project))
    if drop_upstreamed is not None:
        state.drop_upstreamed = drop_upstreamed
    old_pin = project.pins.resolve(state.backend)
    new_pin = _new_pin(old_pin, state.to_version, state.sha256)
    replayer = _Replayer(workspace, new_pin.label, state.release)
    _settle_resolution(workspace, state)
    for index, stack in enumerate(state.stacks):
        if stack.done:
            continue
        if stack.head is None:  # not started: on top of the finished common series
            parent = state.stacks[0].branch if index else state.new_base
            g.git(workspace, "checkout", "-q", "-B", stack.branch, parent)
            stack.head = g.out(workspace, "rev-parse", "HEAD").strip()
        g.git(workspace, "checkout", "-q", stack.branch)
        if not _resume(replayer, state, stack):
            state.save(workspace)
            return _workspace_result(state, old_pin, new_pin, replayer, workspace)
        stack.done = True
        state.save(workspace)
    result = _workspace_result(state, old_pin, new_pin, replayer, workspace)
    if result.conflicts:  # cannot happen once every stack is done, but never write a half rebase
        return result
    if result.upstreamed and not state.drop_upstreamed:
        return result
    g.git(workspace, "checkout", "-q", state.stacks[0].branch)
    result = _finish(project, workspace, state, result, write)
    state.finished = result.written
    state.save(workspace)
    return result


def abort_rebase(workspace: Path) -> None:
    """Forget a rebase in progress: remove its workspace. The project was not written, so it is as before."""
    _State.load(workspace)  # refuses a folder that is not a rebase workspace
    remove_tree(workspace)


# --------------------------------------------------------------------------------------- the state
@dataclass
class _Stack:
    """One series replayed on its own branch: common on `main`, each device on `device/<name>`."""

    label: str
    device: str | None
    branch: str
    patches: list[tuple[str, str]]  # (patch name, commit of the patch on the old release)
    next: int = 0  # index of the next patch to replay
    head: str | None = None  # where the branch started (None: not started yet)
    stopped: int | None = None  # index of the patch in progress
    stop_head: str | None = None  # the branch's commit when it stopped
    done: bool = False
    upstreamed: list[str] = field(default_factory=list)


@dataclass
class _State:
    project: str
    backend: str
    to_version: str
    sha256: str
    release: str
    drop_upstreamed: bool
    new_base: str
    stacks: list[_Stack]
    report: list[dict] = field(default_factory=list)
    finished: bool = False

    def save(self, repo: Path) -> None:
        data = asdict(self)
        (repo / ".git" / STATE_FILE).write_text(json.dumps(data, indent=2) + "\n")

    @classmethod
    def load(cls, repo: Path) -> _State:
        file = repo / ".git" / STATE_FILE
        if not file.is_file():
            raise ConfigError(f"{repo} is not a rebase workspace; start one with `flagscale patch rebase --workspace`")
        data = json.loads(file.read_text())
        stacks = [_Stack(**{**s, "patches": [tuple(p) for p in s["patches"]]}) for s in data.pop("stacks")]
        state = cls(**data, stacks=stacks)
        if state.finished:
            raise ConfigError(f"{repo}: this rebase has finished already; there is nothing to continue or abort")
        return state


@contextmanager
def _repo_dir(workspace: Path | None) -> Iterator[Path]:
    if workspace is None:
        with tempfile.TemporaryDirectory(prefix="flagscale-rebase-") as tmp:
            (Path(tmp) / "repo").mkdir()
            yield Path(tmp) / "repo"
        return
    workspace.mkdir(parents=True, exist_ok=True)
    try:
        yield workspace
    except BaseException:
        remove_tree(workspace)
        raise


def _old_stack(project: Project, repo: Path, pin: Pin, parent: str, device: str | None) -> _Stack:
    """Commit one series on the old release: common on its base, a device's on the common series."""
    from flagscale.patches.workflow import _commit_patches

    label = f"device:{device}" if device else "common"
    labelled = [(lab, p) for lab, p in load_series_patches(project, pin.backend, device) if lab == label]
    g.git(repo, "checkout", "-q", "--detach", parent)
    commits = _commit_patches(repo, labelled, pin, pin.backend, device)
    g.git(repo, "update-ref", f"refs/flagscale/old/{label.replace(':', '/')}", "HEAD")
    own = [(p.name, c) for (_, p), c in zip(labelled, commits, strict=True)]
    return _Stack(label, device, f"device/{device}" if device else "main", own)


# -------------------------------------------------------------------------------------- replaying
@dataclass(frozen=True)
class _Outcome:
    status: str  # clean | offset | merged | already-upstream | conflict
    detail: str = ""
    strategy: str | None = None
    conflicts: tuple[Conflict, ...] = ()


class _Replayer:
    def __init__(self, repo: Path, pin_label: str, release: str) -> None:
        self.repo, self.pin_label, self.release = repo, pin_label, release
        self.wiggle = shutil.which("wiggle")
        if self.wiggle is None:
            log.warning("wiggle is not installed: word-level merges are not tried (apt-get install wiggle)")

    def patch_of(self, commit: str) -> Patch:
        return parse_patch(_strip_trailer(g.format_patch(self.repo, commit)), commit[:12])

    def replay(self, commit: str) -> _Outcome:
        """Put the patch of `commit` on HEAD; on success it is committed (HEAD moves), else nothing changes."""
        patch = self.patch_of(commit)
        outcome = self._strict(patch, commit)
        if outcome is None and self._reverse_applies(patch):
            return _Outcome("already-upstream", f"already in {self.release}")
        if outcome is None:
            outcome = self._merged(commit)
        return outcome

    def _strict(self, patch: Patch, commit: str) -> _Outcome | None:
        from flagscale.patches.apply import plan_patches, write_plan

        try:
            plan = plan_patches(self.repo, [patch], pin_label=self.pin_label)
        except (ApplyError, PatchError):
            return None
        write_plan(plan, self.repo)
        _commit_like(self.repo, commit)
        offsets = plan.offsets()
        detail = ", ".join(f"{o.path} hunk {o.hunk} {o.offset:+d}" for o in offsets)
        return _Outcome("offset" if offsets else "clean", detail)

    def _reverse_applies(self, patch: Patch) -> bool:
        if not patch.files:
            return False
        return g.git(self.repo, "apply", "--check", "-R", "-", input=patch.data, check=False).returncode == 0

    def _merged(self, commit: str) -> _Outcome:
        head = self._head()
        for algorithm in MERGE_ALGORITHMS:
            if self._cherry_pick(commit, algorithm):
                outcome = self._accept(commit, head, f"3-way {algorithm}")
                if outcome is not None:
                    return outcome
            self._reset(head)
        # git calls changes on adjacent lines a conflict; when one side only adds lines next to what
        # the other changed, both changes are independent and can be kept.
        if not self._cherry_pick(commit, "myers") and self._resolve_adjacent():
            outcome = self._accept(commit, head, "adjacent insertion")
            if outcome is not None:
                return outcome
        self._reset(head)
        if self.wiggle is not None:
            if self._wiggle(commit, head):
                outcome = self._accept(commit, head, "wiggle")
                if outcome is not None:
                    return outcome
            self._reset(head)
        # Report the conflicts as the workspace shows them: git's default merge, diff3 markers.
        self._cherry_pick(commit, "myers")
        conflicts = tuple(_conflicts(self.repo))
        self._reset(head)
        tried = ", ".join(f"3-way {a}" for a in MERGE_ALGORITHMS) + ", adjacent insertion"
        tried += ", wiggle" if self.wiggle else " (wiggle is not installed)"
        detail = "; ".join(c.where for c in conflicts) + f" (tried {tried})"
        return _Outcome("conflict", detail, conflicts=conflicts)

    def _cherry_pick(self, commit: str, algorithm: str) -> bool:
        args = ["-c", "merge.conflictStyle=diff3", "cherry-pick", "--no-commit", "--allow-empty"]
        if algorithm != "myers":
            args += ["--strategy=recursive", f"-Xdiff-algorithm={algorithm}"]
        return g.git(self.repo, *args, commit, check=False, env=g.BOT_IDENTITY).returncode == 0

    def _resolve_adjacent(self) -> bool:
        """Resolve every conflict region of the merge in progress as an adjacent insertion, or none."""
        status = g.out(self.repo, "status", "--porcelain=v1", "--untracked-files=no").splitlines()
        unmerged = [line[3:] for line in status if line[:2] in ("DD", "AU", "UD", "UA", "DU", "AA", "UU")]
        if any(line[:2] != "UU" for line in status if line[3:] in unmerged):
            return False
        resolved = {path: resolve_adjacent((self.repo / path).read_bytes()) for path in unmerged}
        if not unmerged or any(v is None for v in resolved.values()):
            return False
        for path, data in resolved.items():
            (self.repo / path).write_bytes(data or b"")
            g.git(self.repo, "add", "--", path)
        return True

    def _wiggle(self, commit: str, head: str) -> bool:
        """Word-level merge of every file the patch changes: (release, old, patched) -> file."""
        assert self.wiggle is not None
        names = g.out(self.repo, "diff", "--name-status", "--no-renames", f"{commit}~1", commit).splitlines()
        for line in names:
            status, path = line.split("\t", 1)
            before = _blob(self.repo, f"{commit}~1", path)
            after = _blob(self.repo, commit, path)
            current = _blob(self.repo, head, path)
            target = self.repo / path
            if status == "A" or status == "D":
                if current != before:
                    return False
                if after is None:
                    target.unlink()
                else:
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_bytes(after)
                continue
            if current is None or before is None or after is None:
                return False
            with tempfile.TemporaryDirectory(prefix="flagscale-wiggle-") as tmp:
                files = [Path(tmp) / n for n in ("release", "old", "patched")]
                for file, data in zip(files, (current, before, after), strict=True):
                    file.write_bytes(data)
                merged = subprocess.run([self.wiggle, "--merge", *map(str, files)], capture_output=True, check=False)
            if merged.returncode != 0:
                return False
            target.write_bytes(merged.stdout)
        return True

    def _accept(self, commit: str, head: str, strategy: str) -> _Outcome | None:
        """Commit the merge if it passes: refreshed patch strictly applies to HEAD and gives these files."""
        if not g.out(self.repo, "status", "--porcelain", "--untracked-files=all").strip():
            self._reset(head)
            return _Outcome("already-upstream", f"already in {self.release} (a 3-way merge adds nothing)")
        new = _commit_like(self.repo, commit)
        problem = _verify(self.repo, head, new, self.pin_label)
        if problem:
            log.info("%s merge of %s rejected: %s", strategy, commit[:12], problem)
            self._reset(head)
            return None
        return _Outcome("merged", f"{strategy}; review it", strategy)

    def _head(self) -> str:
        return g.out(self.repo, "rev-parse", "HEAD").strip()

    def _reset(self, head: str) -> None:
        g.git(self.repo, "cherry-pick", "--abort", check=False)
        g.git(self.repo, "reset", "-q", "--hard", head)
        g.git(self.repo, "clean", "-q", "-fdx")


def _commit_like(repo: Path, commit: str) -> str:
    """Commit the working tree with `commit`'s message and author (as `patch checkout` commits)."""
    message = g.out(repo, "log", "-1", "--format=%B", commit)
    author = g.out(repo, "log", "-1", "--format=%an%x00%ae%x00%aD", commit).split("\0")
    env = {**g.BOT_IDENTITY, "GIT_AUTHOR_NAME": author[0], "GIT_AUTHOR_EMAIL": author[1]}
    env.update(GIT_AUTHOR_DATE=author[2].strip(), GIT_COMMITTER_DATE=author[2].strip())
    g.git(repo, "cherry-pick", "--quit", check=False)
    return g.commit_all(repo, message, env=env)


def resolve_adjacent(text: bytes) -> bytes | None:
    """Resolve diff3 conflict regions where one side only added lines before and/or after the base
    lines the other side changed (base = pre + base + post -> pre + other side + post); None if any
    region is not like that. With an empty base both sides insert at one place: order unknown, None."""
    out: list[bytes] = []
    region: dict[str, list[bytes]] | None = None
    section = ""
    for line in text.splitlines(keepends=True):
        if line.startswith(b"<<<<<<< "):
            region, section = {"upstream": [], "base": [], "patch": []}, "upstream"
        elif region is not None and line.startswith(b"||||||| "):
            section = "base"
        elif region is not None and line.rstrip(b"\r\n") == b"=======":
            section = "patch"
        elif region is not None and line.startswith(b">>>>>>> "):
            merged = _adjacent(region["upstream"], region["base"], region["patch"])
            if merged is None:
                return None
            out += merged
            region = None
        elif region is not None:
            region[section].append(line)
        else:
            out.append(line)
    return None if region is not None else b"".join(out)


def _adjacent(upstream: list[bytes], base: list[bytes], patch: list[bytes]) -> list[bytes] | None:
    if upstream == patch:
        return upstream
    if not base:
        return None
    for inserted, other in ((patch, upstream), (upstream, patch)):
        n = len(base)
        for at in range(len(inserted) - n + 1):
            if inserted[at : at + n] == base:  # lines added around the base: around the other side's change
                return inserted[:at] + other + inserted[at + n :]
        # Lines added among the base lines, which the other side only deleted from: keep the added
        # lines and leave out the deleted ones.
        in_inserted, kept = _matches(base, inserted), _matches(other, base)
        if in_inserted is not None and kept is not None:
            return [line for line, at in zip(inserted, in_inserted, strict=True) if at is None or kept[at] is not None]
    return None


def _matches(short: list[bytes], long: list[bytes]) -> list[int | None] | None:
    """For each line of `long`, the index of the `short` line it is (greedily), or None for an added line;
    None when `short` is not a subsequence of `long`."""
    out: list[int | None] = []
    i = 0
    for line in long:
        if i < len(short) and line == short[i]:
            out.append(i)
            i += 1
        else:
            out.append(None)
    return out if i == len(short) else None


def _blob(repo: Path, commit: str, path: str) -> bytes | None:
    shown = g.git(repo, "show", f"{commit}:{path}", check=False)
    return shown.stdout if shown.returncode == 0 else None


def _verify(repo: Path, base: str, new: str, pin_label: str) -> str:
    """Why the merged commit `new` on `base` is not acceptable ('' if it is): its patch must pass the
    strict engine on `base` and give exactly the merged files, and merged Python that compiled must still compile."""
    from flagscale.patches.apply import plan_patches

    try:
        patch = parse_patch(_strip_trailer(g.format_patch(repo, new)), new[:12])
    except PatchError as exc:
        return str(exc)
    with tempfile.TemporaryDirectory(prefix="flagscale-verify-") as tmp:
        root = Path(tmp)
        for change in patch.files:
            data = _blob(repo, base, change.path)
            if data is not None:
                (root / change.path).parent.mkdir(parents=True, exist_ok=True)
                (root / change.path).write_bytes(data)
        try:
            plan = plan_patches(root, [patch], pin_label=pin_label)
        except (ApplyError, PatchError) as exc:
            return f"the refreshed patch does not apply strictly: {exc}"
    for path, final in plan.finals.items():
        if final.content != _blob(repo, new, path):
            return f"the refreshed patch does not give the merged {path}"
        original = plan.originals[path].content
        if final.content is not None and path.endswith(".py") and _compiles(original or b"", path) is None:
            problem = _compiles(final.content, path)
            if problem:
                return f"merged {path} does not compile: {problem}"
    return ""


def _compiles(source: bytes, path: str) -> str | None:
    """None if `source` compiles, else why not: our build check for merged Python."""
    try:
        compile(source, path, "exec", dont_inherit=True)
    except (SyntaxError, ValueError) as exc:
        return str(exc)
    return None


def _conflicts(repo: Path) -> Iterator[Conflict]:
    """Every conflict region of the merge in progress, from git's unmerged paths and diff3 markers."""
    unmerged = g.out(repo, "status", "--porcelain=v1", "--untracked-files=no").splitlines()
    found = False
    for line in unmerged:
        code, path = line[:2], line[3:]
        if code not in ("DD", "AU", "UD", "UA", "DU", "AA", "UU"):
            continue
        found = True
        if code != "UU":
            sides = {"UD": "deleted", "DU": "changed by the patch", "DD": "deleted", "AA": "added", "AU": "added"}
            upstream = {"DU": "(the file is not in the new release)", "UD": "(changed)"}.get(code, "(added)")
            yield Conflict(path, 0, 0, upstream, f"({sides.get(code, code)})")
            continue
        yield from _regions(path, (repo / path).read_bytes().decode("utf-8", "replace"))
    if not found:
        yield Conflict("(merge)", 0, 0, "", "the 3-way merge failed without conflict markers")


def _regions(path: str, text: str) -> Iterator[Conflict]:
    """diff3 regions; line numbers count the release's side (what the file is without the patch)."""
    line_no = 0
    section: str | None = None
    sides: dict[str, list[str]] = {}
    for line in text.splitlines():
        if line.startswith("<<<<<<< "):
            section, sides = "upstream", {"upstream": [], "base": [], "patch": []}
        elif section and line.startswith("||||||| "):
            section = "base"
        elif section and line == "=======":
            section = "patch"
        elif section and line.startswith(">>>>>>> "):
            start = line_no + 1
            line_no += len(sides["upstream"])
            yield Conflict(
                path,
                start,
                line_no,
                _short(sides["upstream"]),
                _short(sides["patch"]),
                _short(sides["base"]),
            )
            section = None
        elif section:
            sides[section].append(line)
        else:
            line_no += 1


def _short(lines: list[str]) -> str:
    if len(lines) <= _SIDE_LINES:
        return "\n".join(lines)
    return "\n".join(lines[:_SIDE_LINES] + [f"... ({len(lines) - _SIDE_LINES} more lines)"])


def _preview(replayer: _Replayer, state: _State) -> list[PatchReport]:
    """Try every patch of every stack; leave each stack's branch at the patches that went through."""
    repo = replayer.repo
    report: list[PatchReport] = []
    blocked: dict[str, str] = {}  # file -> "<series>/<patch>" whose conflict leaves it unsettled
    common_blocked: dict[str, str] = {}
    for index, stack in enumerate(state.stacks):
        parent = state.new_base if index == 0 else state.stacks[0].branch
        g.git(repo, "checkout", "-q", "-B", stack.branch, parent)
        stack.head = g.out(repo, "rev-parse", "HEAD").strip()
        blocked = dict(common_blocked)
        for name, commit in stack.patches:
            files = _files(repo, commit)
            depends = next((blocked[f] for f in files if f in blocked), None)
            head = replayer._head()
            outcome = replayer.replay(commit)
            if depends is not None:
                replayer._reset(head)
                for f in files:
                    blocked.setdefault(f, f"{stack.label}/{name}")
                tried = _outcome_text(outcome)
                report.append(
                    PatchReport(
                        stack.label,
                        name,
                        "dependent-on-conflict",
                        f"stacked on {depends}; without it: {tried}",
                        outcome.strategy,
                        outcome.conflicts,
                        depends_on=depends,
                    )
                )
                continue
            if outcome.status == "conflict":
                for f in files:
                    blocked[f] = f"{stack.label}/{name}"
            if outcome.status == "already-upstream":
                stack.upstreamed.append(name)
            report.append(
                PatchReport(
                    stack.label,
                    name,
                    outcome.status,
                    outcome.detail,
                    outcome.strategy,
                    outcome.conflicts,
                    absorbed_by=replayer.release if outcome.status == "already-upstream" else None,
                )
            )
        stack.next = len(stack.patches)
        if index == 0:
            common_blocked = dict(blocked)
    return report


def _outcome_text(outcome: _Outcome) -> str:
    if outcome.status == "merged":
        return f"merged ({outcome.strategy})"
    if outcome.status == "conflict":
        return "conflict at " + "; ".join(c.where for c in outcome.conflicts)
    return outcome.status


def _files(repo: Path, commit: str) -> list[str]:
    return g.out(repo, "diff", "--name-only", "--no-renames", f"{commit}~1", commit).split()


def _stop_at_first_conflict(replayer: _Replayer, state: _State, report: list[PatchReport]) -> None:
    """Turn the preview into the workspace: stacks without trouble stay done; the first one with a
    conflict restarts and stops at it, in progress; the ones after it start again when reached.
    Device stacks restart too when the common series had a conflict (they sit on top of it)."""
    repo = replayer.repo
    bad = {r.series for r in report if r.status in ("conflict", "dependent-on-conflict")}
    stopped = False
    for index, stack in enumerate(state.stacks):
        if stack.label not in bad and not (index and "common" in bad):
            stack.done = True
            continue
        stack.upstreamed, stack.next = [], 0
        if stopped:
            stack.head = None
            g.git(repo, "branch", "-q", "-D", stack.branch, check=False)
            continue
        parent = state.new_base if index == 0 else state.stacks[0].branch
        g.git(repo, "checkout", "-q", "-B", stack.branch, parent)
        stack.head = g.out(repo, "rev-parse", "HEAD").strip()
        _resume(replayer, state, stack)
        stopped = True


def _resume(replayer: _Replayer, state: _State, stack: _Stack) -> bool:
    """Replay the stack's remaining patches; False when one conflicts (left in progress, diff3 markers)."""
    while stack.next < len(stack.patches):
        name, commit = stack.patches[stack.next]
        head = replayer._head()
        outcome = replayer.replay(commit)
        if outcome.status == "conflict":
            replayer._cherry_pick(commit, "myers")  # in progress, as the report shows it
            stack.stopped, stack.stop_head = stack.next, head
            state.report = _replace_report(state.report, stack.label, name, outcome, replayer.release)
            log.info("stopped at %s/%s (HEAD %s)", stack.label, name, head[:12])
            return False
        if outcome.status == "already-upstream":
            stack.upstreamed.append(name)
        state.report = _replace_report(state.report, stack.label, name, outcome, replayer.release)
        stack.next += 1
    return True


def _replace_report(rows: list[dict], label: str, name: str, outcome: _Outcome, release: str) -> list[dict]:
    row = asdict(
        PatchReport(
            label,
            name,
            outcome.status,
            outcome.detail,
            outcome.strategy,
            outcome.conflicts,
            absorbed_by=release if outcome.status == "already-upstream" else None,
        )
    )
    out = [r for r in rows if not (r["series"] == label and r["name"] == name)]
    at = next((i for i, r in enumerate(rows) if r["series"] == label and r["name"] == name), len(rows))
    out.insert(min(at, len(out)), row)
    return out


def _settle_resolution(repo: Path, state: _State) -> None:
    """The patch in progress: committed by the user, or resolved and staged (commit it), or still open."""
    stack = next((s for s in state.stacks if s.stopped is not None), None)
    if stack is None or stack.stopped is None:
        return
    name, commit = stack.patches[stack.stopped]
    if g.out(repo, "diff", "--name-only", "--diff-filter=U").strip():
        raise ConfigError(
            f"{repo}: {stack.label}/{name} still has unmerged files; resolve them, `git add` them, "
            "and run `flagscale patch rebase --continue` again"
        )
    changed = g.out(repo, "diff", "--name-only", "HEAD").split()
    marked = [p for p in changed if (repo / p).is_file() and b"\n<<<<<<< " in b"\n" + (repo / p).read_bytes()]
    if marked:
        raise ConfigError(f"{repo}: {', '.join(marked)} still has conflict markers; finish resolving {name}")
    if changed:
        _commit_like(repo, commit)  # resolved and staged: commit it as the patch
    g.git(repo, "cherry-pick", "--quit", check=False)
    dropped = g.out(repo, "rev-parse", "HEAD").strip() == stack.stop_head
    row: dict[str, object] = {
        "status": "merged",
        "strategy": "resolved by hand",
        "detail": "resolved to no change: dropped from the series" if dropped else "resolved in the workspace",
        "conflicts": [],
    }
    state.report = [{**r, **row} if (r["series"], r["name"]) == (stack.label, name) else r for r in state.report]
    stack.next, stack.stopped, stack.stop_head = stack.stopped + 1, None, None


# -------------------------------------------------------------------------------------- finishing
def _finish(project: Project, repo: Path, state: _State, result: RebaseResult, write: bool) -> RebaseResult:
    """Render every stack's commits as the refreshed series; write them and the pin when asked."""
    outputs: list[tuple[str, str, bytes]] = []
    per_stack = []
    for index, stack in enumerate(state.stacks):
        parent = state.new_base if index == 0 else state.stacks[0].branch
        commits = g.out(repo, "rev-list", "--reverse", f"{parent}..{stack.branch}").split()
        folders = {
            stack.label: project.device_series_dir(stack.device, state.backend)
            if stack.device
            else project.common_series_dir(state.backend)
        }
        rendered = _render_commits(repo, commits, folders, stack.device)
        outputs += rendered
        per_stack.append((folders, rendered))
    result = _with(result, patches=tuple(outputs))
    if not write:
        return result
    for folders, rendered in per_stack:
        _write_series(folders, rendered)
    write_pin(project, result.new_pin)
    return _with(result, written=True)


def _with(result: RebaseResult, **changes) -> RebaseResult:
    from dataclasses import replace

    return replace(result, **changes)


def _workspace_result(state: _State, old_pin: Pin, new_pin: Pin, replayer: _Replayer, workspace: Path) -> RebaseResult:
    report = tuple(
        PatchReport(**{**r, "conflicts": tuple(Conflict(**c) for c in r["conflicts"])}) for r in state.report
    )
    stopped = next((s for s in state.stacks if s.stopped is not None), None)
    return RebaseResult(
        state.backend,
        old_pin,
        new_pin,
        report,
        (),
        state.drop_upstreamed,
        replayer.wiggle is not None,
        workspace,
        in_progress=f"{stopped.label}/{stopped.patches[stopped.stopped][0]}"
        if stopped and stopped.stopped is not None
        else None,
    )


def _write_checkout_state(repo: Path, state: _State, pin: Pin) -> None:
    """So `patch export` works on the workspace's common series too."""
    checkout = {
        "backend": state.backend,
        "device": None,
        "base": state.new_base,
        "source": None,
        "pin": {"version": pin.sdist.version, "sha256": pin.sdist.sha256, "commit": pin.commit},
        "project": state.project,
    }
    (repo / ".git" / CHECKOUT_STATE_FILE).write_text(json.dumps(checkout, indent=2) + "\n")


__all__ = [
    "STATUSES",
    "Conflict",
    "PatchReport",
    "RebaseResult",
    "abort_rebase",
    "continue_rebase",
    "rebase",
]
