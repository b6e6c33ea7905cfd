"""The front door of `flagscale serve`: one Python HTTP server in front of the engines, in both modes.

It routes the OpenAI API by the request's `model` to an engine server (llama-server, vLLM, SGLang) that an
`Upstreams` names, forwarding the raw bytes over pooled keep-alive connections, and adds what the engines
lack: Prometheus metrics, WebSocket streaming, API keys, a body limit and a per-request timeout, input that
never makes it answer 500, and a graceful stop (drain, then an error event on what is still streaming).

Direct mode runs it as its own process (`python -m flagscale.serve.frontdoor CONFIG.json`, see
flagscale.serve.direct) over engines on private loopback ports; Ray mode plugs its replicas in through
`Upstreams`. The web stack (starlette, aiohttp, uvicorn, prometheus_client) loads only in `build_app` and
`serve_forever`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from flagscale.serve.media import ImageLimits, limits_of

MiB = 1 << 20


class Upstreams(Protocol):
    """Where requests for a model go."""

    def models(self) -> list[str]: ...

    def replicas(self, model: str) -> int: ...  # for the replicas gauge

    async def acquire(self, model: str) -> str | None: ...  # base URL of a healthy engine; None: unknown model

    def release(self, model: str, url: str) -> None: ...


class StaticUpstreams:
    """A fixed set of engine URLs per model (direct mode); `acquire` picks the least busy one."""

    def __init__(self, urls: Mapping[str, Sequence[str]]) -> None:
        self._busy: dict[str, dict[str, int]] = {m: {u.rstrip("/"): 0 for u in us} for m, us in urls.items()}

    def models(self) -> list[str]:
        return list(self._busy)

    def replicas(self, model: str) -> int:
        return len(self._busy.get(model, ()))

    async def acquire(self, model: str) -> str | None:
        busy = self._busy.get(model)
        if not busy:
            return None
        url = min(busy, key=busy.__getitem__)
        busy[url] += 1
        return url

    def release(self, model: str, url: str) -> None:
        busy = self._busy.get(model)
        if busy and url in busy:
            busy[url] = max(0, busy[url] - 1)


@dataclass(frozen=True)
class DoorSettings:
    """What the front door itself needs (flagscale.serve.settings.ServeSettings carries the same fields)."""

    api_keys: tuple[str, ...] = ()
    max_body_bytes: int = 8 * MiB
    request_timeout: float = 600.0  # seconds per request, streams included; then 504 (or an error event)
    drain_timeout: float = 30.0  # action=stop: how long in-flight requests may still run
    # the media engines (transformers, diffusers): which models run one, their image limits, url-mode images
    engines: tuple[tuple[str, str], ...] = ()  # (model, engine) of every model
    image_limits: ImageLimits = field(default_factory=ImageLimits)
    media_dir: str | None = None  # GET /v1/media/<name> serves the PNGs the diffusers engine wrote here

    def engine(self, model: str) -> str | None:
        return dict(self.engines).get(model)


def door_settings(settings: Any) -> DoorSettings:
    """DoorSettings from a ServeSettings (or anything with the same attributes; missing ones: defaults)."""
    default = DoorSettings()
    return DoorSettings(
        api_keys=tuple(getattr(settings, "api_keys", default.api_keys)),
        max_body_bytes=int(getattr(settings, "max_body_bytes", default.max_body_bytes)),
        request_timeout=float(getattr(settings, "request_timeout", default.request_timeout)),
        drain_timeout=float(getattr(settings, "drain_timeout", default.drain_timeout)),
        engines=tuple((m.name, m.engine) for m in getattr(settings, "models", ())),
        image_limits=limits_of(settings),
        media_dir=str(settings.media_dir) if getattr(settings, "media_dir", None) else None,
    )


def build_app(upstreams: Upstreams, settings: Any):
    """The front door as an ASGI app (Starlette) over `upstreams`; `settings`: ServeSettings or DoorSettings."""
    from flagscale.serve.frontdoor.app import build

    return build(upstreams, settings if isinstance(settings, DoorSettings) else door_settings(settings))


async def serve_forever(app, host: str, port: int, *, log_level: str = "warning") -> None:
    """Serve `app` on host:port until SIGTERM/SIGINT, then drain it (see flagscale.serve.frontdoor.server)."""
    from flagscale.serve.frontdoor.server import serve

    await serve(app, host, port, log_level=log_level)


def exposed_without_keys(host: str, api_keys) -> str | None:
    """The warning for a front door reachable from other machines that anyone may use, else None."""
    import ipaddress

    if api_keys:
        return None
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if loopback:
        return None
    return (
        f"warning: serving on {host} without API keys: anyone who can reach the port can use it "
        "(set experiment.runner.api_keys or $FLAGSCALE_API_KEYS)"
    )
