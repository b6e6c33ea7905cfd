"""WebSocket on /v1/chat/completions and /v1/completions: one JSON request, the stream as messages.

The client sends one text (or binary) message holding the same JSON as the HTTP request; the front door
asks the engine for a stream and sends each event's JSON as one text message (the OpenAI chunk, as the
engine wrote it), then a final `{"done": true, "usage": {...}}` and closes (1000). An error at any point is
one message with the same JSON error shape as HTTP (`{"error": {"message", "type", "code"}}`), then the
close. Without a valid API key the upgrade is refused with HTTP 401 (or closed with 1008 by servers
without the denial-response extension).
"""

from __future__ import annotations

import asyncio
import json
import time

import aiohttp

from flagscale.serve.frontdoor.app import (
    STREAMABLE,
    Flight,
    FrontDoor,
    UsageScanner,
    engine_failed,
    error_body,
    parse,
    unavailable,
)
from flagscale.serve.frontdoor.checks import check_request


async def _deny(scope, send, status: int, body: bytes) -> None:
    if "websocket.http.response" in (scope.get("extensions") or {}):
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        if status == 401:
            headers.append((b"www-authenticate", b"Bearer"))
        await send({"type": "websocket.http.response.start", "status": status, "headers": headers})
        await send({"type": "websocket.http.response.body", "body": body})
    else:
        await send({"type": "websocket.close", "code": 1008})


async def websocket(door: FrontDoor, scope, receive, send) -> None:
    route = scope["path"]
    label = "ws:" + route
    if (await receive())["type"] != "websocket.connect":
        return
    if not door.authorized(scope):
        if route in STREAMABLE:
            door.metrics.done("", label, 401, 0.0)
        await _deny(
            scope,
            send,
            401,
            error_body("a valid API key is required: Authorization: Bearer <key>", "authentication_error"),
        )
        return
    if route not in STREAMABLE:
        routes = ", ".join(STREAMABLE)
        await _deny(
            scope,
            send,
            404,
            error_body(f"no WebSocket at {route}; WebSocket routes: {routes}", "invalid_request_error", "not_found"),
        )
        return
    await send({"type": "websocket.accept"})
    message = await receive()
    if message["type"] != "websocket.receive":
        return
    start = time.perf_counter()
    model, status = "", 500
    try:
        model, status = await _answer(door, send, route, label, message, start)
    except (OSError, RuntimeError):  # the client went away mid-answer
        status = 499
    finally:
        door.metrics.done(model, label, status, time.perf_counter() - start)
    try:
        await send({"type": "websocket.close", "code": 1000})
    except (OSError, RuntimeError):
        pass


async def _error(send, status: int, body: bytes) -> int:
    await send({"type": "websocket.send", "text": body.decode()})
    return status


async def _answer(door: FrontDoor, send, route: str, label: str, message: dict, start: float) -> tuple[str, int]:
    if door.draining:
        return "", await _error(send, 503, error_body("the server is stopping; retry elsewhere", "unavailable"))
    raw = message.get("text")
    body = raw.encode() if raw is not None else (message.get("bytes") or b"")
    data, problem = parse(body)
    if problem is None:
        problem = check_request(route, data)
    if problem is not None:
        return "", await _error(send, 400, error_body(problem, "invalid_request_error"))
    model, wrong = door.model_of(data)
    if wrong is None:
        wrong = await door.media_problem(route, model, data)
    if wrong is not None:
        return "", await _error(send, *wrong)
    data["stream"] = True
    if not isinstance(data.get("stream_options"), dict):
        data["stream_options"] = {"include_usage": True}
    try:
        url = await door.upstreams.acquire(model)
    except LookupError as exc:  # a served model with no engine to take it now (Ray: none healthy yet)
        return model, await _error(send, 503, error_body(str(exc), "unavailable"))
    if url is None:
        return "", await _error(send, 404, door.not_found(model))
    flight = Flight()
    door.flights.add(flight)
    door.metrics.in_flight.labels(model).inc()
    try:
        return model, await _relay(door, send, route, label, model, url, json.dumps(data).encode(), flight, start)
    finally:
        door.metrics.in_flight.labels(model).dec()
        door.flights.discard(flight)
        door.upstreams.release(model, url)


async def _relay(door: FrontDoor, send, route, label, model, url, body: bytes, flight: Flight, start: float) -> int:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + door.settings.request_timeout
    try:
        async with asyncio.timeout_at(deadline) as timer:
            flight.timeout = timer
            response = await door.open(url + route, body)
        flight.timeout = None
    except TimeoutError:
        flight.timeout = None
        return await _error(send, *door.cut_answer(flight))
    except (aiohttp.ClientError, OSError) as exc:
        return await _error(send, 503, unavailable(exc))
    flight.response = response
    handle = loop.call_at(deadline, flight.cut, "timeout")
    try:
        if response.status != 200:
            content = await response.read()
            if response.status >= 500:
                return await _error(send, *engine_failed(response.status, content))
            return await _error(send, response.status, content)
        scanner = UsageScanner()
        first, done = True, False
        try:
            async for chunk in response.content.iter_any():
                for line in scanner.lines(chunk):
                    if not line.startswith(b"data:"):
                        continue
                    event = line[5:].strip()
                    if event == b"[DONE]":
                        done = True
                        break
                    if first:
                        door.metrics.ttft.labels(model, label).observe(time.perf_counter() - start)
                        first = False
                    scanner.take(line)
                    await send({"type": "websocket.send", "text": event.decode("utf-8", "replace")})
                if done:
                    break
        except (aiohttp.ClientError, OSError):
            pass
        if not done:
            return await _error(send, *_cut(door, flight))
        door.metrics.usage(model, scanner.usage)
        await send({"type": "websocket.send", "text": json.dumps({"done": True, "usage": scanner.usage})})
        return 200
    finally:
        handle.cancel()
        response.close()


def _cut(door: FrontDoor, flight: Flight) -> tuple[int, bytes]:
    if flight.reason == "draining":
        return 503, error_body("the server is stopping; the answer was cut at the drain deadline", "unavailable")
    if flight.reason == "timeout":
        return 504, error_body(f"the request exceeded {door.settings.request_timeout:g} s", "timeout")
    return 503, error_body("the engine's stream broke off; retry", "unavailable")
