"""`flagscale serve` scale-out on Ray: real Ray head, two replicas of a real llama-server, routed by model
name; a replica whose engine is killed mid-load is replaced and no retried request is lost."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
import urllib.error
import urllib.request

import pytest
from llama_cpp_support import (
    REPO_ROOT,
    backend_env,
    flagscale,
    free_port,
    installed_backend,
    pid_alive,
    post,
    tiny_gguf,
    wait_gone,
    work_root,
)

pytestmark = pytest.mark.integration
CONF = REPO_ROOT / "examples" / "tiny_llama" / "conf"
pytest.importorskip("ray")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    root = work_root()
    env = {**backend_env(installed_backend(root)), "TINY_LLAMA_GGUF": str(tiny_gguf(root))}
    run_dir = tmp_path_factory.mktemp("ray")
    port = free_port()
    args = [
        "serve=tiny_ray",
        f"experiment.exp_dir={run_dir}",
        f"experiment.runner.port={port}",
        f"+experiment.runner.ray_port={free_port()}",
    ]
    result = flagscale("serve", str(CONF), *args, env=env, cwd=run_dir)
    assert result.returncode == 0, result.stderr
    try:
        yield {"url": f"http://127.0.0.1:{port}", "run_dir": run_dir, "args": args, "env": env}
    finally:
        stopped = flagscale("serve", str(CONF), *args, "action=stop", env=env, cwd=run_dir)
        assert stopped.returncode == 0, stopped.stderr


def _replicas(run_dir) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((run_dir / "replicas").glob("*.json"))]


def test_routes_by_model_name_with_json_errors(cluster):
    url = cluster["url"]
    code, body = post(
        url + "/v1/completions", {"model": "tiny", "prompt": "Hello", "max_tokens": 4, "ignore_eos": True}
    )  # random weights: no early end-of-text
    assert code == 200 and body["usage"]["completion_tokens"] == 4
    code, body = post(
        url + "/v1/chat/completions",
        {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3},
    )
    assert code == 200 and body["choices"][0]["message"]["role"] == "assistant"
    code, body = post(url + "/v1/completions", {"model": "gpt-9", "prompt": "x", "max_tokens": 1})
    assert code == 404 and body["error"]["code"] == "model_not_found" and "served: tiny" in body["error"]["message"]
    request = urllib.request.Request(url + "/v1/completions", b"{oops", {"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(request, timeout=10)
    assert caught.value.code == 400 and "not JSON" in json.loads(caught.value.read())["error"]["message"]
    with urllib.request.urlopen(url + "/v1/models", timeout=10) as response:
        assert [m["id"] for m in json.loads(response.read())["data"]] == ["tiny"]
    request = urllib.request.Request(
        url + "/v1/completions",
        json.dumps({"model": "tiny", "prompt": "Hello", "max_tokens": 4, "stream": True, "ignore_eos": True}).encode(),
        {"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        events = [line[6:] for line in response.read().decode().splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]" and len(events) >= 3  # chunks: llama-server holds back split UTF-8 bytes
    assert json.loads(events[-2])["usage"]["completion_tokens"] == 4
    # a streaming request the engine refuses keeps the engine's 4xx and JSON error, not a 200 event stream
    code, body = post(url + "/v1/chat/completions", {"model": "tiny", "max_tokens": 2, "stream": True})  # no messages
    assert 400 <= code < 500 and "error" in body, (code, body)
    assert len(_replicas(cluster["run_dir"])) == 2


def _client(url: str, stop: threading.Event, results: list, attempts: int = 8) -> None:
    while not stop.is_set():
        for attempt in range(attempts):
            try:
                code, _ = post(
                    url + "/v1/completions", {"model": "tiny", "prompt": "Once upon", "max_tokens": 8}, timeout=30
                )
            except OSError:  # connection reset while a replica died
                code = 0
            if code == 200:
                results.append(("ok", attempt))
                break
            time.sleep(0.3 * (attempt + 1))
        else:
            results.append(("lost", code))


def test_a_killed_replica_loses_no_retried_request_and_comes_back(cluster):
    before = _replicas(cluster["run_dir"])
    victim = before[0]
    stop, results = threading.Event(), []
    clients = [threading.Thread(target=_client, args=(cluster["url"], stop, results)) for _ in range(4)]
    for thread in clients:
        thread.start()
    try:
        time.sleep(3)
        os.kill(victim["engine_pid"], signal.SIGKILL)  # the replica's llama-server dies mid-load
        assert wait_gone(victim["engine_pid"], 10)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:  # the engine exit takes it out of routing; a new replica replaces it
            now = _replicas(cluster["run_dir"])
            if (
                len(now) == 2
                and all(pid_alive(r["engine_pid"]) for r in now)
                and victim["replica"] not in [r["replica"] for r in now]
            ):
                break
            time.sleep(0.5)
        else:
            pytest.fail(f"the replica did not come back: {_replicas(cluster['run_dir'])}")
        time.sleep(3)  # keep loading the new replica too
    finally:
        stop.set()
        for thread in clients:
            thread.join(60)
    lost = [r for r in results if r[0] == "lost"]
    assert not lost, f"{len(lost)} of {len(results)} requests lost"
    assert len(results) > 20
    code, _ = post(cluster["url"] + "/v1/completions", {"model": "tiny", "prompt": "after", "max_tokens": 2})
    assert code == 200


def test_stop_takes_the_cluster_and_its_engines_down(cluster, tmp_path):
    # a separate, short-lived cluster: the module's one stays up for the other tests
    port = free_port()
    args = [
        "serve=tiny_ray",
        f"experiment.exp_dir={tmp_path}",
        f"experiment.runner.port={port}",
        f"+experiment.runner.ray_port={free_port()}",
        "serve.0.replicas=1",
        "serve.0.autoscaling.min_replicas=1",
        "serve.0.autoscaling.max_replicas=1",
    ]
    result = flagscale("serve", str(CONF), *args, env=cluster["env"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    engines = [r["engine_pid"] for r in _replicas(tmp_path)]
    heads = [json.loads((tmp_path / "pids" / f"{n}.json").read_text())["pid"] for n in ("ray-head", "serve-app")]
    assert len(engines) == 1
    result = flagscale("serve", str(CONF), *args, "action=stop", env=cluster["env"], cwd=tmp_path)
    assert result.returncode == 0 and "stopped serve-app, ray-head" in result.stdout
    assert all(wait_gone(pid, 30) for pid in engines + heads)
    code, _ = post(cluster["url"] + "/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 1})
    assert code == 200  # the other cluster is untouched
