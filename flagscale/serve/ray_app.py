"""Ray Serve application: one deployment per model whose replicas each run an engine server, behind a router.

`python -m flagscale.serve.ray_app CONFIG.json` (started by flagscale.serve.ray_cluster) connects to the
Ray head, deploys, and stays up until it is stopped. The router routes the OpenAI API by the request's
`model`; an unknown model gets HTTP 404 with a JSON error, a body that is not JSON a 400, a replica lost
mid-request a 503 the client may retry, and a streaming request the engine refuses keeps the engine's status
and JSON error. A replica whose engine process dies fails Serve's health check
and is replaced; autoscaling bounds come from the task YAML.
"""

# No `from __future__ import annotations` here: Ray pickles the router class by value, and FastAPI must see
# the real `Request` annotation, not a string it would look up in globals the pickle did not carry.
import ctypes
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from flagscale.serve.settings import ServeSettings, from_config

ROUTED = ("completions", "chat/completions", "embeddings")


def _error(status: int, message: str, kind: str, code: str | None = None):
    from starlette.responses import JSONResponse

    return JSONResponse({"error": {"message": message, "type": kind, "code": code}}, status_code=status)


def _die_with_parent() -> None:
    """In the engine child: get SIGTERM when the replica process dies, however it dies (SIGKILL included)."""
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def deployments(settings: ServeSettings, config: dict):
    """The Serve application: Router(handles of one EngineReplica deployment per model)."""
    from fastapi import FastAPI, Request
    from ray import serve
    from starlette.responses import Response, StreamingResponse

    class EngineReplica:
        def __init__(self, config: dict, model: str) -> None:
            import httpx

            from flagscale.serve.engines import command_for, full_env
            from flagscale.serve.health import free_port, wait_ready

            settings = from_config(config)
            spec = settings.model(model)
            context = serve.get_replica_context()
            tag = getattr(getattr(context, "replica_id", None), "unique_id", None) or str(os.getpid())
            port = free_port()
            command = command_for(spec, settings, "127.0.0.1", port, check=False, name=f"{model}-{tag}")
            logs = settings.run_dir / "logs"
            logs.mkdir(parents=True, exist_ok=True)
            log = logs / f"replica-{command.name}.log"
            with open(log, "ab") as out:
                self.proc = subprocess.Popen(
                    command.cmd,
                    env=full_env(command),
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    preexec_fn=_die_with_parent,
                )
            wait_ready(
                command.health_url,
                settings.ready_timeout,
                lambda: self.proc.poll() is None,
                f"replica {command.name} ({command.cmd[0]})",
                log,
            )
            self.client = httpx.AsyncClient(base_url=command.base_url, timeout=httpx.Timeout(None, connect=5.0))
            # where tests and operators find each replica's processes: the engine and the replica actor
            records = settings.run_dir / "replicas"
            records.mkdir(parents=True, exist_ok=True)
            self.record = records / f"{command.name}.json"
            self.record.write_text(
                json.dumps(
                    {
                        "model": model,
                        "replica": tag,
                        "engine_pid": self.proc.pid,
                        "replica_pid": os.getpid(),
                        "url": command.base_url,
                        "started_at": time.time(),
                    }
                )
                + "\n"
            )

        async def forward(self, path: str, body: bytes) -> tuple[int, bytes, str]:
            import httpx

            try:
                response = await self.client.post(path, content=body, headers={"Content-Type": "application/json"})
            except httpx.HTTPError as exc:
                message = {
                    "error": {
                        "message": f"engine unavailable ({type(exc).__name__}); retry",
                        "type": "unavailable",
                        "code": None,
                    }
                }
                return 503, json.dumps(message).encode(), "application/json"
            return response.status_code, response.content, response.headers.get("content-type", "application/json")

        async def stream(self, path: str, body: bytes):
            """Yields (status, content type) first, then the engine's raw body chunks."""
            import httpx

            started = False
            try:
                async with self.client.stream(
                    "POST", path, content=body, headers={"Content-Type": "application/json"}
                ) as response:
                    started = True
                    yield response.status_code, response.headers.get("content-type", "text/event-stream")
                    async for chunk in response.aiter_raw():
                        yield chunk
            except httpx.HTTPError as exc:
                if started:  # the status has gone out: all that is left is to cut the stream short
                    raise
                message = {
                    "error": {
                        "message": f"engine unavailable ({type(exc).__name__}); retry",
                        "type": "unavailable",
                        "code": None,
                    }
                }
                yield 503, "application/json"
                yield json.dumps(message).encode()

        def check_health(self) -> None:
            code = self.proc.poll()
            if code is not None:
                raise RuntimeError(f"engine process {self.proc.pid} exited ({code})")

        def __del__(self) -> None:
            proc = getattr(self, "proc", None)
            if proc is not None and proc.poll() is None:
                proc.terminate()
            record = getattr(self, "record", None)
            if record is not None:
                record.unlink(missing_ok=True)

    app = FastAPI()

    class Router:
        def __init__(self, names: list[str], *handles) -> None:
            self.handles = dict(zip(names, handles, strict=False))

        @app.get("/health")
        async def health(self):
            return {"status": "ok"}

        @app.get("/v1/models")
        async def models(self):
            return {
                "object": "list",
                "data": [{"id": n, "object": "model", "owned_by": "flagscale"} for n in self.handles],
            }

        @app.post("/v1/{endpoint:path}")
        async def route(self, endpoint: str, request: Request):
            if endpoint not in ROUTED:
                return _error(
                    404,
                    f"/v1/{endpoint} is not served; routes: " + ", ".join(f"/v1/{r}" for r in ROUTED),
                    "invalid_request_error",
                    "not_found",
                )
            body = await request.body()
            try:
                data = json.loads(body)
            except ValueError as exc:
                return _error(400, f"the request body is not JSON: {exc}", "invalid_request_error")
            if not isinstance(data, dict):
                return _error(400, "the request body must be a JSON object", "invalid_request_error")
            name = data.get("model") or (next(iter(self.handles)) if len(self.handles) == 1 else None)
            handle = self.handles.get(name) if isinstance(name, str) else None
            if handle is None:
                return _error(
                    404,
                    f"model {name!r} is not served here; served: {', '.join(self.handles)}",
                    "invalid_request_error",
                    "model_not_found",
                )
            if data.get("stream"):
                # The engine's status comes first, so an engine error (a bad request, say) keeps its 4xx/5xx
                # and JSON body instead of going out as a 200 event stream.
                chunks = handle.options(stream=True).stream.remote(f"/v1/{endpoint}", body)
                try:
                    status, kind = await chunks.__anext__()
                except Exception as exc:  # the replica died before the engine answered: the client may retry
                    return _error(503, f"replica of {name} unavailable ({type(exc).__name__}); retry", "unavailable")
                if status != 200:
                    return Response(b"".join([chunk async for chunk in chunks]), status_code=status, media_type=kind)
                return StreamingResponse(chunks, status_code=status, media_type=kind)
            try:
                status, content, kind = await handle.forward.remote(f"/v1/{endpoint}", body)
            except Exception as exc:  # the replica died mid-request (RayActorError, ...): the client may retry
                return _error(503, f"replica of {name} unavailable ({type(exc).__name__}); retry", "unavailable")
            return Response(content, status_code=status, media_type=kind)

    handles = []
    for spec in settings.models:
        options: dict = {
            "name": spec.name,
            "ray_actor_options": {"num_cpus": spec.num_cpus},
            "health_check_period_s": settings.health_check_period_s,
            "health_check_timeout_s": 30,
            "max_ongoing_requests": 64,
        }
        if spec.max_replicas:
            options["autoscaling_config"] = {
                "min_replicas": spec.min_replicas or 0,
                "max_replicas": spec.max_replicas,
                "initial_replicas": max(spec.min_replicas or 0, min(spec.replicas, spec.max_replicas)),
                "target_ongoing_requests": 4,
            }
        else:
            options["num_replicas"] = spec.replicas
        # Ray's stubs type serve.deployment(cls) as the decorator overload; it returns a Deployment here.
        handles.append(serve.deployment(EngineReplica).options(**options).bind(config, spec.name))  # type: ignore[attr-defined]
    router = serve.deployment(serve.ingress(app)(Router)).options(  # type: ignore[attr-defined]
        name="router", ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1000
    )
    return router.bind([m.name for m in settings.models], *handles)


def main(argv: list[str]) -> int:
    import ray
    from ray import serve

    config = json.loads(Path(argv[0]).read_text())
    settings = from_config(config)
    address = config["_ray_address"]
    ray.init(address=address, namespace=f"flagscale-{settings.exp_name}", log_to_driver=False)
    serve.start(http_options={"host": settings.host, "port": settings.port})
    serve.run(deployments(settings, config), name=settings.exp_name, route_prefix="/")
    print(
        f"deployed {', '.join(m.name for m in settings.models)} on Ray Serve at {settings.host}:{settings.port}",
        flush=True,
    )
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    done.wait()
    try:  # the head goes down next; shutting Serve down first stops replicas (and their engines) cleanly
        serve.shutdown()
    except Exception as exc:  # best effort: the head's process group is stopped anyway
        print(f"serve.shutdown: {exc}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
