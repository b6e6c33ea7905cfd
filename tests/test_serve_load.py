"""A bounded load test of `flagscale serve` (direct mode) on loopback: 16 clients for 30 s ($FLAGSCALE_LOAD_SECONDS),
zero errors, p50/p99 reported."""

from __future__ import annotations

import importlib.util
import os

import pytest
from llama_cpp_support import REPO_ROOT, backend_env, flagscale, free_port, installed_backend, tiny_gguf, work_root

pytestmark = pytest.mark.integration
CONF = REPO_ROOT / "examples" / "tiny_llama" / "conf"


def _bench():
    spec = importlib.util.spec_from_file_location("bench_serve", REPO_ROOT / "benchmarks" / "bench_serve.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_sixteen_clients_without_errors(tmp_path):
    root = work_root()
    env = {**backend_env(installed_backend(root)), "TINY_LLAMA_GGUF": str(tiny_gguf(root))}
    port = free_port()
    args = [f"experiment.exp_dir={tmp_path}", f"experiment.runner.port={port}"]
    result = flagscale("serve", str(CONF), *args, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    try:
        seconds = float(os.environ.get("FLAGSCALE_LOAD_SECONDS", "30"))
        report = _bench().load(f"http://127.0.0.1:{port}", concurrency=16, duration=seconds, max_tokens=16)
        print(f"\nload: {report}")
    finally:
        flagscale("serve", str(CONF), *args, "action=stop", env=env, cwd=tmp_path)
    assert report["errors"] == 0, report["first_errors"]
    assert report["requests"] >= 16 and report["p99_ms"] >= report["p50_ms"] > 0
