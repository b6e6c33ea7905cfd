#!/usr/bin/env python3
"""Wall time of `pip wheel . -C device=cpu -C backend=megatron`, cold (empty FlagScale cache) and warm
(no change since the last build), beside a plain `pip wheel` of the upstream megatron-core sdist, in
one run with the runs interleaved; plus `flagscale --help` start-up.

    .venv/bin/python benchmarks/bench_build.py [--runs 3]

Targets (issue #3): warm no-change rebuild <= 1.1x the plain upstream build; `flagscale --help` <= 0.3 s.
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
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
