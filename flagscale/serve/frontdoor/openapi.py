"""The OpenAPI description the front door serves at /openapi.json (what it checks, not every engine field)."""

from __future__ import annotations

from typing import Any

_ERROR = {
    "type": "object",
    "properties": {
        "error": {
            "type": "object",
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "code": {"type": ["string", "null"]},
            },
            "required": ["message", "type"],
        }
    },
    "required": ["error"],
}
_COMMON = {
    "model": {"type": "string", "description": "a served model (optional when one is served)"},
    "stream": {"type": "boolean"},
    "max_tokens": {"type": "integer", "minimum": -1, "maximum": 2**31 - 1},
    "n": {"type": "integer", "minimum": -1, "maximum": 2**31 - 1},
    "temperature": {"type": "number", "minimum": -1e6, "maximum": 1e6},
    "top_p": {"type": "number", "minimum": -1e6, "maximum": 1e6},
    "seed": {"type": "integer", "minimum": -1, "maximum": 2**32 - 1},
    "stop": {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]},
}
_PROMPT = {
    "oneOf": [
        {"type": "string"},
        {"type": "array", "items": {"type": "string"}, "minItems": 1},
        {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1},
    ]
}
_PART = {
    "type": "object",
    "description": "a content part; the transformers engine takes text and image_url (a data: URL, or a file "
    "under experiment.runner.media_dirs)",
    "properties": {
        "type": {"type": "string"},
        "text": {"type": "string"},
        "image_url": {"type": "object", "properties": {"url": {"type": "string"}}, "required": ["url"]},
    },
    "required": ["type"],
}
_IMAGES = {
    "prompt": {"type": "string", "minLength": 1},
    "n": {"type": "integer", "minimum": 1, "maximum": 10},
    "size": {"type": "string", "pattern": "^([1-9][0-9]*x[1-9][0-9]*|auto)$"},
    "response_format": {"enum": ["b64_json", "url"]},
}
_MESSAGES = {
    "type": "array",
    "minItems": 1,
    "items": {
        "type": "object",
        "properties": {"role": {"type": "string"}, "content": {"type": ["string", "null", "array"], "items": _PART}},
        "required": ["role"],
    },
}
_ERRORS = {
    str(code): {"description": what, "content": {"application/json": {"schema": _ERROR}}}
    for code, what in (
        (400, "not JSON, not an object, a mistyped field, or an image the model cannot take"),
        (401, "no valid API key (Authorization: Bearer <key>)"),
        (404, "the model is not served"),
        (413, "the body exceeds experiment.runner.max_body_bytes"),
        (422, "the engine could not process the request (its HTTP 500; the message is the engine's)"),
        (502, "the engine answered another 5xx"),
        (503, "no engine reachable, or the server is stopping: retry"),
        (504, "the request exceeded experiment.runner.request_timeout"),
    )
}


def _post(summary: str, required: list[str], extra: dict) -> dict:
    schema = {"type": "object", "properties": {**_COMMON, **extra}, "required": required}
    return {
        "post": {
            "summary": summary,
            "requestBody": {"required": True, "content": {"application/json": {"schema": schema}}},
            "responses": {
                "200": {
                    "description": "the engine's answer (JSON), or an event stream with stream: true",
                    "content": {"application/json": {}, "text/event-stream": {}},
                },
                **_ERRORS,
            },
            "security": [{"bearer": []}],
        }
    }


def _get(summary: str, kind: str = "application/json", secured: bool = True) -> dict:
    operation: dict[str, Any] = {"summary": summary, "responses": {"200": {"description": "OK", "content": {kind: {}}}}}
    if secured:
        operation["security"] = [{"bearer": []}]
        operation["responses"]["401"] = _ERRORS["401"]
    return {"get": operation}


def openapi() -> dict:
    return {
        "openapi": "3.1.0",
        "info": {"title": "flagscale serve", "version": "1"},
        "paths": {
            "/health": _get("200 while serving, 503 while stopping", secured=False),
            "/v1/models": _get("the served models"),
            "/metrics": _get("Prometheus metrics", "text/plain"),
            "/v1/completions": _post("text completion (WebSocket on the same path)", ["prompt"], {"prompt": _PROMPT}),
            "/v1/chat/completions": _post(
                "chat completion (WebSocket on the same path)", ["messages"], {"messages": _MESSAGES}
            ),
            "/v1/embeddings": _post("embeddings", ["input"], {"input": _PROMPT}),
            "/v1/images/generations": _post("text-to-image (diffusers engine)", ["prompt"], _IMAGES),
            "/v1/media/{name}": _get("a PNG of an images answer with response_format url", "image/png"),
        },
        "components": {"securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
    }
