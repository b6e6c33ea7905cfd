#!/usr/bin/env python3
"""Throughput and latency of `flagscale serve` (direct and Ray mode) vs plain llama-server, same model, same run.

    benchmarks/bench_serve.py --model tiny.gguf [--concurrency 16,1] [--duration 30] [--max-tokens 32]

Each mode serves the same GGUF with the same llama-server settings (threads, ctx, parallel slots) on
loopback; N closed-loop clients (keep-alive HTTP/1.1) post /v1/completions for D seconds, for each N of
--concurrency in turn against the same server. Reported per mode and N: requests, errors, completion
tokens/s, p50/p99 latency, the ratios to plain llama-server and to direct mode, and Ray mode's added p50.
The load generator (`load`) is also what tests/test_serve_load.py runs.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CONF = REPO / "examples" / "tiny_llama" / "conf"
sys.path.insert(0, str(REPO))


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def load(
    url: str,
    concurrency: int = 16,
    duration: float = 30.0,
    max_tokens: int = 32,
    model: str = "tiny",
    prompt: str = "Once upon a time",
) -> dict:
    """Closed-loop load: `concurrency` clients, each posting its next request when the last one answered."""
    host, port = url.split("//", 1)[1].split(":")
    body = json.dumps({"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}).encode()
    latencies: list[float] = []
    tokens = [0]
    errors: list[str] = []
    lock = threading.Lock()
    deadline = time.monotonic() + duration

    def client() -> None:
        conn = http.client.HTTPConnection(host, int(port), timeout=60)
        while time.monotonic() < deadline:
            start = time.perf_counter()
            try:
                conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
                response = conn.getresponse()
                data = response.read()
                elapsed = time.perf_counter() - start
                if response.status != 200:
                    raise RuntimeError(f"HTTP {response.status}: {data[:200]!r}")
                used = json.loads(data)["usage"]["completion_tokens"]
            except Exception as exc:  # counted, not raised: the report says how many and which
                with lock:
                    errors.append(f"{type(exc).__name__}: {exc}")
                conn.close()
                conn = http.client.HTTPConnection(host, int(port), timeout=60)
                continue
            with lock:
                latencies.append(elapsed)
                tokens[0] += used
        conn.close()

    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    began = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.monotonic() - began
    return {
        "requests": len(latencies),
        "errors": len(errors),
        "first_errors": errors[:3],
        "seconds": round(wall, 2),
        "tokens_per_s": round(tokens[0] / wall, 1),
        "requests_per_s": round(len(latencies) / wall, 1),
        "p50_ms": round(percentile(latencies, 0.50) * 1000, 2),
        "p99_ms": round(percentile(latencies, 0.99) * 1000, 2),
        "mean_ms": round(statistics.fmean(latencies) * 1000, 2) if latencies else None,
    }


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait(url: str, timeout: float = 120) -> None:
    from flagscale.serve.health import probe

    deadline = time.monotonic() + timeout
    while probe(url + "/health") != 200:
        if time.monotonic() > deadline:
            raise SystemExit(f"{url} did not become healthy")
        time.sleep(0.2)


def _flagscale(*args: str, env: dict) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "flagscale.cli", "serve", str(CONF), *args], env=env, capture_output=True, text=True
    )
    if result.returncode != 0:
        raise SystemExit(f"flagscale serve {' '.join(args)} failed:\n{result.stderr}")


def run_mode(mode: str, args, env: dict, work: Path, round_: int = 0) -> list[dict]:
    from flagscale.serve.binaries import llama_tool

    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    engine = {"ctx_size": args.ctx_size, "threads": args.threads, "parallel": args.parallel}
    overrides = [f"experiment.exp_dir={work / mode}", f"experiment.runner.port={port}"] + [
        f"serve.0.engine_args.{k}={v}" for k, v in engine.items()
    ]
    proc = None
    if mode == "llama-server":
        cmd = [
            str(llama_tool("llama-server")),
            "--model",
            str(args.model),
            "--alias",
            "tiny",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--ctx-size",
            str(args.ctx_size),
            "--threads",
            str(args.threads),
            "--parallel",
            str(args.parallel),
        ]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        _wait(url)
    elif mode == "direct":
        _flagscale(*overrides, env=env)
    elif mode == "ray":
        _flagscale(
            "serve=tiny_ray",
            *overrides,
            f"+experiment.runner.ray_port={_free_port()}",
            f"serve.0.replicas={args.ray_replicas}",
            f"serve.0.autoscaling.min_replicas={args.ray_replicas}",
            f"serve.0.autoscaling.max_replicas={args.ray_replicas}",
            env=env,
        )
    try:
        rows = []
        for clients in args.concurrency:
            load(url, clients, min(3.0, args.duration), args.max_tokens)  # warm-up, not reported
            report = load(url, clients, args.duration, args.max_tokens)
            rows.append({"mode": mode, "clients": clients, "round": round_, **report})
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
        return rows
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(30)
        else:
            _flagscale(*overrides, *(["serve=tiny_ray"] if mode == "ray" else []), "action=stop", env=env)


def summarize(results: list[dict]) -> list[dict]:
    """One row per mode and client count: requests and errors summed over the rounds, the rest their medians."""
    out = []
    for mode, clients in dict.fromkeys((r["mode"], r["clients"]) for r in results):
        rows = [r for r in results if r["mode"] == mode and r["clients"] == clients]
        med = {
            k: round(statistics.median(r[k] for r in rows), 2)
            for k in ("tokens_per_s", "requests_per_s", "p50_ms", "p99_ms")
        }
        out.append(
            {
                "mode": mode,
                "clients": clients,
                "requests": sum(r["requests"] for r in rows),
                "errors": sum(r["errors"] for r in rows),
                **med,
            }
        )
    return out


def _row(results: list[dict], mode: str, clients: int) -> dict | None:
    return next((r for r in results if r["mode"] == mode and r["clients"] == clients), None)


def _ratio(results: list[dict], row: dict, to: str) -> str:
    base = _row(results, to, row["clients"])
    return f"{row['tokens_per_s'] / base['tokens_per_s']:.3f}x" if base and base["tokens_per_s"] else "-"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="GGUF file (tools/convert_to_gguf.py)")
    parser.add_argument(
        "--concurrency", type=lambda v: [int(n) for n in v.split(",")], default=[16], help="clients, e.g. 16,1"
    )
    parser.add_argument("--duration", type=float, default=30.0)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--parallel", type=int, default=4, help="llama-server slots")
    parser.add_argument("--ctx-size", type=int, default=2048)
    parser.add_argument("--ray-replicas", type=int, default=1)
    parser.add_argument("--modes", default="llama-server,direct,ray")
    parser.add_argument("--rounds", type=int, default=1, help="run the modes in turn this many times; medians")
    parser.add_argument("--out", type=Path, help="also write the results as JSON here")
    args = parser.parse_args(argv)
    args.model = args.model.resolve()
    env = {**os.environ, "TINY_LLAMA_GGUF": str(args.model)}
    results: list[dict] = []
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        for round_ in range(args.rounds):  # in turn: a neighbour's burst of load hits every mode alike
            for mode in args.modes.split(","):
                results += run_mode(mode, args, env, Path(tmp) / str(round_), round_)
    summary = summarize(results)
    print(
        f"\n{'/'.join(map(str, args.concurrency))} clients x {args.duration:.0f} s x {args.rounds} round(s) "
        f"(medians), max_tokens={args.max_tokens}, "
        f"threads={args.threads}, parallel={args.parallel}, ray replicas={args.ray_replicas}, "
        f"model={args.model.name}; load average {load_before:.2f} before, {os.getloadavg()[0]:.2f} after\n"
    )
    print("| mode | clients | requests | errors | tokens/s | req/s | p50 ms | p99 ms | vs llama-server | vs direct |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in summary:
        print(
            f"| {r['mode']} | {r['clients']} | {r['requests']} | {r['errors']} | {r['tokens_per_s']} | "
            f"{r['requests_per_s']} | {r['p50_ms']} | {r['p99_ms']} | {_ratio(summary, r, 'llama-server')} | "
            f"{_ratio(summary, r, 'direct')} |"
        )
    for clients in args.concurrency:
        ray, direct = (_row(summary, m, clients) for m in ("ray", "direct"))
        if ray and direct:
            rounds = [
                (r["tokens_per_s"] / d["tokens_per_s"], r["p50_ms"] - d["p50_ms"])
                for r, d in zip(
                    *([x for x in results if x["mode"] == m and x["clients"] == clients] for m in ("ray", "direct")),
                    strict=True,
                )
            ]
            print(
                f"\n{clients} clients: Ray mode / direct tokens/s {ray['tokens_per_s'] / direct['tokens_per_s']:.3f}x, "
                f"added p50 {ray['p50_ms'] - direct['p50_ms']:+.2f} ms (per round: "
                + ", ".join(f"{t:.3f}x {d:+.2f} ms" for t, d in rounds)
                + ")"
            )
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    return 1 if any(r["errors"] for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
