"""Type and range checks of the OpenAI fields the engines read, so that malformed input gets a 400 here.

Engines differ in what they do with a mistyped field (a 400, a 500, or a silent default); checking the
common fields once at the front door makes the answer the same for every engine, and keeps such requests
off the engines. Unknown fields pass through untouched (engines have their own extensions).

Models of the transformers engine also get their image parts checked here (`check_media`: part types, data
URLs or allowed files, decodable, within the byte and pixel limits), and `/v1/images/generations` its fields,
so a bad image never takes an engine's turn.
"""

from __future__ import annotations

import math
from typing import Any

from flagscale.serve.media import SIZE, ImageLimits, MediaError, decode, image_bytes, image_urls

INT32 = 2**31 - 1
_COUNTS = ("max_tokens", "max_completion_tokens", "n", "n_predict", "top_k", "logprobs", "top_logprobs", "n_probs")
_NUMBERS = ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty", "repeat_penalty", "typical_p")
_BOOLS: tuple[str, ...] = ("ignore_eos", "cache_prompt", "echo", "enable_thinking", "add_generation_prompt")
_BOOLS += ("parallel_tool_calls", "continue_final_message", "return_tokens", "timings_per_token", "post_sampling_probs")
_OBJECTS = ("response_format", "chat_template_kwargs", "stream_options")
_STRINGS = ("grammar", "user", "suffix")
# llama-server answers 500 for any other name (common_reasoning_format_from_name)
REASONING_FORMATS = ("none", "auto", "deepseek", "deepseek-legacy")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)) and math.isfinite(value)


def _tokens(value: Any) -> bool:
    return isinstance(value, list) and all(_is_int(t) and 0 <= t <= INT32 for t in value)


def _prompt(value: Any) -> bool:
    """A string, a list of strings, a list of token ids, or a list of token-id lists."""
    if isinstance(value, str):
        return True
    if not isinstance(value, list) or not value:
        return False
    return all(isinstance(v, str) for v in value) or _tokens(value) or all(_tokens(v) and v for v in value)


def _content(value: Any) -> bool:
    if value is None or isinstance(value, str):
        return True
    return isinstance(value, list) and all(
        isinstance(part, dict) and isinstance(part.get("type"), str) for part in value
    )


def _messages(value: Any) -> str | None:
    if not isinstance(value, list) or not value:
        return '"messages" must be a non-empty list of {"role": ..., "content": ...} objects'
    for i, message in enumerate(value):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            return f'"messages"[{i}] must be an object with a string "role"'
        if not _content(message.get("content")):
            return f'"messages"[{i}].content must be a string, null or a list of content parts'
    return None


def _logit_bias(value: Any) -> bool:
    """{token id or text: bias} (OpenAI), or [[token, bias], ...] (llama-server); a bias is a number or false."""
    if isinstance(value, dict):
        pairs = list(value.values())
    elif isinstance(value, list) and all(isinstance(p, list) and len(p) == 2 for p in value):
        if not all(isinstance(p[0], str) or (_is_int(p[0]) and 0 <= p[0] <= INT32) for p in value):
            return False
        pairs = [p[1] for p in value]
    else:
        return False
    return all(v is False or (_is_number(v) and abs(v) <= 1e6) for v in pairs)


def _typed(data: dict, route: str) -> str | None:
    """The engine-extension fields engines fail on (500, or a dropped connection) when mistyped."""
    for key in _BOOLS:
        if data.get(key) is not None and not isinstance(data[key], bool):
            return f'"{key}" must be true or false'
    for key in _OBJECTS if route != IMAGES else _OBJECTS[1:]:  # images: response_format is a string
        if data.get(key) is not None and not isinstance(data[key], dict):
            return f'"{key}" must be an object'
    for key in _STRINGS:
        if data.get(key) is not None and not isinstance(data[key], str):
            return f'"{key}" must be a string'
    tools = data.get("tools")
    if tools is not None and not (
        isinstance(tools, list) and all(isinstance(t, dict) and isinstance(t.get("type"), str) for t in tools)
    ):
        return '"tools" must be a list of {"type": ..., ...} objects'
    choice = data.get("tool_choice")
    if choice is not None and not isinstance(choice, (str, dict)):
        return '"tool_choice" must be a string or an object'
    if data.get("reasoning_format") is not None and data["reasoning_format"] not in REASONING_FORMATS:
        return f'"reasoning_format" must be one of {", ".join(REASONING_FORMATS)}'
    if data.get("logit_bias") is not None and not _logit_bias(data["logit_bias"]):
        return '"logit_bias" must map token ids to finite numbers (or false)'
    return None


def check_request(route: str, data: dict) -> str | None:
    """None when the request's common fields are well typed, else what is wrong (one line)."""
    problem = _typed(data, route)
    if problem is not None:
        return problem
    if "stream" in data and data["stream"] is not None and not isinstance(data["stream"], bool):
        return '"stream" must be true or false'
    for key in _COUNTS:
        value = data.get(key)
        if value is not None and not (_is_int(value) and -1 <= value <= INT32):
            return f'"{key}" must be an integer from -1 to {INT32}'
    for key in _NUMBERS:
        value = data.get(key)
        if value is not None and not (_is_number(value) and abs(value) <= 1e6):
            return f'"{key}" must be a finite number'
    seed = data.get("seed")
    if seed is not None and not (_is_int(seed) and -1 <= seed < 2**32):
        return '"seed" must be an integer from -1 to 4294967295'
    stop = data.get("stop")
    if stop is not None and not (
        isinstance(stop, str) or (isinstance(stop, list) and all(isinstance(s, str) for s in stop))
    ):
        return '"stop" must be a string or a list of strings'
    if route == "/v1/chat/completions":
        return _messages(data.get("messages"))
    if route == "/v1/completions":
        if not _prompt(data.get("prompt")):
            return '"prompt" must be a string, a list of strings, or token ids'
    elif route == "/v1/embeddings":
        key = "input" if "input" in data else "content"
        if not _prompt(data.get(key)):
            return '"input" must be a string, a list of strings, or token ids'
    elif route == IMAGES:
        return _image_request(data)
    return None


IMAGES = "/v1/images/generations"
IMAGE_FORMATS = ("b64_json", "url")
MAX_IMAGES = 10  # images per request (OpenAI's bound for n)


def _image_request(data: dict) -> str | None:
    prompt = data.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        return '"prompt" must be a non-empty string'
    n = data.get("n")
    if n is not None and not (_is_int(n) and 1 <= n <= MAX_IMAGES):
        return f'"n" must be an integer from 1 to {MAX_IMAGES}'
    size = data.get("size")
    if size is not None and size != "auto" and not (isinstance(size, str) and SIZE.fullmatch(size)):
        return f'"size"={str(size)[:40]!r}: expected "WIDTHxHEIGHT" (e.g. "512x512") or "auto"'
    if data.get("response_format") is not None and data["response_format"] not in IMAGE_FORMATS:
        return f'"response_format" must be one of {", ".join(IMAGE_FORMATS)}'
    return None


def check_media(data: dict, limits: ImageLimits) -> MediaError | None:
    """A chat request's image parts, as a model of the transformers engine takes them: None when all decode
    within the limits, else what is wrong. Decodes images: run it off the event loop."""
    try:
        for where, url in image_urls(data["messages"]):
            decode(image_bytes(url, limits, where), limits, where)
    except MediaError as exc:
        return exc
    return None
