#!/usr/bin/env python3
"""The rebase on real release pairs: how many of FlagScale's patches go through with no human touch.

For each (backend, release) pair, FlagScale's series (common + every device) is rebased from its pin onto
the release with `flagscale.patches.rebase.rebase(write=False, drop_upstreamed=True)` (nothing written), and,
with `--before COMMIT`, with the rebase of that older commit (run from a `git archive` of it, on a scratch
copy of the pins and patches, since it wrote on success). Prints one markdown table; `--json PATH` keeps
every patch's result.

    .venv/bin/python benchmarks/bench_rebase.py --before 254530c [megatron=0.17.0 llama.cpp=0.3.35 ...]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PAIRS = (
    "megatron=0.17.0",
    "megatron=0.18.0",
    "megatron=0.15.3",
    "megatron=0.16.0",
    "llama.cpp=0.3.35",
    "llama.cpp=0.3.30",
)
COLUMNS = ("clean", "merged", "already-upstream", "conflict", "dependent-on-conflict", "skipped")

# Runs inside the old checkout: print each patch's status as JSON.
_BEFORE = """
import json, sys
from pathlib import Path
from flagscale.errors import RebaseConflict
from flagscale.patches.workflow import rebase
from flagscale.upstream.cache import Cache
from flagscale.upstream.project import Project
backend, version, project, cache = sys.argv[1:5]
try:
    report = rebase(Project(Path(project)), backend, version, old_source="sdist", cache=Cache(Path(cache)))
except RebaseConflict as exc:
    report = exc.report
print(json.dumps([[r.series, r.name, r.status, r.detail] for r in report]))
"""


def copy_project(dest: Path) -> Path:
    for part in ("third_party/upstreams.toml", "patches", "hardware"):
        src = ROOT / part
        if src.is_dir():
            shutil.copytree(src, dest / part)
        else:
            (dest / part).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / part)
    return dest


def before(commit: str, backend: str, version: str, cache: Path) -> list[dict]:
    with tempfile.TemporaryDirectory(prefix="bench-rebase-before-") as tmp:
        code = Path(tmp) / "code"
        code.mkdir()
        git = ["git", "-C", str(ROOT), "archive", commit, "flagscale"]
        archive = subprocess.run(git, check=True, capture_output=True)
        subprocess.run(["tar", "-x", "-C", str(code)], input=archive.stdout, check=True)
        project = copy_project(Path(tmp) / "project")
        out = subprocess.run(
            [sys.executable, "-c", _BEFORE, backend, version, str(project), str(cache)],
            cwd=code,
            env={"PYTHONPATH": str(code), "PATH": "/usr/bin:/bin", "HOME": str(Path.home())},
            check=True,
            capture_output=True,
            text=True,
        )
    return [dict(zip(("series", "name", "status", "detail"), row, strict=True)) for row in json.loads(out.stdout)]


def after(backend: str, version: str, cache: Path) -> list[dict]:
    from flagscale.patches.rebase import rebase
    from flagscale.upstream.cache import Cache
    from flagscale.upstream.project import Project

    result = rebase(
        Project(ROOT), backend, version, old_source="sdist", cache=Cache(cache), write=False, drop_upstreamed=True
    )
    return [
        {"series": r.series, "name": r.name, "status": r.status, "result": r.result, "detail": r.detail}
        for r in result.report
    ]


def counts(rows: list[dict]) -> dict[str, int]:
    c = Counter("clean" if r["status"] == "offset" else r["status"] for r in rows)
    return {k: c.get(k, 0) for k in COLUMNS}


def line(label: str, rows: list[dict], seconds: float) -> str:
    c = counts(rows)
    auto = c["clean"] + c["merged"] + c["already-upstream"]
    share = f"{auto}/{len(rows)} ({100 * auto / max(len(rows), 1):.0f}%)"
    strategies = Counter(r.get("result", "") for r in rows if r["status"] == "merged")
    how = ", ".join(f"{n} {s.removeprefix('merged (').removesuffix(')')}" for s, n in sorted(strategies.items()) if s)
    cells = [str(c[k]) + (f" ({how})" if k == "merged" and how else "") for k in COLUMNS]
    return f"| {label} | " + " | ".join(cells) + f" | {share} | {seconds:.0f} s |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("pairs", nargs="*", default=PAIRS, help="BACKEND=VERSION (default: six pairs)")
    parser.add_argument("--before", metavar="COMMIT", help="also run the rebase of this older commit")
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache/flagscale-tests")
    parser.add_argument("--json", type=Path, help="write every patch's result here")
    args = parser.parse_args()
    from flagscale.upstream.project import Project

    pins = Project(ROOT).pins
    header = "| pair | code | " + " | ".join(COLUMNS) + " | no human touch | time |"
    table = [header, "|" + "---|" * (len(COLUMNS) + 4)]
    raw: dict[str, dict] = {}
    for pair in args.pairs:
        backend, version = pair.split("=", 1)
        pin = pins.resolve(backend)
        label = f"{pin.sdist.name} {pin.sdist.version} → {version}"
        runs = ([("before", lambda b, v, c: before(args.before, b, v, c))] if args.before else []) + [("after", after)]
        for name, run in runs:
            start = time.perf_counter()
            rows = run(backend, version, args.cache)
            seconds = time.perf_counter() - start
            raw.setdefault(pair, {})[name] = rows
            table.append(line(f"{label} | {name}", rows, seconds))
            print(table[-1], file=sys.stderr, flush=True)
    print("\n".join(table))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(raw, indent=1) + "\n")


if __name__ == "__main__":
    main()
