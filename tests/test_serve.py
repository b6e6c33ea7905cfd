"""`flagscale serve` direct mode with a real llama-server from the patched cpu wheel and a real HTTP client."""

from __future__ import annotations

import json
import socket
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
# The tiny model has random weights, so a sampled end-of-text may cut a completion short; llama-server's
# ignore_eos makes the token counts below exact.
FULL_LENGTH = {"ignore_eos": True}


@pytest.fixture(scope="module")
def env():
    root = work_root()
    site = installed_backend(root)
    return {**backend_env(site), "TINY_LLAMA_GGUF": str(tiny_gguf(root))}


@pytest.fixture(scope="module")
def server(env, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("serve")
    port = free_port()
    args = [f"experiment.exp_dir={run_dir}", f"experiment.runner.port={port}"]
    result = flagscale("serve", str(CONF), *args, env=env, cwd=run_dir)
    assert result.returncode == 0, result.stderr
    assert f"serving tiny at http://127.0.0.1:{port}/v1" in result.stdout
    yield {"url": f"http://127.0.0.1:{port}", "args": args, "run_dir": run_dir, "port": port}
    flagscale("serve", str(CONF), *args, "action=stop", env=env, cwd=run_dir)


def _pid(run_dir, name="tiny") -> int:
    return json.loads((run_dir / "pids" / f"{name}.json").read_text())["pid"]


def test_completions_chat_and_streaming(server):
    code, body = post(
        server["url"] + "/v1/completions",
        {"model": "tiny", "prompt": "Once upon", "max_tokens": 8, "temperature": 0, **FULL_LENGTH},
    )
    assert code == 200 and body["usage"]["completion_tokens"] == 8 and body["model"] == "tiny"
    code, body = post(
        server["url"] + "/v1/chat/completions",
        {"model": "tiny", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 6, **FULL_LENGTH},
    )
    assert code == 200 and body["choices"][0]["message"]["role"] == "assistant"
    assert body["usage"]["completion_tokens"] == 6
    request = urllib.request.Request(
        server["url"] + "/v1/completions",
        json.dumps({"model": "tiny", "prompt": "Hello", "max_tokens": 5, "stream": True, **FULL_LENGTH}).encode(),
        {"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        assert response.headers["Content-Type"].startswith("text/event-stream")
        events = [line[6:] for line in response.read().decode().splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert len(chunks) >= 2 and chunks[-1]["choices"][0]["finish_reason"] == "length"  # split UTF-8 is held back
    assert chunks[-1]["usage"]["completion_tokens"] == 5


def test_openai_client_streams_chat(server):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=server["url"] + "/v1", api_key="none")
    pieces = [
        c.choices[0].delta.content or ""
        for c in client.chat.completions.create(
            model="tiny",
            messages=[{"role": "user", "content": "hi"}],
            max_tokens=4,
            stream=True,
            extra_body=FULL_LENGTH,
        )
        if c.choices
    ]
    assert len(pieces) >= 2
    assert [m.id for m in client.models.list().data] == ["tiny"]


def test_bad_requests_get_json_errors_and_the_server_stays_up(server):
    request = urllib.request.Request(
        server["url"] + "/v1/completions", b"{not json", {"Content-Type": "application/json"}
    )
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(request, timeout=10)
    assert 400 <= caught.value.code < 500
    assert "error" in json.loads(caught.value.read())
    code, body = post(server["url"] + "/v1/chat/completions", {"model": "tiny", "max_tokens": 4})  # no messages
    assert 400 <= code < 500 and "error" in body
    for route in ("completions", "chat/completions"):  # a model not served: 404 (patch 0003), not tiny's answer
        code, body = post(
            server["url"] + f"/v1/{route}",
            {"model": "gpt-9", "prompt": "x", "max_tokens": 2, "messages": [{"role": "user", "content": "x"}]},
        )
        assert code == 404, (code, body)
        assert body["error"]["code"] == "model_not_found" and "served: tiny" in body["error"]["message"]
    code, body = post(server["url"] + "/v1/completions", {"prompt": "no model named", "max_tokens": 2})
    assert code == 200 and body["model"] == "tiny"
    code, _ = post(server["url"] + "/v1/completions", {"model": "tiny", "prompt": "still up", "max_tokens": 2})
    assert code == 200


def test_status_port_in_use_and_already_running(server, env):
    result = flagscale("serve", str(CONF), *server["args"], "action=status", env=env, cwd=server["run_dir"])
    assert result.returncode == 0 and "tiny: running" in result.stdout and "health 200" in result.stdout
    again = flagscale("serve", str(CONF), *server["args"], env=env, cwd=server["run_dir"])
    assert again.returncode == 2 and "tiny is already running" in again.stderr
    other = flagscale(
        "serve",
        str(CONF),
        f"experiment.exp_dir={server['run_dir']}-other",
        f"experiment.runner.port={server['port']}",
        env=env,
        cwd=server["run_dir"],
    )
    assert other.returncode == 2
    assert f"port {server['port']} on 127.0.0.1 is in use" in other.stderr


def test_bad_configs_fail_before_anything_starts(env, tmp_path):
    port = free_port()
    base = [f"experiment.exp_dir={tmp_path}", f"experiment.runner.port={port}"]
    missing = flagscale(
        "serve", str(CONF), *base, f"serve.0.engine_args.model={tmp_path}/none.gguf", env=env, cwd=tmp_path
    )
    assert missing.returncode == 2 and "none.gguf: no such GGUF file" in missing.stderr
    unknown = flagscale("serve", str(CONF), *base, "+serve.0.engine_args.ctx_sise=64", env=env, cwd=tmp_path)
    assert unknown.returncode == 2
    assert (
        "serve[0].engine_args.ctx_sise: the engine has no --ctx-sise argument (did you mean ctx_size?)"
        in unknown.stderr
    )
    owned = flagscale("serve", str(CONF), *base, "+serve.0.engine_args.port=1", env=env, cwd=tmp_path)
    assert owned.returncode == 2 and "set experiment.runner.port instead" in owned.stderr
    assert not (tmp_path / "pids").exists()
    with socket.socket() as sock:
        sock.connect_ex(("127.0.0.1", port))  # nothing listens there
    assert "Traceback" not in missing.stderr + unknown.stderr + owned.stderr


def test_engine_dying_at_start_is_reported_with_its_log(env, tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 64)  # a file, but no model
    result = flagscale(
        "serve",
        str(CONF),
        f"experiment.exp_dir={tmp_path}",
        f"experiment.runner.port={free_port()}",
        f"serve.0.engine_args.model={bad}",
        env=env,
        cwd=tmp_path,
    )
    assert result.returncode == 2 and "exited before it was ready" in result.stderr


def test_stop_stops_only_its_own_server(env, tmp_path):
    ports = [free_port(), free_port()]
    runs = [tmp_path / "a", tmp_path / "b"]
    for run_dir, port in zip(runs, ports, strict=False):
        result = flagscale(
            "serve", str(CONF), f"experiment.exp_dir={run_dir}", f"experiment.runner.port={port}", env=env, cwd=tmp_path
        )
        assert result.returncode == 0, result.stderr
    pids = [_pid(r) for r in runs]
    try:
        result = flagscale("serve", str(CONF), f"experiment.exp_dir={runs[0]}", "action=stop", env=env, cwd=tmp_path)
        assert result.returncode == 0 and "stopped frontdoor, tiny" in result.stdout
        assert wait_gone(pids[0])
        code, _ = post(f"http://127.0.0.1:{ports[1]}/v1/completions", {"prompt": "x", "max_tokens": 1})
        assert code == 200 and pid_alive(pids[1])
        status = flagscale("serve", str(CONF), f"experiment.exp_dir={runs[0]}", "action=status", env=env, cwd=tmp_path)
        assert "tiny: stopped" in status.stdout and status.returncode == 1
    finally:
        flagscale("serve", str(CONF), f"experiment.exp_dir={runs[1]}", "action=stop", env=env, cwd=tmp_path)
    assert wait_gone(pids[1])
