"""The front door's ASGI app: a raw ASGI dispatcher on the hot path (no framework routing, no re-encoding).

A routed request is read (up to the body limit), parsed once for `model` and `stream` (and checked by
flagscale.serve.frontdoor.checks so that malformed input never reaches an engine), and its raw bytes go to
an engine the Upstreams picks, over one pooled keep-alive aiohttp session. Non-streaming answers come back
as the engine wrote them; a stream is relayed chunk by chunk. Every response of the front door itself is
below 500 except 503 (no engine, or stopping: retry), 504 (the request timed out) and 502 (an engine's 5xx
other than 500, 501 and 503; see `engine_failed`).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import re
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from flagscale.serve.frontdoor import DoorSettings, Upstreams
from flagscale.serve.frontdoor.checks import IMAGES, check_media, check_request
from flagscale.serve.frontdoor.metrics import Metrics
from flagscale.serve.frontdoor.openapi import openapi

ROUTED = ("/v1/completions", "/v1/chat/completions", "/v1/embeddings", IMAGES)
MEDIA = "/v1/media/"  # GET /v1/media/<name>: a PNG the diffusers engine wrote (response_format: url)
# the routes of FlagScale's own engines (flagscale.serve.hf_engine): others get a 404 before reaching one
MEDIA_ROUTES = {"transformers": ("/v1/chat/completions", "/v1/completions"), "diffusers": (IMAGES,)}
STREAMABLE = ("/v1/completions", "/v1/chat/completions")
JSON = b"application/json"
MEDIA_NAME = re.compile(r"[0-9a-f]{32}\.png")  # what flagscale.serve.hf_engine names them: no path can sneak in
SSE_DONE = b"data: [DONE]\n\n"


def error_body(message: str, kind: str, code: str | None = None) -> bytes:
    return json.dumps({"error": {"message": message, "type": kind, "code": code}}).encode()


def sse_error(message: str, kind: str, code: str | None = None) -> bytes:
    return b"data: " + error_body(message, kind, code) + b"\n\n"


class Flight:
    """One request at an engine; `cut` ends it early (drain deadline, timeout, client gone)."""

    __slots__ = ("reason", "response", "timeout")

    def __init__(self) -> None:
        self.reason: str | None = None
        self.response: aiohttp.ClientResponse | None = None
        self.timeout: asyncio.Timeout | None = None

    def cut(self, reason: str) -> None:
        if self.reason is None:
            self.reason = reason
        timer, self.timeout = self.timeout, None
        if timer is not None and not timer.expired():
            try:
                timer.reschedule(asyncio.get_running_loop().time())
            except RuntimeError:  # its block has just ended
                pass
        if self.response is not None:
            self.response.close()  # a pending read returns or raises at once; the engine sees the client go


class UsageScanner:
    """Finds the `usage` object in an SSE stream without decoding the events that have none."""

    def __init__(self) -> None:
        self.carry = b""
        self.usage: Any = None

    def lines(self, chunk: bytes) -> list[bytes]:
        """The complete lines this chunk ends (the rest is carried to the next chunk)."""
        data = self.carry + chunk if self.carry else chunk
        end = data.rfind(b"\n") + 1
        if end == len(data):
            complete, self.carry = data, b""
        else:
            complete, self.carry = data[:end], data[end:][-(1 << 20) :]
        return complete.split(b"\n") if complete else []

    def feed(self, chunk: bytes) -> None:
        if b'"usage"' not in chunk and not self.carry:
            return
        for line in self.lines(chunk):
            self.take(line)

    def take(self, line: bytes) -> None:
        if line.startswith(b"data:") and b'"usage"' in line:
            try:
                event = json.loads(line[5:])
            except ValueError:
                return
            if isinstance(event, dict) and isinstance(event.get("usage"), dict):
                self.usage = event["usage"]


def usage_of(content: bytes) -> Any:
    """The `usage` object of a JSON answer, decoding only from that key on (embeddings can be large)."""
    at = content.rfind(b'"usage"')
    if at < 0:
        return None
    start = content.find(b"{", at)
    if start < 0:
        return None
    try:
        value, _ = json.JSONDecoder().raw_decode(content[start:].decode("utf-8", "replace"))
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


class FrontDoor:
    def __init__(self, upstreams: Upstreams, settings: DoorSettings) -> None:
        self.upstreams = upstreams
        self.settings = settings
        self.keys = tuple(k.encode() for k in settings.api_keys if k)
        self.metrics = Metrics(upstreams)
        self.session: aiohttp.ClientSession | None = None
        self.flights: set[Flight] = set()
        self.draining = False
        self.openapi = json.dumps(openapi()).encode()

    # ------------------------------------------------------------------------------------ lifecycle
    def client(self) -> aiohttp.ClientSession:
        if self.session is None or self.session.closed:
            # idle connections are dropped before the engine's own keep-alive timeout (llama-server: 5 s) would
            connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=3, ttl_dns_cache=None)
            self.session = aiohttp.ClientSession(
                connector=connector,
                auto_decompress=False,
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=10),
                skip_auto_headers=("User-Agent", "Accept-Encoding"),
            )
        return self.session

    async def open(self, url: str, body: bytes) -> aiohttp.ClientResponse:
        """POST body to the engine; the response with its status and headers read, the body still to come."""
        try:
            return await self.client().post(url, data=body, headers=JSON_HEADERS)
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError):
            # a pooled keep-alive connection the engine had just closed (cpp-httplib ends idle ones after 5 s,
            # and some after an error): no answer came, so once more on a fresh connection
            return await self.client().post(url, data=body, headers=JSON_HEADERS)

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()

    async def drain(self, timeout: float | None = None) -> None:
        """Stop taking requests (503), let in-flight ones run up to the drain timeout, then cut the rest:
        a stream still open ends with an SSE error event, a waiting request gets 503."""
        self.draining = True
        deadline = time.monotonic() + (self.settings.drain_timeout if timeout is None else timeout)
        while self.flights and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        cut = list(self.flights)
        for flight in cut:
            flight.cut("draining")
        end = time.monotonic() + 5
        while self.flights and time.monotonic() < end:  # their error events go out
            await asyncio.sleep(0.02)
        print(f"drained; {len(cut)} request(s) cut at the drain deadline", file=sys.stderr, flush=True)

    # ------------------------------------------------------------------------------------- dispatch
    async def __call__(self, scope, receive, send) -> None:
        kind = scope["type"]
        if kind == "http":
            await self.http(scope, receive, send)
        elif kind == "websocket":
            from flagscale.serve.frontdoor.ws import websocket

            await websocket(self, scope, receive, send)
        elif kind == "lifespan":
            await self.lifespan(receive, send)

    async def lifespan(self, receive, send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                self.client()
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.close()
                await send({"type": "lifespan.shutdown.complete"})
                return

    def authorized(self, scope) -> bool:
        if not self.keys:
            return True
        for name, value in scope["headers"]:
            if name == b"authorization":
                scheme, _, token = value.partition(b" ")
                token = token.strip()
                if scheme.lower() == b"bearer" and token:
                    return any(hmac.compare_digest(token, key) for key in self.keys)
                return False
        return False

    async def http(self, scope, receive, send) -> None:
        path, method = scope["path"], scope["method"]
        if path == "/health":
            if self.draining:
                await respond(send, 503, error_body("the server is stopping", "unavailable"))
            else:
                await respond(send, 200, b'{"status":"ok"}')
            return
        routed = path in ROUTED
        if not self.authorized(scope):
            if routed:
                self.metrics.done("", path, 401, 0.0)
            await respond(
                send,
                401,
                error_body("a valid API key is required: Authorization: Bearer <key>", "authentication_error"),
                ((b"www-authenticate", b"Bearer"),),
            )
            return
        if routed:
            if method != "POST":
                await respond(send, 405, error_body(f"{path} takes POST", "invalid_request_error"))
                return
            await self.api(scope, receive, send, path)
        elif path in ("/v1/models", "/metrics", "/openapi.json"):
            if method not in ("GET", "HEAD"):
                await respond(send, 405, error_body(f"{path} takes GET", "invalid_request_error"))
            elif path == "/v1/models":
                models = [{"id": m, "object": "model", "owned_by": "flagscale"} for m in self.upstreams.models()]
                await respond(send, 200, json.dumps({"object": "list", "data": models}).encode())
            elif path == "/metrics":
                await respond(
                    send, 200, generate_latest(self.metrics.registry), content_type=CONTENT_TYPE_LATEST.encode()
                )
            else:
                await respond(send, 200, self.openapi)
        elif path.startswith(MEDIA):
            await self.media_file(send, method, path[len(MEDIA) :])
        else:
            if path.startswith("/v1/"):
                self.metrics.done("", "other", 404, 0.0)
            routes = ", ".join(ROUTED)
            await respond(
                send, 404, error_body(f"{path} is not served; routes: {routes}", "invalid_request_error", "not_found")
            )

    # ---------------------------------------------------------------------------------- the API
    async def api(self, scope, receive, send, route: str) -> None:
        start = time.perf_counter()
        model, status = "", 500
        try:
            model, status = await self.forward(scope, receive, send, route, start)
        finally:
            self.metrics.done(model, route, status, time.perf_counter() - start)

    async def read_body(self, scope, receive) -> bytes | None:
        """The request body, or None once it exceeds the limit (declared or read)."""
        limit = self.settings.max_body_bytes
        for name, value in scope["headers"]:
            if name == b"content-length":
                try:
                    if int(value) > limit:
                        return None
                except ValueError:
                    pass
                break
        parts, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                raise ConnectionResetError("the client went away while sending its request")
            body = message.get("body", b"")
            size += len(body)
            if size > limit:
                return None
            parts.append(body)
            if not message.get("more_body", False):
                return b"".join(parts)

    async def forward(self, scope, receive, send, route: str, start: float) -> tuple[str, int]:
        """Answer one API request; returns (model label, status) for the metrics."""
        if self.draining:
            return "", await respond(send, 503, error_body("the server is stopping; retry elsewhere", "unavailable"))
        try:
            body = await self.read_body(scope, receive)
        except ConnectionResetError:
            return "", 499  # nobody to answer: counted as nginx does
        if body is None:
            limit = self.settings.max_body_bytes
            return "", await respond(
                send,
                413,
                error_body(f"the request body exceeds {limit} bytes", "invalid_request_error"),
                ((b"connection", b"close"),),
            )
        data, problem = parse(body)
        if problem is None:
            problem = check_request(route, data)
        if problem is not None:
            return "", await respond(send, 400, error_body(problem, "invalid_request_error"))
        model, wrong = self.model_of(data)
        if wrong is None:
            wrong = await self.media_problem(route, model, data)
        if wrong is not None:
            return "", await respond(send, *wrong)
        try:
            url = await self.upstreams.acquire(model)
        except LookupError as exc:  # a served model with no engine to take it now (Ray: none healthy yet)
            return model, await respond(send, 503, error_body(str(exc), "unavailable"))
        if url is None:
            return "", await respond(send, 404, self.not_found(model))
        flight = Flight()
        self.flights.add(flight)
        self.metrics.in_flight.labels(model).inc()
        try:
            if data.get("stream") is True and route in STREAMABLE:
                return model, await self.stream(scope, receive, send, route, model, url, body, flight, start)
            return model, await self.unary(send, route, model, url, body, flight)
        finally:
            self.metrics.in_flight.labels(model).dec()
            self.flights.discard(flight)
            self.upstreams.release(model, url)

    def model_of(self, data: dict) -> tuple[str, tuple[int, bytes] | None]:
        name = data.get("model")
        served = self.upstreams.models()
        if name is None or name == "":
            if len(served) == 1:
                return served[0], None
            return "", (
                400,
                error_body(f'name the model ("model"); served: {", ".join(served)}', "invalid_request_error"),
            )
        if not isinstance(name, str):
            return "", (400, error_body('"model" must be a string', "invalid_request_error"))
        if name not in served:
            return "", (404, self.not_found(name))
        return name, None

    async def media_problem(self, route: str, model: str, data: dict) -> tuple[int, bytes] | None:
        """A model of FlagScale's own engines: a route it does not serve (404), or a chat request whose image
        parts it cannot take (400). Other engines' requests pass unchecked, as before."""
        engine = self.settings.engine(model)
        if engine not in MEDIA_ROUTES:
            return None
        if route not in MEDIA_ROUTES[engine]:
            served = ", ".join(MEDIA_ROUTES[engine])
            message = f"model {model!r} ({engine} engine) does not serve {route}; its routes: {served}"
            return 404, error_body(message, "invalid_request_error", "not_supported")
        if route != "/v1/chat/completions" or not any(isinstance(m.get("content"), list) for m in data["messages"]):
            return None
        problem = await asyncio.to_thread(check_media, data, self.settings.image_limits)
        if problem is None:
            return None
        return 400, error_body(str(problem), "invalid_request_error", problem.code)

    async def media_file(self, send, method: str, name: str) -> None:
        """A PNG of the diffusers engine (response_format: url), from the run folder's media/."""
        if method not in ("GET", "HEAD"):
            await respond(send, 405, error_body(f"{MEDIA}<name> takes GET", "invalid_request_error"))
            return
        folder = self.settings.media_dir
        content = None
        if folder and MEDIA_NAME.fullmatch(name):
            try:
                content = await asyncio.to_thread((Path(folder) / name).read_bytes)
            except OSError:
                pass
        if content is None:
            await respond(send, 404, error_body(f"no image {name[:80]!r} here", "invalid_request_error", "not_found"))
            return
        await respond(send, 200, content, content_type=b"image/png")

    def not_found(self, name: str) -> bytes:
        served = ", ".join(self.upstreams.models())
        return error_body(
            f"model {name[:200]!r} is not served here; served: {served}", "invalid_request_error", "model_not_found"
        )

    async def unary(self, send, route: str, model: str, url: str, body: bytes, flight: Flight) -> int:
        try:
            async with asyncio.timeout(self.settings.request_timeout) as timer:
                flight.timeout = timer
                response = await self.open(url + route, body)
                try:
                    content = await response.read()
                finally:
                    response.release()
                status, kind = response.status, response.headers.get("Content-Type", "application/json")
            flight.timeout = None
        except TimeoutError:
            flight.timeout = None
            return await respond(send, *self.cut_answer(flight))
        except (aiohttp.ClientError, OSError) as exc:
            return await respond(send, 503, unavailable(exc))
        if status == 200:
            self.metrics.usage(model, usage_of(content))
        elif status >= 500:
            return await respond(send, *engine_failed(status, content))
        return await respond(send, status, content, content_type=kind.encode("latin-1", "replace"))

    def cut_answer(self, flight: Flight) -> tuple[int, bytes]:
        if flight.reason == "draining":
            return 503, error_body("the server stopped before the engine answered; retry", "unavailable")
        return 504, error_body(
            f"the engine did not answer within {self.settings.request_timeout:g} s (experiment.runner.request_timeout)",
            "timeout",
        )

    async def stream(self, scope, receive, send, route, model, url, body, flight: Flight, start: float) -> int:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.request_timeout
        try:
            async with asyncio.timeout_at(deadline) as timer:
                flight.timeout = timer
                response = await self.open(url + route, body)
            flight.timeout = None
        except TimeoutError:
            flight.timeout = None
            return await respond(send, *self.cut_answer(flight))
        except (aiohttp.ClientError, OSError) as exc:
            return await respond(send, 503, unavailable(exc))
        flight.response = response
        try:
            if response.status != 200:  # the engine refused: its status and JSON error, not a 200 stream
                try:
                    content = await response.read()
                except (aiohttp.ClientError, OSError) as exc:
                    return await respond(send, 503, unavailable(exc))
                if response.status >= 500:
                    return await respond(send, *engine_failed(response.status, content))
                refused = response.headers.get("Content-Type", "application/json").encode("latin-1", "replace")
                return await respond(send, response.status, content, content_type=refused)
            events = response.headers.get("Content-Type", "text/event-stream").encode("latin-1", "replace")
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [(b"content-type", events), (b"cache-control", b"no-cache")],
                }
            )
            timer_handle = loop.call_at(deadline, flight.cut, "timeout")
            watcher = asyncio.ensure_future(watch_disconnect(receive, flight))
            try:
                await self.relay(send, response, model, route, flight, start)
            finally:
                timer_handle.cancel()
                watcher.cancel()
            return 200
        finally:
            response.close()

    async def relay(self, send, response, model: str, route: str, flight: Flight, start: float) -> None:
        scanner = UsageScanner()
        first = True
        ended = False
        try:
            async for chunk in response.content.iter_any():
                if first:
                    self.metrics.ttft.labels(model, route).observe(time.perf_counter() - start)
                    first = False
                scanner.feed(chunk)
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            ended = flight.reason is None
        except (aiohttp.ClientError, OSError):
            pass
        if ended:
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            self.metrics.usage(model, scanner.usage)
            return
        # never a 200 cut short in silence: the stream ends with an error event
        if flight.reason == "draining":
            event = sse_error("the server is stopping; the answer was cut at the drain deadline", "unavailable")
        elif flight.reason == "timeout":
            event = sse_error(f"the request exceeded {self.settings.request_timeout:g} s", "timeout")
        elif flight.reason == "disconnected":
            return
        else:
            event = sse_error("the engine's stream broke off; retry", "unavailable")
        await send({"type": "http.response.body", "body": event + SSE_DONE, "more_body": False})


JSON_HEADERS = {"Content-Type": "application/json"}


def unavailable(exc: BaseException) -> bytes:
    return error_body(f"engine unavailable ({type(exc).__name__}); retry", "unavailable")


def engine_failed(status: int, content: bytes) -> tuple[int, bytes]:
    """The front door's answer to an engine's 5xx, the engine's message kept:

    * 500 is the engine failing on this request (a chat template or tool parser that cannot take it, output
      that does not fit the requested format): 422, since the same request fails the same way again, and a
      5xx would make clients retry it (the OpenAI client retries 5xx twice);
    * 501 (the engine lacks the route, e.g. llama-server without --embeddings): 404 for this model;
    * 503 (loading, overloaded) stays a retryable 503; any other 5xx: 502.
    An engine that crashes drops the connection instead: that is a 503 (retry), see `unavailable`."""
    try:
        detail = json.loads(content)["error"]["message"]
    except (ValueError, KeyError, TypeError, IndexError):
        detail = content[:300].decode("utf-8", "replace")
    if status == 501:
        return 404, error_body(
            f"this model's engine does not serve the route: {detail}", "invalid_request_error", "not_supported"
        )
    if status == 500:
        return 422, error_body(f"the engine could not process this request (HTTP 500): {detail}", "engine_error")
    if status == 503:
        return 503, error_body(f"the engine is busy or loading; retry: {detail}", "unavailable")
    return 502, error_body(f"the engine failed with HTTP {status}: {detail}", "engine_error")


def parse(body: bytes) -> tuple[dict, str | None]:
    try:
        data = json.loads(body)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        return {}, f"the request body is not JSON: {str(exc)[:200]}"
    if not isinstance(data, dict):
        return {}, "the request body must be a JSON object"
    return data, None


async def watch_disconnect(receive, flight: Flight) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            flight.cut("disconnected")
            return


async def respond(send, status: int, body: bytes, headers=(), content_type: bytes = JSON) -> int:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", content_type), (b"content-length", str(len(body)).encode()), *headers],
        }
    )
    await send({"type": "http.response.body", "body": body})
    return status


def build(upstreams: Upstreams, settings: DoorSettings) -> FrontDoor:
    return FrontDoor(upstreams, settings)
