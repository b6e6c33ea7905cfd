"""`flagscale serve` with the transformers and diffusers engines (issue 14), in direct and in Ray mode.

One server per mode (module fixture, parametrized), run as `python -m flagscale serve` in the multimodal venv
(tests/multimodal_env.py) from examples/tiny_vlm/conf `serve=tiny_media`: a tiny random-weight LLaVA
(transformers engine) and a tiny FLUX pipeline (diffusers engine) behind one front door
(tests/media_models.py makes them). Real everything: the engines load the folders with
flagscale.infer.hf_models, the front door checks images with Pillow, Ray runs the replicas.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import struct
import time
import zlib

import httpx
import pytest
from conftest import REPO_ROOT, pid_alive
from media_models import tiny_flux, tiny_vlm

pytestmark = pytest.mark.integration
CONF = REPO_ROOT / "examples" / "tiny_vlm" / "conf"
MAX_BYTES = 32 << 10  # experiment.runner.max_image_bytes of the served instances
MAX_PIXELS = 128 * 128  # experiment.runner.max_image_pixels


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def png(width: int, height: int, noise: bool = False) -> bytes:
    """A valid RGB PNG made by hand (the test venv has no Pillow): flat grey, or incompressible noise."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = (lambda y: b"\0" + os.urandom(width * 3)) if noise else (lambda y: b"\0" + b"\x80" * (width * 3))
    pixels = zlib.compress(b"".join(row(y) for y in range(height)))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", data[:16]
    return struct.unpack(">II", data[16:24])


def data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def chat(url: str, question: str = "what is this", model: str = "tiny-vlm") -> dict:
    content = [{"type": "text", "text": question}, {"type": "image_url", "image_url": {"url": url}}]
    return {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": 4, "temperature": 0}


@pytest.fixture(scope="module")
def models(mm_env) -> dict[str, str]:
    return {"TINY_VLM": str(tiny_vlm(mm_env)), "TINY_FLUX": str(tiny_flux(mm_env))}


@pytest.fixture(scope="module", params=["direct", "ray"])
def served(request, mm_env, models, tmp_path_factory):
    deploy = request.param
    run_dir = tmp_path_factory.mktemp(f"media-{deploy}")
    allowed = run_dir / "allowed"  # experiment.runner.media_dirs: file images may come from here only
    allowed.mkdir()
    (allowed / "grey.png").write_bytes(png(20, 10))
    port = free_port()
    args = [
        "serve=tiny_media",
        f"experiment.exp_dir={run_dir}",
        f"experiment.runner.port={port}",
        f"experiment.runner.deploy={deploy}",
        f"experiment.runner.media_dirs=[{allowed}]",
        f"experiment.runner.max_image_bytes={MAX_BYTES}",
        f"experiment.runner.max_image_pixels={MAX_PIXELS}",
        # the diffusers engine applies flagscale.transforms from its engine_args: step caching, and a log of calls
        f"+serve.1.engine_args.transformations=[{{name:log_io,select:{{type:FluxTransformer2DModel}},path:'{run_dir}/io.jsonl'}},"
        "{name:taylorseer,select:{type:FluxTransformer2DModel},warmup:1,interval:2}]",
    ]
    if deploy == "ray":
        args.append(f"+experiment.runner.ray_port={free_port()}")
    serve = ["python", "-m", "flagscale", "serve", CONF, *args]
    result = mm_env.run(serve, cwd=run_dir, timeout=300, label=f"serve {deploy}", **models)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    url = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(base_url=url, timeout=120) as client:
            yield {"deploy": deploy, "url": url, "run_dir": run_dir, "allowed": allowed, "client": client, "args": args}
    finally:
        stopped = mm_env.run([*serve, "action=stop"], cwd=run_dir, timeout=120, **models)
        assert stopped.returncode == 0, stopped.stderr[-2000:]


def engine_pids(served) -> list[int]:
    run_dir = served["run_dir"]
    if served["deploy"] == "ray":
        return [json.loads(p.read_text())["engine_pid"] for p in (run_dir / "replicas").glob("*.json")]
    return [json.loads((run_dir / "pids" / f"{m}.json").read_text())["pid"] for m in ("tiny-vlm", "tiny-flux")]


# ---------------------------------------------------------------------------------------------- images
def test_images_b64_and_url(served):
    client = served["client"]
    body = {"model": "tiny-flux", "prompt": "a red cat", "size": "32x32", "seed": 7, "n": 2}
    first = client.post("/v1/images/generations", json=body)
    assert first.status_code == 200, first.text
    images = [base64.b64decode(d["b64_json"]) for d in first.json()["data"]]
    assert [png_size(i) for i in images] == [(32, 32), (32, 32)]
    assert [d["seed"] for d in first.json()["data"]] == [7, 8] and images[0] != images[1]
    again = client.post("/v1/images/generations", json=body)
    assert [base64.b64decode(d["b64_json"]) for d in again.json()["data"]] == images  # same seed, same bytes

    linked = client.post("/v1/images/generations", json={**body, "response_format": "url", "size": "48x32"})
    assert linked.status_code == 200, linked.text
    urls = [d["url"] for d in linked.json()["data"]]
    assert all(u.startswith(served["url"] + "/v1/media/") for u in urls)
    fetched = [client.get(u) for u in urls]
    assert [f.status_code for f in fetched] == [200, 200]
    assert fetched[0].headers["content-type"] == "image/png" and png_size(fetched[0].content) == (48, 32)
    assert sorted(p.name for p in (served["run_dir"] / "media").glob("*.png")) == sorted(
        u.rsplit("/", 1)[1] for u in urls
    )
    assert client.get("/v1/media/..%2Fpids%2Ffrontdoor.json").status_code == 404  # only the engine's PNG names
    metrics = client.get("/metrics").text  # the front door counts the new route like the others
    assert 'flagscale_requests_total{model="tiny-flux",route="/v1/images/generations",status="200"} 3.0' in metrics
    calls = (served["run_dir"] / "io.jsonl").read_text().splitlines()
    assert len(calls) >= 4, calls  # the transformations of engine_args ran: the transformer's calls were logged


# ---------------------------------------------------------------------------------------------- chat
def test_chat_with_an_image_part_is_answered(served):
    client = served["client"]
    text_only = client.post(
        "/v1/chat/completions",
        json={"model": "tiny-vlm", "messages": [{"role": "user", "content": "what is this"}], "max_tokens": 4},
    )
    assert text_only.status_code == 200, text_only.text
    for url in (data_url(png(40, 30)), str(served["allowed"] / "grey.png"), (served["allowed"] / "grey.png").as_uri()):
        answer = client.post("/v1/chat/completions", json=chat(url))
        assert answer.status_code == 200, answer.text
        reply = answer.json()
        assert reply["choices"][0]["message"]["role"] == "assistant"
        assert isinstance(reply["choices"][0]["message"]["content"], str)
        assert reply["usage"]["completion_tokens"] >= 1
        # the image became tokens: the prompt is longer than the same question without it
        assert reply["usage"]["prompt_tokens"] > text_only.json()["usage"]["prompt_tokens"] + 8
    # streamed as the tokens come: the same greedy answer, in pieces, then usage and [DONE]
    request = {**chat(data_url(png(8, 8))), "max_tokens": 6}
    whole = client.post("/v1/chat/completions", json=request).json()
    stream = client.post(
        "/v1/chat/completions", json={**request, "stream": True, "stream_options": {"include_usage": True}}
    )
    events = [line[5:].strip() for line in stream.text.splitlines() if line.startswith("data:")]
    assert stream.status_code == 200 and events[-1] == "[DONE]", stream.text
    chunks = [json.loads(e) for e in events[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == whole["choices"][0]["message"]["content"] and chunks[-1]["usage"] == whole["usage"]
    assert len(chunks) >= 4  # role, pieces..., finish, usage
    websockets = pytest.importorskip("websockets.sync.client")  # the front door's WebSocket streams it too
    with websockets.connect(served["url"].replace("http", "ws") + "/v1/chat/completions") as ws:
        ws.send(json.dumps(request))
        messages = [json.loads(m) for m in ws]
    assert messages[-1] == {"done": True, "usage": whole["usage"]}, messages
    completion = client.post("/v1/completions", json={"model": "tiny-vlm", "prompt": "a red", "max_tokens": 3})
    assert completion.status_code == 200 and completion.json()["usage"]["completion_tokens"] >= 1


# ---------------------------------------------------------------------------------------------- bad input
BAD_CHAT = {
    "not an image": (data_url(b"hello, not a picture"), "invalid_image"),
    "not base64": ("data:image/png;base64,%%%", "invalid_image"),
    "too many pixels": (data_url(png(200, 100)), "image_too_large"),
    "a remote URL": ("http://example.com/cat.png", "unsupported_image_url"),
    "a file outside media_dirs": ("/etc/hostname", "unsupported_image_url"),
}


def test_bad_input_gets_a_json_4xx_and_the_server_keeps_serving(served):
    client = served["client"]
    pids = engine_pids(served)
    assert len(pids) == 2 and all(pid_alive(p) for p in pids)

    def refused(route: str, body: dict, status: int = 400, code: str | None = None) -> None:
        response = client.post(route, json=body)
        assert response.status_code == status, (body, response.text)
        error = response.json()["error"]
        assert set(error) >= {"message", "type"} and (code is None or error["code"] == code), error

    big = png(120, 120, noise=True)  # under the pixel limit, over the byte limit
    assert len(big) > MAX_BYTES
    refused("/v1/chat/completions", chat(data_url(big)), code="image_too_large")
    for url, code in BAD_CHAT.values():
        refused("/v1/chat/completions", chat(url), code=code)
    audio = {"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}
    refused(
        "/v1/chat/completions",
        {"model": "tiny-vlm", "messages": [{"role": "user", "content": [audio]}]},
        code="unsupported_content_part",
    )
    refused("/v1/chat/completions", {**chat(data_url(png(4, 4))), "model": "tiny-flux"}, 404, "not_supported")
    refused("/v1/chat/completions", {**chat(data_url(png(4, 4))), "n": 2})  # one choice per request
    image = {"model": "tiny-flux", "prompt": "a cat"}
    refused("/v1/images/generations", {**image, "size": "big"})  # the front door: not WxH
    refused("/v1/images/generations", {**image, "size": "30x30"}, code="invalid_size")  # the engine: not a multiple
    refused("/v1/images/generations", {**image, "size": "256x256"}, code="invalid_size")  # over max_image_pixels
    refused("/v1/images/generations", {**image, "n": 0})
    refused("/v1/images/generations", {**image, "response_format": "png"})
    refused("/v1/images/generations", {"model": "tiny-flux", "prompt": ""})
    refused("/v1/images/generations", {**image, "model": "tiny-vlm"}, 404, "not_supported")
    # still serving, with the same engines
    assert client.post("/v1/chat/completions", json=chat(data_url(png(16, 16)))).status_code == 200
    assert client.post("/v1/images/generations", json={**image, "size": "32x32"}).status_code == 200
    assert engine_pids(served) == pids and all(pid_alive(p) for p in pids)
    assert client.get("/health").status_code == 200


def test_bad_configs_are_one_line_before_anything_starts(mm_env, models, tmp_path):
    def dryrun(*overrides: str, **env: str) -> str:
        args = ["python", "-m", "flagscale", "serve", CONF, "serve=tiny_media", f"experiment.exp_dir={tmp_path}"]
        result = mm_env.run([*args, *overrides, "action=dryrun"], cwd=tmp_path, **{**models, **env})
        assert result.returncode != 0 and not (tmp_path / "pids").exists(), result.stdout
        return result.stderr.strip().splitlines()[-1]

    line = dryrun("+serve.1.engine_args.num_inference_step=2")  # the nearest engine arg is named
    assert "serve[1].engine_args.num_inference_step" in line and "num_inference_steps" in line
    assert "not a diffusers pipeline folder" in dryrun(TINY_FLUX=models["TINY_VLM"])
    assert "not StableDiffusionPipeline" in dryrun("+serve.1.engine_args.pipeline=StableDiffusionPipeline")
    assert "taylorseer" in dryrun("+serve.1.engine_args.transformations=[{name:taylorsear}]")


def test_openai_client(served):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=served["url"] + "/v1", api_key="unused", max_retries=0)
    images = client.images.generate(model="tiny-flux", prompt="a cat", size="32x32", response_format="b64_json")
    assert png_size(base64.b64decode(images.data[0].b64_json or "")) == (32, 32)
    reply = client.chat.completions.create(**chat(data_url(png(24, 24))))
    assert reply.choices[0].message.role == "assistant" and reply.usage and reply.usage.prompt_tokens > 16
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(**chat(data_url(b"GIF89a, but no")))
    assert refused.value.code == "invalid_image"


def test_status_and_replica_replacement(served, mm_env, models):
    """action=status probes the engines like llama-server's; in Ray mode a killed engine's replica is replaced."""
    status = mm_env.run(
        ["python", "-m", "flagscale", "serve", CONF, *served["args"], "action=status"], cwd=served["run_dir"], **models
    )
    assert status.returncode == 0 and "health 200" in status.stdout, status.stdout + status.stderr
    if served["deploy"] != "ray":
        return
    records = served["run_dir"] / "replicas"
    victim = next(json.loads(p.read_text()) for p in records.glob("tiny-flux-*.json"))
    os.kill(victim["engine_pid"], signal.SIGKILL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        now = [json.loads(p.read_text()) for p in records.glob("tiny-flux-*.json")]
        if now and now[0]["replica"] != victim["replica"] and pid_alive(now[0]["engine_pid"]):
            break
        time.sleep(0.25)
    else:
        pytest.fail(f"no new tiny-flux replica: {list(records.iterdir())}")
    answer = served["client"].post("/v1/images/generations", json={"model": "tiny-flux", "prompt": "a cat"})
    assert answer.status_code == 200, answer.text
    events = (served["run_dir"] / "logs" / "replicas.jsonl").read_text()
    assert '"lost"' in events and victim["replica"] in events


def test_fuzzed_image_parts_and_image_requests_never_get_a_5xx(served):
    """Direct mode only (the same front door and engines run in Ray mode): hypothesis-made content parts (any
    type, data URLs of random or cut-short PNG bytes, paths) and image requests (any size, n, format)."""
    if served["deploy"] != "direct":
        pytest.skip("the same checks as in direct mode")
    pytest.importorskip("hypothesis")
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    client = served["client"]
    good = png(12, 9)
    raw = st.binary(max_size=64) | st.integers(0, len(good)).map(lambda n: good[:n]) | st.just(good)
    urls = (
        raw.map(data_url)
        | st.text(max_size=30)
        | st.sampled_from(["data:,x", "data:image/png;base64,", "file:///etc/passwd", str(served["allowed"])])
        | st.just((served["allowed"] / "grey.png").as_uri())
    )
    scalars = st.none() | st.booleans() | st.integers(-5, 10**6) | st.text(max_size=12)
    part = st.one_of(
        st.fixed_dictionaries({"type": st.just("image_url"), "image_url": st.fixed_dictionaries({"url": urls})}),
        st.fixed_dictionaries({"type": st.just("image_url"), "image_url": urls | scalars}),
        st.fixed_dictionaries({"type": st.just("text"), "text": st.text(max_size=10) | scalars}),
        st.fixed_dictionaries({"type": st.text(max_size=12)}),
    )
    chats = st.lists(part, min_size=1, max_size=3).map(
        lambda parts: (
            "/v1/chat/completions",
            {"model": "tiny-vlm", "max_tokens": 2, "messages": [{"role": "user", "content": parts}]},
        )
    )
    sizes = st.tuples(st.integers(0, 300), st.integers(0, 300)).map(lambda s: f"{s[0]}x{s[1]}") | scalars
    images = st.fixed_dictionaries(
        {"model": st.just("tiny-flux"), "prompt": st.text(max_size=12) | scalars},
        optional={
            "size": sizes,
            "n": st.integers(-1, 12) | scalars,
            "response_format": st.sampled_from(["b64_json", "url"]) | scalars,
            "seed": st.integers(-2, 2**33) | scalars,
            "num_inference_steps": st.integers(-1, 3) | scalars,
        },
    ).map(lambda body: ("/v1/images/generations", body))
    statuses: list[int] = []

    @settings(max_examples=150, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))
    @given(request=chats | images)
    def check(request) -> None:
        route, body = request
        response = client.post(route, json=body)
        statuses.append(response.status_code)
        assert response.status_code < 500, (body, response.text)
        if response.status_code != 200:
            assert set(response.json()["error"]) >= {"message", "type"}

    check()
    assert 200 in statuses and 400 in statuses
    assert client.post("/v1/chat/completions", json=chat(data_url(good))).status_code == 200
