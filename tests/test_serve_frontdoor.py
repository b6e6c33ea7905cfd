"""The front door of `flagscale serve` (flagscale.serve.frontdoor) in front of a real llama-server, direct mode.

One served instance (module fixture, API keys on) answers every test; the last test stops it under load.
Real components: llama-server from the patched cpu wheel, Debian's Prometheus (skipped with the reason
without it), the `websockets` and `openai` clients, hypothesis-generated requests. The engine-less checks
(timeout 504, engine unreachable 503) run the front door in-process against a socket that never answers and
a closed port.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest
from llama_cpp_support import (
    REPO_ROOT,
    backend_env,
    flagscale,
    free_port,
    installed_backend,
    pid_alive,
    tiny_gguf,
    wait_gone,
    work_root,
)

pytestmark = pytest.mark.integration
CONF = REPO_ROOT / "examples" / "tiny_llama" / "conf"
KEYS = ("key-one", "key-two")  # experiment.runner.api_keys
ENV_KEY = "key-from-env"  # $FLAGSCALE_API_KEYS
AUTH = {"Authorization": f"Bearer {KEYS[0]}"}
FULL = {"ignore_eos": True}  # the tiny model's random end-of-text would cut completions short
CHAT = [{"role": "user", "content": "hello"}]
DRAIN = 0.5  # experiment.runner.drain_timeout of the served instance


@pytest.fixture(scope="module")
def env():
    root = work_root()
    site = installed_backend(root)
    return {**backend_env(site), "TINY_LLAMA_GGUF": str(tiny_gguf(root)), "FLAGSCALE_API_KEYS": ENV_KEY}


@pytest.fixture(scope="module")
def served(env, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("frontdoor")
    port = free_port()
    args = [
        f"experiment.exp_dir={run_dir}",
        f"experiment.runner.port={port}",
        f"+experiment.runner.api_keys=[{','.join(KEYS)}]",
        f"+experiment.runner.drain_timeout={DRAIN}",
        "serve.0.engine_args.ctx_size=1024",
        "serve.0.engine_args.parallel=2",
    ]
    result = flagscale("serve", str(CONF), *args, env=env, cwd=run_dir)
    assert result.returncode == 0, result.stderr
    url = f"http://127.0.0.1:{port}"
    with httpx.Client(base_url=url, headers=AUTH, timeout=60) as client:
        yield {"url": url, "port": port, "args": args, "run_dir": run_dir, "client": client}
    flagscale("serve", str(CONF), *args, "action=stop", env=env, cwd=run_dir)


def sse_events(text: str) -> list[str]:
    return [line[5:].strip() for line in text.splitlines() if line.startswith("data:")]


def stream_text(client: httpx.Client, route: str, body: dict) -> tuple[int, list[str]]:
    with client.stream("POST", route, json={**body, "stream": True}) as response:
        return response.status_code, sse_events(response.read().decode())


# ------------------------------------------------------------------------------------ access and limits
def test_api_keys_on_every_route_but_health(served):
    url = served["url"]
    assert httpx.get(url + "/health").status_code == 200  # open
    routes = [("GET", "/v1/models"), ("GET", "/metrics"), ("GET", "/openapi.json")]
    routes += [("POST", r) for r in ("/v1/completions", "/v1/chat/completions", "/v1/embeddings")]
    for method, route in routes:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {KEYS[0]}"}):
            response = httpx.request(method, url + route, headers=headers, json={"prompt": "x"})
            assert response.status_code == 401, (route, headers)
            assert response.json()["error"]["type"] == "authentication_error"
    for key in (*KEYS, ENV_KEY):  # both config keys and the environment's
        response = httpx.get(url + "/v1/models", headers={"Authorization": f"Bearer {key}"})
        assert response.status_code == 200 and [m["id"] for m in response.json()["data"]] == ["tiny"]
    websockets = pytest.importorskip("websockets.sync.client")
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        with pytest.raises(Exception) as refused:
            websockets.connect(url.replace("http", "ws") + "/v1/chat/completions", additional_headers=headers)
        assert "401" in str(refused.value)


def test_routing_and_errors(served):
    client = served["client"]
    response = client.post("/v1/completions", json={"prompt": "Once upon", "max_tokens": 8, "temperature": 0, **FULL})
    assert response.status_code == 200 and response.json()["usage"]["completion_tokens"] == 8
    assert client.post("/v1/completions", json={"model": "tiny", "prompt": "a", "max_tokens": 2}).status_code == 200
    expected = {
        b"{not json": 400,
        b"[1, 2]": 400,
        b'{"prompt": "a", "max_tokens": "many"}': 400,
        b'{"prompt": "a", "max_tokens": 1e400}': 400,
        b'{"prompt": "a", "max_tokens": 99999999999999999999999}': 400,
        b'{"prompt": "a", "model": 5}': 400,
        b'{"prompt": "a", "model": "gpt-9"}': 404,
        b"\xff\xfe": 400,
    }
    for body, status in expected.items():
        response = client.post("/v1/completions", content=body, headers={"Content-Type": "application/json"})
        assert response.status_code == status, (body, response.text)
        assert set(response.json()["error"]) >= {"message", "type"}
    assert client.post("/v1/chat/completions", json={"max_tokens": 2}).status_code == 400  # no messages
    assert client.post("/v1/nothing", json={}).status_code == 404
    assert client.get("/v1/completions").status_code == 405
    big = b'{"prompt": "' + b"a" * (9 << 20) + b'"}'  # over the 8 MiB default
    response = client.post("/v1/completions", content=big, headers={"Content-Type": "application/json"})
    assert response.status_code == 413 and "exceeds" in response.json()["error"]["message"]
    status, events = stream_text(client, "/v1/completions", {"prompt": "Hello", "max_tokens": 5, **FULL})
    assert status == 200 and events[-1] == "[DONE]"
    assert json.loads(events[-2])["usage"]["completion_tokens"] == 5
    openapi = client.get("/openapi.json").json()
    assert {"/v1/completions", "/v1/chat/completions", "/v1/embeddings", "/health"} <= set(openapi["paths"])


def test_openai_client(served):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=served["url"] + "/v1", api_key=KEYS[1])
    pieces = [
        c.choices[0].delta.content or ""
        for c in client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=4, stream=True, extra_body=FULL)
        if c.choices
    ]
    assert len(pieces) >= 2
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=served["url"] + "/v1", api_key="nope").models.list()


# --------------------------------------------------------------------------------------------- WebSocket
def test_websocket_gives_the_tokens_of_the_sse_stream(served):
    from websockets.sync.client import connect

    ws_url = served["url"].replace("http", "ws")
    for route, body in (
        ("/v1/chat/completions", {"messages": CHAT}),
        ("/v1/completions", {"prompt": "Once upon a time"}),
    ):
        request = {**body, "max_tokens": 12, "temperature": 1.0, "seed": 1234, **FULL}
        status, events = stream_text(served["client"], route, request)
        assert status == 200 and events[-1] == "[DONE]"
        chunks = [json.loads(e) for e in events[:-1]]
        with connect(ws_url + route, additional_headers=AUTH) as ws:
            ws.send(json.dumps(request))
            messages = [json.loads(m) for m in ws]  # until the server closes
        assert messages[-1]["done"] is True and messages[-1]["usage"]["completion_tokens"] == 12
        over_ws = [m for m in messages[:-1] if m.get("choices")]

        def text(chunk_list, route=route):
            key = "delta" if route.endswith("chat/completions") else None
            out = []
            for c in chunk_list:
                for choice in c.get("choices") or []:
                    out.append((choice.get(key) or {}).get("content") or "" if key else choice.get("text") or "")
            return out

        assert "".join(text(over_ws)) == "".join(text(chunks)) and len("".join(text(chunks))) > 0, route
        print(f"\n{route}: {len(over_ws)} WebSocket messages = {len(chunks)} SSE events, same text")
    for payload, code in (("{oops", None), (json.dumps({"messages": CHAT, "model": "gpt-9"}), "model_not_found")):
        with connect(ws_url + "/v1/chat/completions", additional_headers=AUTH) as ws:
            ws.send(payload)
            messages = [json.loads(m) for m in ws]
        assert len(messages) == 1 and messages[0]["error"]["code"] == code and messages[0]["error"]["message"]


# ---------------------------------------------------------------------------------------- Prometheus
def _scraped(text: str) -> dict[tuple, float]:
    from prometheus_client.parser import text_string_to_metric_families

    values = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            values[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return values


def _sum(values: dict, name: str, **labels) -> float:
    return sum(v for (n, ls), v in values.items() if n == name and all(dict(ls).get(k) == x for k, x in labels.items()))


def _prometheus(port: int, target_port: int, tmp: Path) -> subprocess.Popen:
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("Debian's prometheus package is not installed (apt-get install prometheus; .ci/run does)")
    config = tmp / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        "scrape_configs:\n"
        "  - job_name: flagscale\n"
        f"    authorization: {{type: Bearer, credentials: {KEYS[0]}}}\n"
        f"    static_configs: [{{targets: ['127.0.0.1:{target_port}']}}]\n"
    )
    return subprocess.Popen(
        [
            binary,
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=open(tmp / "prometheus.log", "wb"),  # noqa: SIM115 (closed with the process)
    )


def _promql(port: int, query: str) -> dict[str, float]:
    response = httpx.get(f"http://127.0.0.1:{port}/api/v1/query", params={"query": query}, timeout=5)
    result = response.json()["data"]["result"]
    return {json.dumps(r["metric"], sort_keys=True): float(r["value"][1]) for r in result}


def test_prometheus_scrapes_the_metrics(served, tmp_path):
    client = served["client"]
    before = _scraped(client.get("/metrics").text)
    sent: Counter = Counter()
    tokens = {"prompt_tokens": 0, "completion_tokens": 0}
    for i in range(6):
        response = client.post("/v1/completions", json={"prompt": f"count {i}", "max_tokens": 3, **FULL})
        sent[response.status_code] += 1
        for key in tokens:
            tokens[key] += response.json()["usage"][key]
    for body in (b"{bad", b'{"prompt": 1.5}', b"null"):
        sent[client.post("/v1/completions", content=body).status_code] += 1
    for _ in range(2):
        sent[client.post("/v1/completions", json={"prompt": "x", "model": "nope"}).status_code] += 1
    streamed = 0
    for _ in range(3):
        status, events = stream_text(client, "/v1/completions", {"prompt": "stream", "max_tokens": 4, **FULL})
        sent[status] += 1
        streamed += 1
        usage = json.loads(events[-2])["usage"]
        for key in tokens:
            tokens[key] += usage[key]
    assert sent == {200: 9, 400: 3, 404: 2}
    prom_port = free_port()
    prometheus = _prometheus(prom_port, served["port"], tmp_path)
    try:
        route = '{route="/v1/completions"}'
        earlier = {  # what the module's earlier tests sent
            dict(labels)["status"]: value
            for (name, labels), value in before.items()
            if name == "flagscale_requests_total" and dict(labels)["route"] == "/v1/completions"
        }
        codes = set(earlier) | {str(c) for c in sent}
        expected = {
            c: _sum(before, "flagscale_requests_total", route="/v1/completions", status=c) + sent[int(c)] for c in codes
        }
        deadline = time.monotonic() + 30
        got: dict = {}
        while time.monotonic() < deadline:
            try:
                got = _promql(prom_port, f"sum by (status) (flagscale_requests_total{route})")
            except (httpx.HTTPError, KeyError, ValueError):
                got = {}
            got = {json.loads(k).get("status"): v for k, v in got.items()}
            if got == expected:
                break
            time.sleep(0.5)
        print(f"\nPromQL sum by (status) (flagscale_requests_total{route}) = {got}; expected {expected}")
        assert got == expected
        count = _promql(prom_port, f"sum(flagscale_request_duration_seconds_count{route})")
        assert list(count.values()) == [sum(expected.values())]
        ttft = _promql(prom_port, f"sum(flagscale_time_to_first_token_seconds_count{route})")
        assert list(ttft.values()) == [
            _sum(before, "flagscale_time_to_first_token_seconds_count", route="/v1/completions") + streamed
        ]
        for key, counted in tokens.items():
            value = _promql(prom_port, f'flagscale_{key}_total{{model="tiny"}}')
            assert list(value.values()) == [_sum(before, f"flagscale_{key}_total", model="tiny") + counted], key
        replicas = _promql(prom_port, "flagscale_replicas")
        assert list(replicas.values()) == [1.0]
        in_flight = _promql(prom_port, 'flagscale_requests_in_flight{model="tiny"}')
        assert list(in_flight.values()) == [0.0]
        print(f"tokens counted: {tokens}; histogram count {count}; ttft count {ttft}")
    finally:
        prometheus.terminate()
        prometheus.wait(timeout=30)


# ------------------------------------------------------------------------------------------------ fuzz
def test_fuzzed_requests_never_get_a_5xx(served):
    hypothesis = pytest.importorskip("hypothesis")
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    client = served["client"]
    routes = sorted(
        p for p in client.get("/openapi.json").json()["paths"] if p.startswith("/v1/") and p != "/v1/models"
    )
    scalars = (
        st.none()
        | st.booleans()
        | st.integers(min_value=-(10**30), max_value=10**30)
        | st.floats(allow_nan=True, allow_infinity=True)
        | st.text(max_size=20)
    )
    values = st.recursive(
        scalars,
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
        max_leaves=12,
    )
    small = st.integers(min_value=-1, max_value=4)
    fields = {
        "model": st.sampled_from(["tiny", "", "other"]) | values,
        "prompt": st.text(max_size=30) | st.lists(st.integers(0, 511), min_size=1, max_size=5) | values,
        "messages": st.just(CHAT)
        | st.lists(
            st.fixed_dictionaries({"role": st.text(max_size=10), "content": st.text(max_size=20) | values}), max_size=3
        )
        | values,
        "input": st.text(max_size=20) | values,
        "max_tokens": small | values,
        "n": st.just(1) | values,
        "temperature": st.floats(0, 2) | values,
        "top_p": st.floats(0, 1) | values,
        "seed": st.integers(-1, 2**32 - 1) | values,
        "stop": st.text(max_size=5) | st.lists(st.text(max_size=5), max_size=2) | values,
        "stream": st.booleans() | values,
    }
    for key in ("tools", "tool_choice", "logit_bias", "reasoning_format", "enable_thinking", "grammar"):
        fields[key] = values  # llama-server extensions it answered 500 (or dropped the connection) for when mistyped
    fields["response_format"] = st.just({"type": "json_object"}) | values
    fields["ignore_eos"] = st.booleans() | values
    requests = st.fixed_dictionaries({}, optional=fields).flatmap(
        lambda d: st.dictionaries(st.text(min_size=1, max_size=10), values, max_size=3).map(
            lambda extra: {**extra, **d}
        )
    )

    def encode(value) -> bytes:
        return json.dumps(value, allow_nan=True).encode()

    # valid-looking: a good request of every route with one field replaced (any JSON) and unknown fields added
    good = st.sampled_from(
        [
            {"prompt": "fuzz", "max_tokens": 3},
            {"messages": CHAT, "max_tokens": 3},
            {"input": "fuzz"},
            {"prompt": [1, 2, 3], "max_tokens": 2, "stream": True},
            {"messages": CHAT, "max_tokens": 2, "stream": True, "seed": 7},
        ]
    )
    unknown = st.dictionaries(st.text(min_size=1, max_size=10).filter(lambda k: k not in fields), values, max_size=3)
    key = st.sampled_from(sorted(fields))
    mutated = st.tuples(good, key.flatmap(lambda k: fields[k].map(lambda v: (k, v))), unknown).map(
        lambda t: {**t[2], **t[0], t[1][0]: t[1][1]}
    )
    bodies = (
        mutated.map(encode)
        | mutated.map(encode)
        | st.tuples(good, unknown).map(lambda t: encode({**t[1], **t[0]}))  # valid, with unknown fields
        | requests.map(encode)  # wrong types, huge numbers, unknown fields, NaN/Infinity
        | values.map(encode)  # any JSON at all
        | requests.map(encode).flatmap(lambda b: st.integers(0, len(b)).map(lambda n: b[:n]))  # cut short
        | st.binary(max_size=64)  # not even text
        | st.sampled_from([b"", b"{", b'{"prompt": "' + b"x" * (9 << 20) + b'"}', b"1" * 5000])  # empty, huge
    )
    statuses: Counter = Counter()

    @settings(
        max_examples=1100, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck)
    )
    @given(route=st.sampled_from(routes), body=bodies)
    def one(route: str, body: bytes) -> None:
        response = client.post(route, content=body, headers={"Content-Type": "application/json"}, timeout=60)
        statuses[response.status_code] += 1
        assert response.status_code < 500, (route, body[:300], response.text[:300])
        if response.status_code != 200:
            assert set(response.json()["error"]) >= {"message", "type"}

    start = time.monotonic()
    one()
    print(f"\nfuzz: {sum(statuses.values())} requests in {time.monotonic() - start:.1f} s, statuses {dict(statuses)}")
    assert sum(statuses.values()) >= 1000 and max(statuses) < 500
    response = client.post("/v1/completions", json={"prompt": "still here", "max_tokens": 3, **FULL})
    assert response.status_code == 200 and response.json()["usage"]["completion_tokens"] == 3
    assert hypothesis


# ------------------------------------------------------------------- no engine answer: 504, 503 (in-process)
class _Door:
    """The front door in a thread of this process (uvicorn, no signals), over the given engine URL."""

    def __init__(self, engine_url: str, **settings) -> None:
        import uvicorn

        from flagscale.serve.frontdoor import DoorSettings, StaticUpstreams, build_app
        from flagscale.serve.frontdoor.server import config

        self.port = free_port()
        self.app = build_app(StaticUpstreams({"m": [engine_url]}), DoorSettings(**settings))
        self.server = uvicorn.Server(config(self.app, "127.0.0.1", self.port))
        self.thread = threading.Thread(target=lambda: asyncio.run(self.server.serve()), daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started and time.monotonic() < deadline:
            time.sleep(0.02)
        return f"http://127.0.0.1:{self.port}"

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(10)


def test_timeout_504_and_unreachable_engine_503():
    silent = socket.socket()  # accepts connections (the kernel's backlog) and never answers
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)
    try:
        with _Door(f"http://127.0.0.1:{silent.getsockname()[1]}", request_timeout=0.5) as url:
            start = time.monotonic()
            response = httpx.post(url + "/v1/completions", json={"prompt": "x"}, timeout=10)
            assert response.status_code == 504 and response.json()["error"]["type"] == "timeout"
            assert time.monotonic() - start < 3
            response = httpx.post(url + "/v1/chat/completions", json={"messages": CHAT, "stream": True}, timeout=10)
            assert response.status_code == 504
            metrics = httpx.get(url + "/metrics").text
            assert 'flagscale_requests_total{model="m",route="/v1/completions",status="504"} 1.0' in metrics
    finally:
        silent.close()
    closed = free_port()  # nothing listens there
    with _Door(f"http://127.0.0.1:{closed}") as url:
        response = httpx.post(url + "/v1/completions", json={"prompt": "x"}, timeout=10)
        assert response.status_code == 503 and "retry" in response.json()["error"]["message"]


def _half_stream(listener: socket.socket, then: str) -> None:
    """An engine whose event stream starts (200, one event) and then stalls or breaks off."""
    connection, _ = listener.accept()
    connection.recv(65536)
    event = b'data: {"choices": [{"text": "a", "index": 0}]}\n\n'
    head = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
    connection.sendall(head + f"{len(event):x}\r\n".encode() + event + b"\r\n")
    if then == "stall":
        time.sleep(1.5)
    connection.close()


def test_a_stream_cut_short_ends_with_an_error_event():
    for then, kind in (("stall", "timeout"), ("break", "unavailable")):
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        engine = threading.Thread(target=_half_stream, args=(listener, then), daemon=True)
        engine.start()
        try:
            with _Door(f"http://127.0.0.1:{listener.getsockname()[1]}", request_timeout=0.5) as url:
                body = {"prompt": "x", "stream": True}
                response = httpx.post(url + "/v1/completions", json=body, timeout=10)
        finally:
            engine.join(5)
            listener.close()
        events = sse_events(response.text)
        assert response.status_code == 200 and json.loads(events[0])["choices"][0]["text"] == "a"
        assert json.loads(events[-2])["error"]["type"] == kind and events[-1] == "[DONE]", (then, events)


def test_non_loopback_without_keys_warns():
    from flagscale.serve.frontdoor import exposed_without_keys

    assert "without API keys" in (exposed_without_keys("0.0.0.0", ()) or "")
    assert exposed_without_keys("0.0.0.0", ("k",)) is None
    assert exposed_without_keys("127.0.0.1", ()) is None and exposed_without_keys("::1", ()) is None


# -------------------------------------------------------------------------------- stop under load (last)
def _client_loop(url: str, results: list, stop: threading.Event, index: int) -> None:
    """Requests until the server is gone; each outcome: ok, error status, error event, refused, TRUNCATED."""
    with httpx.Client(base_url=url, headers=AUTH, timeout=60) as client:
        while not stop.is_set():
            streaming = index % 2 == 0
            body = {"prompt": f"load {index}", "max_tokens": 500, **FULL}
            try:
                if streaming:
                    with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as response:
                        text = response.read().decode()
                    if response.status_code != 200:
                        results.append(("error status", response.status_code))
                        return  # stopping: 503
                    events = sse_events(text)
                    if any('"error"' in e for e in events):
                        results.append(("error event", 200))
                    elif events and events[-1] == "[DONE]" and json.loads(events[-2])["choices"][0]["finish_reason"]:
                        results.append(("ok", 200))
                    else:
                        results.append(("TRUNCATED", 200))
                else:
                    response = client.post("/v1/completions", json=body)
                    if response.status_code == 200:
                        ok = response.json()["choices"][0]["finish_reason"] is not None
                        results.append(("ok" if ok else "TRUNCATED", 200))
                    else:
                        results.append(("error status", response.status_code))
                        return
            except (httpx.ConnectError, httpx.RemoteProtocolError, httpx.ReadError) as exc:
                # a connection refused or closed before any response: the client knows it got nothing
                results.append(("refused", type(exc).__name__))
                if isinstance(exc, httpx.ConnectError):
                    return
            except (ValueError, KeyError, IndexError) as exc:
                results.append(("TRUNCATED", repr(exc)))


def test_stop_during_load_cuts_nothing_silently(served, env):
    engine_pid = json.loads((served["run_dir"] / "pids" / "tiny.json").read_text())["pid"]
    results: list = []
    stop = threading.Event()
    clients = [threading.Thread(target=_client_loop, args=(served["url"], results, stop, i)) for i in range(16)]
    for t in clients:
        t.start()
    time.sleep(2)
    assert any(kind == "ok" for kind, _ in results), results
    start = time.monotonic()
    result = flagscale("serve", str(CONF), *served["args"], "action=stop", env=env, cwd=served["run_dir"])
    took = time.monotonic() - start
    stop.set()
    for t in clients:
        t.join(60)
    outcomes = Counter(kind for kind, _ in results)
    print(f"\nstop took {took:.1f} s (drain_timeout {DRAIN} s); outcomes {dict(outcomes)}")
    print(f"error statuses: {Counter(code for kind, code in results if kind == 'error status')}")
    log = (served["run_dir"] / "logs" / "frontdoor.log").read_text()
    print(log[-2000:])
    assert result.returncode == 0 and "stopped frontdoor, tiny" in result.stdout, result.stdout + result.stderr
    assert outcomes["TRUNCATED"] == 0, [r for r in results if r[0] == "TRUNCATED"]
    # the queue (16 clients, 2 engine slots) outlasts the drain timeout: some finish, the rest is cut visibly
    assert outcomes["ok"] > 0 and outcomes["error event"] + outcomes["error status"] > 0
    # it drained and exited on its own (not the SIGKILL after drain_timeout + 15 s); the CLI's own start-up
    # is in `took` too, seconds on a loaded 2-core machine
    assert "request(s) cut at the drain deadline" in log and "front door stopped" in log and took < DRAIN + 15
    assert wait_gone(engine_pid) and not pid_alive(engine_pid)
    with pytest.raises(httpx.ConnectError):  # the listener is closed
        httpx.get(served["url"] + "/health", timeout=2)
