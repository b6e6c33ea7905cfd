"""The serving tuner (`flagscale serve CONF action=auto_tune`) on the tiny GGUF with the real llama-server:
candidates checked against llama-server's own flags and against the load, each served and loaded for real, the
config's own engine arguments measured in the same run as the baseline, the best written as a runnable config."""

from __future__ import annotations

import json

import pytest
from llama_cpp_support import REPO_ROOT, backend_env, flagscale, installed_backend, tiny_gguf, work_root

pytestmark = pytest.mark.integration
CONF = REPO_ROOT / "examples" / "tiny_llama" / "conf"
LOAD = "load: {concurrency: 4, prompt_tokens: 8, output_tokens: 8, requests: 16}"


@pytest.fixture(scope="module")
def env():
    root = work_root()
    return {**backend_env(installed_backend(root)), "TINY_LLAMA_GGUF": str(tiny_gguf(root))}


def test_the_tuner_measures_the_baseline_and_its_candidates_and_writes_the_best(env, tmp_path):
    tuner = f"+experiment.auto_tuner={{space: {{parallel: [1, 2, 8], ctx_size: [64, 512]}}, {LOAD}, slo_p99_ms: 20000}}"
    result = flagscale(
        "serve",
        str(CONF),
        f"experiment.exp_dir={tmp_path}",
        "action=auto_tune",
        tuner,
        env=env,
        cwd=tmp_path,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    history = json.loads((tmp_path / "auto_tune" / "history.json").read_text())
    rows = {r["key"]: r for r in history["candidates"]}
    assert rows["baseline"]["status"] == "ok" and rows["baseline"]["settings"]["parallel"] == 4
    # 8 slots of a 64-token context hold 8 tokens each, less than a request's 8 + 8: refused before any start
    (invalid,) = [r for r in rows.values() if r["status"] == "invalid"]
    assert invalid["settings"] == {"ctx_size": 64, "parallel": 8, "threads": 1, "replicas": 1}
    ran = [r for r in rows.values() if r["status"] == "ok"]
    assert len(ran) == 6 and all(r["errors"] == 0 and r["requests"] == 16 and r["metric"] > 0 for r in ran)
    best = max(ran, key=lambda r: r["metric"])
    assert history["best"] == best["key"] and best["metric"] >= rows["baseline"]["metric"]
    text = (tmp_path / "auto_tune" / "best.yaml").read_text()
    assert "auto_tuner" not in text and f"parallel: {best['settings']['parallel']}" in text
    assert "trial 6 of 6" in result.stdout
    # the best config runs as it is
    port = ["experiment.runner.port=18431", f"experiment.exp_dir={tmp_path / 'best'}"]
    dry = flagscale("serve", str(tmp_path / "auto_tune" / "best.yaml"), *port, "action=dryrun", env=env, cwd=tmp_path)
    assert dry.returncode == 0 and f'"{best["settings"]["parallel"]}"' in dry.stdout, dry.stdout + dry.stderr


def test_an_engine_argument_llama_server_lacks_is_refused_by_name(env, tmp_path):
    tuner = "+experiment.auto_tuner={space: {threadz: [1, 2]}}"
    result = flagscale(
        "serve", str(CONF), f"experiment.exp_dir={tmp_path}", "action=auto_tune", tuner, env=env, cwd=tmp_path
    )
    assert result.returncode != 0
    assert "experiment.auto_tuner.space.threadz: the engine has no --threadz argument (did you mean threads?)" in (
        result.stderr
    ), result.stderr
    assert not (tmp_path / "auto_tune").exists()  # nothing launched, nothing written
