"""The `transformers` and `diffusers` engines of `flagscale serve`: an OpenAI-style server on the HF libraries.

    python -m flagscale.serve.hf_engine --engine transformers --model DIR --served-model-name NAME \\
        --host 127.0.0.1 --port 8001 [engine args]

FlagScale starts it like llama-server (flagscale.serve.engines.command_for), in direct mode and in Ray replicas,
in the environment that has the `multimodal` extra. It loads the model with flagscale.infer.hf_models, then
answers on host:port (uvicorn, a raw ASGI app):

* `GET /health` (200 once the model is loaded: the server listens only then), `GET /v1/models`;
* transformers (causal LMs and vision-language models): `POST /v1/chat/completions` (content parts `text` and
  `image_url`: data: URLs, or files under experiment.runner.media_dirs; see flagscale.serve.media) and
  `POST /v1/completions`; `stream: true` sends server-sent events as the tokens come (transformers' streamer);
* diffusers (text-to-image pipelines): `POST /v1/images/generations` (`prompt`, `n`, `size` "WxH", `seed`,
  `response_format` b64_json or url; url: a PNG written to --media-dir, served by the front door at --media-url).

One generation runs at a time (torch uses every thread it is given); others wait their turn. Bad input is a 400
with the OpenAI error shape; a failure inside the model is a 500 (the front door turns it into 422).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import secrets
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flagscale.errors import ConfigError
from flagscale.serve import media
from flagscale.serve.media import ImageLimits, MediaError

log = logging.getLogger("flagscale.serve.hf_engine")
ENGINES = ("transformers", "diffusers")
JSON = b"application/json"
MAX_BODY = 64 << 20  # the front door has its own, smaller limit; this only bounds a direct client

# Engine args a task YAML may set (engine_args: snake_case keys), per engine: (name, type, default, help).
_COMMON_ARGS: list[tuple[str, Any, Any, str]] = [
    ("dtype", str, "float32", "torch dtype of the weights: float32 | bfloat16 | float16"),
    ("threads", int, None, "torch threads (default: torch's own choice)"),
    ("device", str, "cpu", "torch device: cpu | cuda | cuda:1 ... (experiment.runner.visible_devices picks the GPUs)"),
]
ENGINE_ARGS: dict[str, list[tuple[str, Any, Any, str]]] = {
    "transformers": [
        *_COMMON_ARGS,
        ("max_new_tokens", int, 512, "the most tokens one answer may have (a larger max_tokens is cut to it)"),
        ("default_max_tokens", int, 64, "tokens of an answer that names no max_tokens"),
    ],
    "diffusers": [
        *_COMMON_ARGS,
        ("num_inference_steps", int, None, "denoising steps (default: the pipeline's)"),
        ("guidance_scale", float, None, "classifier-free guidance scale (default: the pipeline's)"),
        ("sizes", str, None, "the sizes requests may ask for, WxH (default: any multiple the pipeline takes)"),
        ("default_size", str, None, "size of a request that names none (default: the pipeline's)"),
        ("max_n", int, 4, "the most images one request may ask for"),
        ("pipeline", str, None, "the pipeline class the folder must be, e.g. FluxPipeline (default: any)"),
        ("components", json.loads, None, "per component {class, dtype}, e.g. {transformer: {dtype: bfloat16}}"),
        ("transformations", json.loads, None, "flagscale.transforms specs applied in order (e.g. taylorseer)"),
        ("call_args", json.loads, None, "more keywords of the pipeline call, e.g. {max_sequence_length: 64}"),
    ],
}


# ------------------------------------------------------------------------------------------ arguments
def parser(engine: str) -> argparse.ArgumentParser:
    """The command line of `engine`'s server (no heavy imports: `flagscale serve` checks engine_args with it)."""
    p = argparse.ArgumentParser(prog="python -m flagscale.serve.hf_engine", description=__doc__.splitlines()[0])
    p.add_argument("--engine", choices=ENGINES, required=True)
    p.add_argument("--model", required=True, help="the local model folder")
    p.add_argument("--served-model-name", required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--media-dir", type=Path, help="url-mode images are written here")
    p.add_argument("--media-url", help="... and served under this URL (the front door's /v1/media)")
    p.add_argument("--max-image-bytes", type=int, default=ImageLimits.max_bytes)
    p.add_argument("--max-image-pixels", type=int, default=ImageLimits.max_pixels)
    p.add_argument("--media-dirs", nargs="*", default=[], help="file images are read only under these folders")
    for name, kind, default, text in ENGINE_ARGS[engine]:
        nargs = "+" if name == "sizes" else None
        p.add_argument("--" + name.replace("_", "-"), type=kind, default=default, nargs=nargs, help=text)
    return p


def engine_flags(engine: str) -> frozenset[str]:
    """The flags a task YAML's engine_args may map onto (the runner sets the others)."""
    return frozenset("--" + name.replace("_", "-") for name, *_ in ENGINE_ARGS[engine])


def parse_args(argv: list[str]) -> argparse.Namespace:
    engine = argv[argv.index("--engine") + 1] if "--engine" in argv[:-1] else None
    if engine not in ENGINES:
        raise SystemExit(f"--engine: one of {', '.join(ENGINES)} is required")
    return parser(engine).parse_args(argv)


# ---------------------------------------------------------------------------------------------- errors
class RequestError(Exception):
    """An answer other than 200: status, OpenAI error shape."""

    def __init__(self, status: int, message: str, code: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.code, self.kind = status, code, kind


def error_body(message: str, kind: str, code: str | None = None) -> bytes:
    return json.dumps({"error": {"message": message, "type": kind, "code": code}}).encode()


def _int(data: dict, key: str, default: int, low: int, high: int) -> int:
    value = data.get(key)
    if value is None:
        return default
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise RequestError(400, f'"{key}" must be an integer from {low} to {high}')
    return value


def _float(data: dict, key: str, default: float | None, low: float, high: float) -> float | None:
    value = data.get(key)
    if value is None:
        return default
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not low <= value <= high:
        raise RequestError(400, f'"{key}" must be a number from {low:g} to {high:g}')
    return float(value)


def _seed(data: dict) -> int:
    value = data.get("seed")
    if value is None or value == -1:
        return secrets.randbelow(2**32)
    return _int(data, "seed", 0, 0, 2**32 - 1)


# ---------------------------------------------------------------------------------------------- models
@dataclass
class Reply:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # stop | length


def _stop_at(text: str, stop: Any) -> tuple[str, bool]:
    words = [stop] if isinstance(stop, str) else [s for s in (stop or []) if isinstance(s, str) and s]
    cuts = [text.index(w) for w in words if w in text]
    return (text[: min(cuts)], True) if cuts else (text, False)


# ------------------------------------------------------------ the models (loaded by flagscale.infer.hf_models)
def _with_images(messages: list, images: list) -> list:
    """The messages with each image part replaced by its decoded image (checked here, read once)."""
    pending = iter(images)
    out = []
    for message in messages:
        content = message.get("content")
        if isinstance(content, list):
            content = [
                {"type": "image", "image": next(pending)} if p.get("type") == "image_url" else p for p in content
            ]
        out.append({**message, "content": content})
    return out


class TextModel:
    """A causal LM or vision-language model (flagscale.infer.hf_models.ChatModel)."""

    def __init__(self, opts: argparse.Namespace) -> None:
        from flagscale.infer import hf_models

        self.chat_model = hf_models.load_chat_model(opts.model, dtype=opts.dtype, device=opts.device)
        self.takes_images = self.chat_model.vision

    def chat(self, messages: list, images: list, **sampling: Any) -> Reply:
        result = self.chat_model.chat(_with_images(messages, images), **sampling)
        return Reply(result.text, result.prompt_tokens, result.completion_tokens, result.finish_reason)

    def complete(self, prompt: str, *, max_tokens: int, temperature: float, top_p: float, seed: int, stop) -> Reply:
        """A plain continuation of `prompt` (no chat template)."""
        import torch

        from flagscale.infer.hf_models import _trim

        chat = self.chat_model
        inputs = chat.tokenizer([prompt], return_tensors="pt").to(chat.model.device)
        options = _options(max_tokens, temperature, top_p)
        torch.manual_seed(seed)
        with torch.inference_mode():
            output = chat.model.generate(**inputs, **options)
        width = inputs["input_ids"].shape[1]
        tokens = _trim(output[0, width:].tolist(), chat._eos_ids(), chat.tokenizer.pad_token_id)
        text, stopped = _stop_at(chat.tokenizer.decode(tokens, skip_special_tokens=True), stop)
        finish = "stop" if stopped or len(tokens) < max_tokens else "length"
        return Reply(text, width, len(tokens), finish)

    def stream(self, kind: str, what: Any, images: list, emit: Callable[[str], None], **sampling: Any) -> Reply:
        """Generate token by token: `emit(text)` for each new piece of the answer (never part of a stop string);
        the whole Reply at the end. Runs in a worker thread; transformers' generate in another, feeding a streamer."""
        import threading

        import torch
        from transformers import TextIteratorStreamer

        from flagscale.infer.hf_models import _trim

        chat, stop = self.chat_model, sampling["stop"]
        if kind == "chat":
            inputs = chat._inputs([_with_images(what, images)], None)  # hf_models' own batch of one
        else:
            inputs = chat.tokenizer([what], return_tensors="pt").to(chat.model.device)
        streamer = TextIteratorStreamer(chat.tokenizer, skip_prompt=True, skip_special_tokens=True)
        options = _options(sampling["max_tokens"], sampling["temperature"], sampling["top_p"])
        if stop:
            options.update(stop_strings=list(stop), tokenizer=chat.tokenizer)
        done: dict[str, Any] = {}

        def work() -> None:
            try:
                torch.manual_seed(sampling["seed"])
                with torch.inference_mode():
                    done["output"] = chat.model.generate(**inputs, **options, streamer=streamer)
            except BaseException as exc:  # the reader below must not wait for tokens that never come
                done["error"] = exc
                streamer.end()

        thread = threading.Thread(target=work, name="generate", daemon=True)
        thread.start()
        text, sent, cut = "", 0, False
        hold = max((len(w) for w in stop), default=1) - 1  # a stop string may be arriving: keep its length back
        for piece in streamer:
            if cut:
                continue
            text, cut = _stop_at(text + piece, stop)
            end = len(text) if cut else len(text) - hold
            if end > sent:
                emit(text[sent:end])
                sent = end
        thread.join()
        if "error" in done:
            raise done["error"]
        if len(text) > sent:
            emit(text[sent:])
        width = inputs["input_ids"].shape[1]
        tokens = _trim(done["output"][0, width:].tolist(), chat._eos_ids(), chat.tokenizer.pad_token_id)
        finish = "stop" if cut or len(tokens) < sampling["max_tokens"] else "length"
        return Reply(text, int(inputs["attention_mask"].sum()), len(tokens), finish)


def _options(max_tokens: int, temperature: float, top_p: float) -> dict[str, Any]:
    """generate()'s keywords: greedy at temperature 0, else sampled."""
    options: dict[str, Any] = {"max_new_tokens": max_tokens, "do_sample": temperature > 0}
    if temperature > 0:
        options.update(temperature=temperature, top_p=top_p)
    else:  # greedy: the checkpoint's sampling defaults would only warn
        options.update(temperature=None, top_p=None, top_k=None)
    return options


class ImagePipeline:
    """A diffusers text-to-image pipeline (flagscale.infer.hf_models.DiffusionModel)."""

    def __init__(self, opts: argparse.Namespace) -> None:
        from flagscale.infer import hf_models

        self.model = hf_models.load_pipeline(
            opts.model, pipeline=opts.pipeline, dtype=opts.dtype, device=opts.device, components=opts.components
        )
        if self.model.kind != "image":
            raise SystemExit(
                f"{opts.model}: {self.model.class_name} makes videos; the diffusers engine serves text-to-image "
                "pipelines (/v1/images/generations)"
            )
        self.call_args = opts.call_args or {}
        self.model.call_args(extra=self.call_args)  # a keyword the pipeline does not take: refused at start
        pipe = self.model.pipe
        if opts.transformations:  # kept for the server's life; each generation starts from a reset state
            self.model.transform(opts.transformations, "engine_args.transformations")
        scale = int(getattr(pipe, "vae_scale_factor", 8))
        # FLUX-class pipelines pack 2x2 latent patches: sides are multiples of twice the VAE's scale
        self.size_multiple = scale * 2 if "_pack_latents" in dir(pipe) else scale
        side = int(getattr(pipe, "default_sample_size", 64)) * scale
        self.default_size = (side, side)

    def generate(self, prompt: str, *, n: int, seed: int, **kwargs: Any) -> list[bytes]:
        from flagscale.infer.hf_models import png_bytes

        done = self.model.generate([prompt] * n, seeds=seed, extra=self.call_args, **kwargs)  # image i: seed + i
        return [png_bytes(g.images[0]) for g in done]


class TextEngine:
    """The transformers engine: chat (text and image parts) and completions, one request at a time."""

    routes = ("/v1/chat/completions", "/v1/completions")

    def __init__(self, opts: argparse.Namespace) -> None:
        self.opts = opts
        self.model = TextModel(opts)
        self.limits = ImageLimits(opts.max_image_bytes, opts.max_image_pixels, tuple(opts.media_dirs))

    def sampling(self, data: dict) -> dict:
        requested = data.get("max_completion_tokens", data.get("max_tokens"))
        limit = self.opts.max_new_tokens
        tokens = self.opts.default_max_tokens if requested in (None, -1) else requested
        stop = data.get("stop")
        stop = [stop] if isinstance(stop, str) else stop or []
        if not isinstance(stop, list) or not all(isinstance(w, str) and w for w in stop):
            raise RequestError(400, '"stop" must be a string or a list of non-empty strings')
        return {
            "max_tokens": max(1, min(_int({"max_tokens": tokens}, "max_tokens", 16, 1, 2**31 - 1), limit)),
            "temperature": _float(data, "temperature", 1.0, 0.0, 100.0),
            "top_p": _float(data, "top_p", 1.0, 0.0, 1.0),
            "seed": _seed(data),
            "stop": stop,
        }

    def prepare(self, route: str, data: dict) -> Any:
        """Check and decode the request (images too) before its turn; returns what `run` takes."""
        if data.get("n") not in (None, 1):
            raise RequestError(400, '"n": this engine gives one choice per request (send n: 1, or several requests)')
        if route == "/v1/chat/completions":
            messages = data.get("messages")
            if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
                raise RequestError(400, '"messages" must be a non-empty list of {"role": ..., "content": ...}')
            images = media.load_images(messages, self.limits)
            if images and not self.model.takes_images:
                raise RequestError(
                    400, "this model is a text model: it takes no image parts", "unsupported_content_part"
                )
            return ("chat", messages, images, self.sampling(data))
        prompt = data.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise RequestError(400, '"prompt" must be a string (one prompt per request)')
        return ("complete", prompt, [], self.sampling(data))

    def run(self, prepared: Any) -> Reply:
        kind, what, images, sampling = prepared
        if kind == "chat":
            return self.model.chat(what, images, **sampling)
        return self.model.complete(what, **sampling)

    def answer(self, route: str, data: dict, prepared: Any, reply: Reply) -> tuple[dict, None]:
        """The JSON answer (a stream goes through `Server.stream` and the event helpers below)."""
        chat = route == "/v1/chat/completions"
        base = {"created": int(time.time()), "model": self.opts.served_model_name}
        if chat:
            message = {"role": "assistant", "content": reply.text}
            choice: dict = {"index": 0, "message": message, "finish_reason": reply.finish_reason}
            body = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", **base}
        else:
            choice = {"index": 0, "text": reply.text, "logprobs": None, "finish_reason": reply.finish_reason}
            body = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", **base}
        body.update(choices=[choice], usage=_usage(reply))
        return body, None

    # ---- a stream: the OpenAI chunks
    def stream_head(self, route: str) -> dict:
        chat = route == "/v1/chat/completions"
        return {
            "id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
            "object": "chat.completion.chunk" if chat else "text_completion",
            "created": int(time.time()),
            "model": self.opts.served_model_name,
        }

    @staticmethod
    def piece(head: dict, text: str, finish: str | None = None, role: bool = False) -> dict:
        if head["object"] == "text_completion":
            return {**head, "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]}
        delta = {"role": "assistant", "content": text} if role else ({"content": text} if text else {})
        return {**head, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}

    def ending(self, head: dict, data: dict, reply: Reply) -> list[dict]:
        """The finish chunk, then usage (completions always, as llama-server; chat with include_usage)."""
        events = [self.piece(head, "", reply.finish_reason)]
        options = data.get("stream_options")
        if head["object"] == "text_completion" or (isinstance(options, dict) and options.get("include_usage")):
            events.append({**head, "choices": [], "usage": _usage(reply)})
        return events


def _usage(reply: Reply) -> dict:
    return {
        "prompt_tokens": reply.prompt_tokens,
        "completion_tokens": reply.completion_tokens,
        "total_tokens": reply.prompt_tokens + reply.completion_tokens,
    }


class ImageEngine:
    """The diffusers engine: /v1/images/generations on a text-to-image pipeline, one request at a time."""

    routes = ("/v1/images/generations",)

    def __init__(self, opts: argparse.Namespace) -> None:
        self.opts = opts
        self.pipe = ImagePipeline(opts)
        self.multiple = self.pipe.size_multiple
        self.sizes = [media.parse_size(s) for s in (opts.sizes or [])]
        for w, h in self.sizes:
            if w % self.multiple or h % self.multiple:
                raise SystemExit(f"--sizes {w}x{h}: this pipeline needs sides that are multiples of {self.multiple}")
        default = opts.default_size or (f"{self.sizes[0][0]}x{self.sizes[0][1]}" if self.sizes else None)
        self.default = media.parse_size(default) if default else self.pipe.default_size
        try:  # a request without a size gets this one: it must pass the same checks
            self.size("{}x{}".format(*self.default))
        except MediaError as exc:
            raise SystemExit(f"the default size: {exc} (set engine_args.default_size)") from None
        if opts.media_dir is not None:
            opts.media_dir.mkdir(parents=True, exist_ok=True)

    def size(self, value: Any) -> tuple[int, int]:
        if value is None or value == "auto":
            return self.default
        width, height = media.parse_size(value)
        if self.sizes:
            if (width, height) not in self.sizes:
                allowed = ", ".join(f"{w}x{h}" for w, h in self.sizes)
                raise MediaError(f'"size"={value}: this model serves {allowed}', "invalid_size")
        elif width % self.multiple or height % self.multiple:
            raise MediaError(
                f'"size"={value}: width and height must be multiples of {self.multiple} for this pipeline',
                "invalid_size",
            )
        if width * height > self.opts.max_image_pixels:
            raise MediaError(
                f'"size"={value}: over the limit of {self.opts.max_image_pixels} pixels '
                "(experiment.runner.max_image_pixels)",
                "invalid_size",
            )
        return width, height

    def prepare(self, route: str, data: dict) -> Any:
        prompt = data.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise RequestError(400, '"prompt" must be a non-empty string')
        form = data.get("response_format") or "b64_json"
        if form not in ("b64_json", "url"):
            raise RequestError(400, '"response_format" must be "b64_json" or "url"')
        if form == "url" and (self.opts.media_dir is None or not self.opts.media_url):
            raise RequestError(400, 'this server has no media folder: ask for "response_format": "b64_json"')
        width, height = self.size(data.get("size"))
        return {
            "prompt": prompt,
            "n": _int(data, "n", 1, 1, self.opts.max_n),
            "width": width,
            "height": height,
            "seed": _seed(data),
            "steps": _int(data, "num_inference_steps", self.opts.num_inference_steps or 0, 1, 1000) or None,
            "guidance": _float(data, "guidance_scale", self.opts.guidance_scale, 0.0, 100.0),
            "format": form,
        }

    def run(self, job: dict) -> list[bytes]:
        keys = ("n", "seed", "width", "height", "steps", "guidance")
        return self.pipe.generate(job["prompt"], **{k: job[k] for k in keys})

    def answer(self, route: str, data: dict, job: dict, pngs: list[bytes]) -> tuple[dict, None]:
        import base64

        items: list[dict] = []
        for i, png in enumerate(pngs):
            seed = job["seed"] + i  # each image has its own generator (flagscale.infer.hf_models)
            if job["format"] == "url":
                name = f"{uuid.uuid4().hex}.png"
                partial = self.opts.media_dir / f".{name}.part"
                partial.write_bytes(png)
                partial.rename(self.opts.media_dir / name)  # never a half-written file behind a URL
                items.append({"url": f"{self.opts.media_url.rstrip('/')}/{name}", "seed": seed})
            else:
                items.append({"b64_json": base64.b64encode(png).decode(), "seed": seed})
        size = f"{job['width']}x{job['height']}"
        return {"created": int(time.time()), "data": items, "size": size, "output_format": "png"}, None


# ---------------------------------------------------------------------------------------------- server
class Server:
    """The raw ASGI app: /health, /v1/models, and the engine's routes."""

    def __init__(self, engine: TextEngine | ImageEngine, name: str) -> None:
        self.engine = engine
        self.name = name
        self.turn = asyncio.Lock()  # one generation at a time

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        path, method = scope["path"], scope["method"]
        if path == "/health":
            await respond(send, 200, b'{"status":"ok"}')
        elif path == "/v1/models" and method in ("GET", "HEAD"):
            model = {"id": self.name, "object": "model", "owned_by": "flagscale"}
            await respond(send, 200, json.dumps({"object": "list", "data": [model]}).encode())
        elif path in self.engine.routes:
            if method != "POST":
                await respond(send, 405, error_body(f"{path} takes POST", "invalid_request_error"))
                return
            await self.api(path, receive, send)
        else:
            routes = ", ".join(self.engine.routes)
            await respond(
                send,
                404,
                error_body(
                    f"{path} is not served by this engine; routes: {routes}", "invalid_request_error", "not_found"
                ),
            )

    async def api(self, route: str, receive, send) -> None:
        try:
            data = _parse(await _read(receive))
            if data.get("model") not in (None, "", self.name):
                raise RequestError(
                    404,
                    f"model {str(data['model'])[:200]!r} is not served here; served: {self.name}",
                    "model_not_found",
                )
            prepared = await asyncio.to_thread(self.engine.prepare, route, data)
            if data.get("stream") is True and isinstance(self.engine, TextEngine):
                await self.stream(self.engine, route, data, prepared, send)
                return
            async with self.turn:
                result: Any = await asyncio.to_thread(self.engine.run, prepared)
            body, _ = self.engine.answer(route, data, prepared, result)
        except RequestError as exc:
            await respond(send, exc.status, error_body(str(exc), exc.kind, exc.code))
            return
        except MediaError as exc:
            await respond(send, 400, error_body(str(exc), "invalid_request_error", exc.code))
            return
        except ConnectionResetError:
            return
        except Exception as exc:  # the model failed on this request: say why, keep serving
            log.exception("request failed")
            await respond(send, 500, error_body(f"{type(exc).__name__}: {exc}"[:1000], "engine_error"))
            return
        await respond(send, 200, json.dumps(body).encode())

    async def stream(self, engine: TextEngine, route: str, data: dict, prepared: Any, send) -> None:
        """Server-sent events as the tokens come (the request was checked before: a failure now is an error
        event, the status being sent already)."""
        loop = asyncio.get_running_loop()
        pieces: asyncio.Queue[str | None] = asyncio.Queue()
        head = engine.stream_head(route)

        def emit(text: str) -> None:
            loop.call_soon_threadsafe(pieces.put_nowait, text)

        def work() -> Reply:
            try:
                kind, what, images, sampling = prepared
                return engine.model.stream(kind, what, images, emit, **sampling)
            finally:
                loop.call_soon_threadsafe(pieces.put_nowait, None)

        async with self.turn:
            headers = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            if head["object"] == "chat.completion.chunk":
                await _event(send, engine.piece(head, "", role=True))
            task = asyncio.ensure_future(asyncio.to_thread(work))
            while (text := await pieces.get()) is not None:
                await _event(send, engine.piece(head, text))
            try:
                events = engine.ending(head, data, await task)
            except Exception as exc:
                log.exception("stream failed")
                events = [{"error": {"message": f"{type(exc).__name__}: {exc}"[:1000], "type": "engine_error"}}]
            for event in events:
                await _event(send, event)
            await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False})


async def _event(send, event: dict) -> None:
    await send(
        {"type": "http.response.body", "body": b"data: " + json.dumps(event).encode() + b"\n\n", "more_body": True}
    )


async def _read(receive) -> bytes:
    parts, size = [], 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            raise ConnectionResetError
        parts.append(message.get("body", b""))
        size += len(parts[-1])
        if size > MAX_BODY:
            raise RequestError(413, f"the request body exceeds {MAX_BODY} bytes")
        if not message.get("more_body", False):
            return b"".join(parts)


def _parse(body: bytes) -> dict:
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        raise RequestError(400, "the request body is not JSON") from None
    if not isinstance(data, dict):
        raise RequestError(400, "the request body must be a JSON object")
    return data


async def respond(send, status: int, body: bytes, content_type: bytes = JSON) -> None:
    headers = [(b"content-type", content_type), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


# ------------------------------------------------------------------------------------------------ main
def main(argv: list[str]) -> int:
    opts = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    if opts.threads:
        import torch

        torch.set_num_threads(opts.threads)
    started = time.perf_counter()
    from flagscale.infer.hf_models import quiet_loading

    quiet_loading()  # no per-file loading bars in the engine's log; errors still surface
    try:
        engine = TextEngine(opts) if opts.engine == "transformers" else ImageEngine(opts)
    except ConfigError as exc:  # not the model the config says: one line in the log, which the runner shows
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    log.info("loaded %s (%s) in %.1f s", opts.model, opts.engine, time.perf_counter() - started)
    import uvicorn

    uvicorn.run(
        Server(engine, opts.served_model_name),
        host=opts.host,
        port=opts.port,
        log_level="warning",
        access_log=False,
        lifespan="on",
        timeout_graceful_shutdown=5,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
