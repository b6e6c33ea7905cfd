#!/usr/bin/env python3
"""Wall time of `pip wheel . -C device=cpu -C backend=megatron`, cold (empty FlagScale cache) and warm
(no change since the last build), beside a plain `pip wheel` of the upstream megatron-core sdist, in
one run with the runs interleaved; plus `flagscale --help` start-up.

    .venv/bin/python benchmarks/bench_build.py [--runs 3]

Targets (issue #3): warm no-change rebuild <= 1.1x the plain upstream build; `flagscale --help` <= 0.3 s.

    .venv/bin/python benchmarks/bench_build.py --part llama.cpp

The cpu llama.cpp backend wheel (as `flagscale install|build --backend llama.cpp` builds it) built cold
(an empty FlagScale cache, so an empty compiler cache too; the sdist is seeded, not timed), then rebuilt in
the same run after a one-line code change to a llama.cpp patch (on a scratch copy of the checkout): with
ccache the rebuild compiles only what the patch touches. Target (issue #16): rebuild <= 0.25x the cold build.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from flagscale.upstream.cache import Cache  # noqa: E402
from flagscale.upstream.project import Project  # noqa: E402
from flagscale.upstream.sources import fetch_sdist  # noqa: E402


def timed(cmd: list[str], env: dict[str, str], cwd: Path = ROOT) -> float:
    start = time.perf_counter()
    result = subprocess.run(cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    elapsed = time.perf_counter() - start
    if result.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{result.stderr[-3000:]}")
    return elapsed


# The one-line change: 0002's handler reports the parse error with a prefix (server.cpp, a real code change).
LLAMA_PATCH = "0002-server-answer-400-not-500-to-a-request-body-that-is.patch"
LLAMA_OLD_LINE = b"+            message = e.what();\n"
LLAMA_NEW_LINE = b'+            message = std::string("invalid request body: ") + e.what();\n'


def llama_cpp_rebuild() -> None:
    """Cold build, then a rebuild after a one-line patch change, with the same FlagScale (and ccache) cache."""
    from flagscale.upstream.bump import stage_project
    from flagscale.wheels.compiler_cache import DISABLE_ENV

    if shutil.which("ccache") is None:
        sys.exit("ccache is not installed (apt-get install ccache): this benchmark measures the rebuild through it")
    work = Path(tempfile.mkdtemp(prefix="flagscale-bench-llama-"))
    copy = stage_project(Project(ROOT), work / "checkout")
    pin = copy.pins.resolve("llama.cpp")
    sdist = fetch_sdist(pin, Cache())  # downloaded once (not timed)
    cache = work / "cache"
    (cache / "sdists" / pin.sdist.sha256).mkdir(parents=True)
    shutil.copy2(sdist, cache / "sdists" / pin.sdist.sha256 / sdist.name)
    env = {**os.environ, "FLAGSCALE_CACHE_DIR": str(cache), "OMP_NUM_THREADS": "1"}
    env.pop(DISABLE_ENV, None)
    # What `flagscale install|build` and `pip install . -C backend=llama.cpp` run for the backend wheel.
    code = (
        "import shutil, sys\n"
        "from pathlib import Path\n"
        "from flagscale.upstream.project import Project\n"
        "from flagscale.upstream.target import Target\n"
        "from flagscale.wheels.install import build_in_isolation\n"
        "wheel = build_in_isolation(Target.of(Project(Path(sys.argv[1])), 'llama.cpp', 'cpu', 'sdist'))\n"
        "Path(sys.argv[2]).mkdir()\n"
        "shutil.copy2(wheel.path, sys.argv[2])\n"
    )
    cmd = [sys.executable, "-c", code, str(copy.root)]
    cold = timed([*cmd, str(work / "cold")], env)
    print(f"cold build: {cold:.1f} s", flush=True)
    patch = copy.common_series_dir("llama.cpp") / LLAMA_PATCH
    data = patch.read_bytes()
    assert data.count(LLAMA_OLD_LINE) == 1, f"{LLAMA_PATCH} changed: pick another line"
    patch.write_bytes(data.replace(LLAMA_OLD_LINE, LLAMA_NEW_LINE))
    rebuild = timed([*cmd, str(work / "rebuild")], env)
    print(f"rebuild after a one-line change to {LLAMA_PATCH}: {rebuild:.1f} s", flush=True)
    (stats_dir,) = (cache / "ccache").iterdir()
    stats = subprocess.run(
        ["ccache", "--print-stats"], env={**env, "CCACHE_DIR": str(stats_dir)}, capture_output=True, text=True
    ).stdout
    counts = {k: int(v) for k, v in (line.split("\t") for line in stats.splitlines()) if v.isdigit()}
    hits = counts.get("direct_cache_hit", 0) + counts.get("preprocessed_cache_hit", 0)
    wheels = sorted(p.name for p in (work / "rebuild").glob("llama_cpp_python-*.whl"))
    assert wheels and wheels != sorted(p.name for p in (work / "cold").glob("llama_cpp_python-*.whl"))
    ratio = rebuild / cold
    print("\n| llama.cpp cpu wheel | seconds | ratio to cold | target |\n|---|---|---|---|")
    print(f"| cold build (empty FlagScale and compiler cache) | {cold:.1f} | 1.00x | |")
    verdict = "PASS" if ratio <= 0.25 else "FAIL (target <= 0.25x)"
    print(f"| rebuild after a one-line change to {LLAMA_PATCH} | {rebuild:.1f} | {ratio:.2f}x | {verdict} |")
    print(f"\nccache ({stats_dir.name}): {hits} hits, {counts.get('cache_miss', 0)} misses over both builds")
    print(f"{os.cpu_count()} cores; Python {platform.python_version()}")
    results = ROOT / "benchmarks" / "results"
    results.mkdir(exist_ok=True)
    raw = {"cold_s": cold, "rebuild_s": rebuild, "ratio": ratio, "ccache": counts, "wheels": wheels}
    (results / "build-llama-cpp.raw.json").write_text(json.dumps(raw, indent=2))
    shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--part", choices=["megatron", "llama.cpp"], default="megatron")
    args = parser.parse_args()
    if args.part == "llama.cpp":
        llama_cpp_rebuild()
        return
    project = Project(ROOT)
    pin = project.pins.resolve("megatron")
    work = Path(tempfile.mkdtemp(prefix="flagscale-bench-build-"))
    sdist = fetch_sdist(pin, Cache())  # the plain build's input, downloaded once (not timed)
    pip = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-c", str(ROOT / "constraints.txt")]
    base_env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    seeded = work / "seed-cache"
    Cache(seeded)  # cold runs start from a cache holding only the downloaded sdist: no network in the timing
    (seeded / "sdists" / pin.sdist.sha256).mkdir(parents=True)
    shutil.copy2(sdist, seeded / "sdists" / pin.sdist.sha256 / sdist.name)
    warm_cache = work / "warm-cache"
    shutil.copytree(seeded, warm_cache)
    ours = [*pip, ".", "-C", "device=cpu", "-C", "backend=megatron"]
    timed([*ours, "-w", str(work / "w0")], {**base_env, "FLAGSCALE_CACHE_DIR": str(warm_cache)})  # fill warm cache
    times: dict[str, list[float]] = {"plain upstream sdist": [], "flagscale cold": [], "flagscale warm": []}
    for run in range(args.runs):
        cold_cache = work / f"cold-{run}"
        shutil.copytree(seeded, cold_cache)
        order = [
            ("plain upstream sdist", [*pip, str(sdist), "-w", str(work / f"p{run}")], base_env),
            (
                "flagscale cold",
                [*ours, "-w", str(work / f"c{run}")],
                {**base_env, "FLAGSCALE_CACHE_DIR": str(cold_cache)},
            ),
            (
                "flagscale warm",
                [*ours, "-w", str(work / f"h{run}")],
                {**base_env, "FLAGSCALE_CACHE_DIR": str(warm_cache)},
            ),
        ]
        for name, cmd, env in order if run % 2 == 0 else order[::-1]:
            times[name].append(timed(cmd, env))
            print(f"run {run + 1}: {name}: {times[name][-1]:.1f} s", flush=True)
    helps = [timed([str(Path(sys.executable).parent / "flagscale"), "--help"], base_env) for _ in range(7)]
    med = {k: statistics.median(v) for k, v in times.items()}
    plain = med["plain upstream sdist"]
    rows = [
        ("plain `pip wheel megatron_core-0.16.1.tar.gz`", med["plain upstream sdist"], 1.0, ""),
        (
            "`pip wheel . -C device=cpu -C backend=megatron`, cold cache",
            med["flagscale cold"],
            med["flagscale cold"] / plain,
            "",
        ),
        (
            "same, warm (no change)",
            med["flagscale warm"],
            med["flagscale warm"] / plain,
            "PASS" if med["flagscale warm"] <= 1.1 * plain else "FAIL (target <= 1.1x)",
        ),
        (
            "`flagscale --help`",
            statistics.median(helps),
            None,
            "PASS" if statistics.median(helps) <= 0.3 else "FAIL (target <= 0.3 s)",
        ),
    ]
    print("\n| build | median (s) | ratio to plain | target |\n|---|---|---|---|")
    for name, value, ratio, verdict in rows:
        print(f"| {name} | {value:.2f} | {'' if ratio is None else f'{ratio:.2f}x'} | {verdict} |")
    print(f"\n{args.runs} interleaved runs; {os.cpu_count()} cores; Python {platform.python_version()}")
    results = ROOT / "benchmarks" / "results"
    results.mkdir(exist_ok=True)
    (results / "build.raw.json").write_text(json.dumps({"times": times, "help": helps}, indent=2))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
