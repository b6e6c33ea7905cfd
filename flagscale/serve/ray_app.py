"""Ray mode: the front door in front of engine replicas that are plain Ray actors, scaled with the load.

`python -m flagscale.serve.ray_app CONFIG.json` (started by flagscale.serve.ray_cluster) connects to the Ray
head as a driver and runs, in one process and one event loop:

* the front door (flagscale.serve.frontdoor, the same HTTP server as in direct mode) with `RayUpstreams`: a
  request takes one hop, front door -> engine, over pooled keep-alive connections. Ray is not on the request
  path at all; it places the replicas (CPUs per replica, worker nodes) and owns their lifetime.
* the `Controller`: per model, `EngineReplica` actors that each run one engine server. A replica joins
  routing only once its engine answers /health from here; a replica whose engine exits (or whose actor is
  lost) leaves routing at once and is replaced; an engine that stops answering /health twice in a row too.
  With `autoscaling`, the replica count follows the model's in-flight requests (counted by the front door's
  acquire/release) between min_replicas and max_replicas, after upscale_delay_s / downscale_delay_s; a
  replica being removed first leaves routing, then its in-flight requests finish (up to drain_timeout),
  then its engine stops.

What happens is logged to the app's log and, one JSON line per event, to `<exp_dir>/logs/replicas.jsonl`
(join, lost, scale, drain, stop: with the replica counts), so the replica count over time can be read back.
"""

from __future__ import annotations

import asyncio
import ctypes
import json
import math
import os
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flagscale.errors import LaunchError
from flagscale.serve.settings import ModelSpec, ServeSettings, from_config

TICK = 0.25  # seconds between the controller's looks at the load
LOOK_BACK = 2.0  # seconds of in-flight samples averaged into the load


def _die_with_parent() -> None:
    """In the engine child: get SIGTERM when the replica process dies, however it dies (SIGKILL included)."""
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


# ------------------------------------------------------------------------------------------ the replica
class EngineReplica:
    """A Ray actor (async): one engine server on the node Ray placed it on. Constructed = engine healthy.

    On the head the engine listens on loopback; on a worker node on the node's address, which the front door
    on the head must reach (the API keys are the front door's: keep worker nodes on a private network).
    """

    def __init__(self, config: dict, model: str, tag: str, head_node: str) -> None:
        import ray

        from flagscale.serve.engines import command_for, full_env
        from flagscale.serve.health import free_port, wait_ready

        settings = from_config(config)
        spec = settings.model(model)
        node = ray.get_runtime_context().get_node_id()
        host = (
            "127.0.0.1"
            if node == head_node
            else next(n["NodeManagerAddress"] for n in ray.nodes() if n["NodeID"] == node)
        )
        command = command_for(spec, settings, host, free_port(host), check=False, name=f"{model}-{tag}")
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
        # where tests and operators find each replica's processes: the engine and the replica actor
        records = settings.run_dir / "replicas"
        records.mkdir(parents=True, exist_ok=True)
        self.record = records / f"{command.name}.json"
        self.info = {
            "model": model,
            "replica": tag,
            "engine_pid": self.proc.pid,
            "replica_pid": os.getpid(),
            "url": command.base_url,
            "started_at": time.time(),
        }
        self.record.write_text(json.dumps(self.info) + "\n")

    def describe(self) -> dict:
        return {**self.info, "record": str(self.record)}

    async def watch(self) -> int:
        """The engine's exit status, once it exits."""
        return await asyncio.to_thread(self.proc.wait)

    async def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM the engine (SIGKILL after `timeout`); the record goes with it."""
        self.record.unlink(missing_ok=True)
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                await asyncio.to_thread(self.proc.wait, timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                await asyncio.to_thread(self.proc.wait)
        return self.proc.returncode


# ------------------------------------------------------------------------------ routing: RayUpstreams
@dataclass(eq=False)
class Replica:
    tag: str
    actor: Any
    state: str = "starting"  # starting -> serving -> draining -> stopped; or cancelled / lost
    url: str = ""
    record: str = ""
    busy: int = 0  # requests the front door has in flight on it
    failures: int = 0  # /health probes failed in a row


@dataclass(eq=False)
class Pool:
    """One model's replicas and its load."""

    spec: ModelSpec
    target: int
    replicas: list[Replica] = field(default_factory=list)
    by_url: dict[str, Replica] = field(default_factory=dict)
    waiting: int = 0  # requests waiting for a first serving replica
    turn: int = 0  # rotates the pick among equally busy replicas
    samples: list[tuple[float, int]] = field(default_factory=list)
    up_since: float | None = None
    down_since: float | None = None
    failed_starts: int = 0  # in a row: the next start waits 2, 4, ... up to 30 s
    retry_at: float = 0.0
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def serving(self) -> list[Replica]:
        return [r for r in self.replicas if r.state == "serving"]

    def live(self) -> list[Replica]:
        return [r for r in self.replicas if r.state in ("starting", "serving")]

    def in_flight(self) -> int:
        return sum(r.busy for r in self.replicas) + self.waiting


class NoReplica(LookupError):
    """A served model with no healthy replica within the wait: the front door answers 503 (retry)."""


class RayUpstreams:
    """The front door's Upstreams in Ray mode: the serving replicas of each model, least busy first."""

    def __init__(self, pools: dict[str, Pool], wait_s: float) -> None:
        self.pools = pools
        self.wait_s = wait_s  # how long a request waits for a replica when none serves (starting, replaced)

    def models(self) -> list[str]:
        return list(self.pools)

    def replicas(self, model: str) -> int:
        pool = self.pools.get(model)
        return len(pool.serving()) if pool else 0

    async def acquire(self, model: str) -> str | None:
        pool = self.pools.get(model)
        if pool is None:
            return None
        serving = pool.serving()
        if not serving:
            serving = await self._wait_for_one(pool)
        least = min(r.busy for r in serving)
        idle = [r for r in serving if r.busy == least]
        pool.turn += 1
        replica = idle[pool.turn % len(idle)]
        replica.busy += 1
        return replica.url

    async def _wait_for_one(self, pool: Pool) -> list[Replica]:
        pool.waiting += 1  # counts as load: a model scaled to zero starts a replica
        try:
            deadline = time.monotonic() + self.wait_s
            while not (serving := pool.serving()):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise NoReplica(f"no healthy replica of {pool.spec.name} within {self.wait_s:.0f} s; retry")
                pool.changed.clear()
                try:
                    await asyncio.wait_for(pool.changed.wait(), left)
                except TimeoutError:
                    pass
            return serving
        finally:
            pool.waiting -= 1

    def release(self, model: str, url: str) -> None:
        pool = self.pools.get(model)
        replica = pool.by_url.get(url) if pool else None
        if replica is not None and replica.busy > 0:
            replica.busy -= 1


# ------------------------------------------------------------------------------------- the controller
def desired_replicas(spec: ModelSpec, load: float) -> int:
    """Replicas for an average of `load` in-flight requests, within the model's bounds."""
    low = spec.min_replicas if spec.min_replicas is not None else spec.replicas
    high = spec.max_replicas if spec.max_replicas is not None else spec.replicas
    want = math.ceil(load / spec.scaling.target_ongoing_requests - 1e-9) if load > 0 else 0
    return max(low, min(high, want))


def initial_replicas(spec: ModelSpec) -> int:
    if spec.max_replicas is None:
        return spec.replicas
    return max(spec.min_replicas or 0, min(spec.replicas, spec.max_replicas))


class Controller:
    """Keeps each model's replicas at its target, moves the target with the load, replaces lost replicas."""

    def __init__(self, settings: ServeSettings, config: dict) -> None:
        self.settings = settings
        self.config = config
        self.head_node: str | None = None  # Ray's id of the head node, where this driver runs
        self.drain_timeout = settings.drain_timeout  # scale-down: how long a replica's requests may finish
        self.pools = {spec.name: Pool(spec, initial_replicas(spec)) for spec in settings.models}
        self.upstreams = RayUpstreams(self.pools, max(30.0, settings.ready_timeout))
        self.events = settings.run_dir / "logs" / "replicas.jsonl"
        self.events.parent.mkdir(parents=True, exist_ok=True)
        self.tasks: set[asyncio.Task] = set()
        self.closing = False
        self.http: Any = None

    # ---- bookkeeping
    def event(self, pool: Pool, kind: str, replica: Replica | None = None, **extra: Any) -> None:
        record = {
            "t": round(time.time(), 3),
            "model": pool.spec.name,
            "event": kind,
            "serving": len(pool.serving()),
            "target": pool.target,
            **({"replica": replica.tag, "url": replica.url} if replica else {}),
            **extra,
        }
        with open(self.events, "a") as out:
            out.write(json.dumps(record) + "\n")
        print(" ".join(f"{k}={v}" for k, v in record.items() if k != "t"), flush=True)
        pool.changed.set()

    def spawn(self, coro) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:  # a bug, not a replica's failure: say so
            print(f"controller task failed: {task.exception()!r}", file=sys.stderr, flush=True)

    # ---- lifecycle of one replica
    async def launch(self, pool: Pool) -> bool:
        """Start one replica; it joins routing once its engine answers /health from here."""
        import ray

        tag = uuid.uuid4().hex[:8]
        if self.head_node is None:
            self.head_node = ray.get_runtime_context().get_node_id()
        actor_class = ray.remote(EngineReplica).options(
            num_cpus=pool.spec.num_cpus, max_restarts=0, name=f"{pool.spec.name}-{tag}"
        )
        replica = Replica(tag, actor_class.remote(self.config, pool.spec.name, tag, self.head_node))
        pool.replicas.append(replica)
        try:
            info = await replica.actor.describe.remote()  # returns once the engine is healthy on its node
            replica.url, replica.record = info["url"], info["record"]
            if not await self._answers(replica.url, tries=int(self.settings.ready_timeout * 4)):
                raise LaunchError(f"{replica.url}/health does not answer from the front door")
        except Exception as exc:  # the engine did not start (its log says why): tried again after a pause
            pool.failed_starts += 1
            pool.retry_at = time.monotonic() + min(30.0, 2.0**pool.failed_starts)
            print(f"replica {pool.spec.name}-{tag} failed to start: {exc}", file=sys.stderr, flush=True)
            await self._finish(pool, replica, "failed")
            return False
        pool.failed_starts = 0
        if replica.state != "starting":  # scaled down while it started
            await self._finish(pool, replica, "stopped")
            return False
        replica.state = "serving"
        pool.by_url[replica.url] = replica
        self.event(pool, "join", replica, healthy_at=info["started_at"])
        self.spawn(self._watch(pool, replica))
        return True

    async def _answers(self, url: str, tries: int = 1) -> bool:
        for attempt in range(tries):
            try:
                async with self.http.get(url + "/health") as response:
                    if response.status == 200:
                        return True
            except Exception:
                pass
            if attempt + 1 < tries:
                await asyncio.sleep(0.25)
        return False

    async def _watch(self, pool: Pool, replica: Replica) -> None:
        """An engine that exits, or a replica actor that is lost, leaves routing at once and is replaced."""
        try:
            why = f"engine exited ({await replica.actor.watch.remote()})"
        except Exception as exc:
            why = f"replica lost ({type(exc).__name__})"
        if replica.state in ("serving", "draining"):
            await self.lose(pool, replica, why)

    async def lose(self, pool: Pool, replica: Replica, why: str) -> None:
        was = replica.state
        replica.state = "lost"
        self.event(pool, "lost", replica, why=why, was=was, busy=replica.busy)
        await self._finish(pool, replica, "lost")

    async def drain(self, pool: Pool, replica: Replica) -> None:
        """Out of routing now; its in-flight requests finish (up to drain_timeout); then its engine stops."""
        replica.state = "draining"
        busy, began = replica.busy, time.monotonic()
        self.event(pool, "drain", replica, busy=busy)
        while replica.busy and time.monotonic() - began < self.drain_timeout:
            await asyncio.sleep(0.05)
        if replica.state != "draining":  # lost meanwhile
            return
        self.event(
            pool, "stop", replica, busy_at_drain=busy, left=replica.busy, waited_s=round(time.monotonic() - began, 2)
        )
        await self._finish(pool, replica, "stopped")

    async def _finish(self, pool: Pool, replica: Replica, state: str) -> None:
        replica.state = state
        pool.by_url.pop(replica.url, None)
        if replica.actor is not None:
            await self._stop_actor(replica.actor)
        if replica.record:
            Path(replica.record).unlink(missing_ok=True)
        if replica in pool.replicas:
            pool.replicas.remove(replica)
        pool.changed.set()

    @staticmethod
    async def _stop_actor(actor) -> None:
        import ray

        try:
            await asyncio.wait_for(actor.stop.remote(), 15)
        except Exception:  # dead already, or stuck: killing the actor takes the engine (PDEATHSIG)
            pass
        try:
            ray.kill(actor)
        except Exception:
            pass

    # ---- the loop
    async def start(self) -> None:
        """Every model's initial replicas, all serving (or LaunchError)."""
        import aiohttp

        self.http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2.0))
        launches = [self.launch(pool) for pool in self.pools.values() for _ in range(pool.target)]
        if not all(await asyncio.gather(*launches)):
            raise LaunchError("a replica did not start: see the replica logs in the run folder's logs/")
        for pool in self.pools.values():
            self.event(pool, "ready")

    async def run(self) -> None:
        last_probe = time.monotonic()
        while not self.closing:
            now = time.monotonic()
            for pool in self.pools.values():
                self.autoscale(pool, now)
                self.reconcile(pool)
            if now - last_probe >= self.settings.health_check_period_s:
                last_probe = now
                for pool in self.pools.values():
                    for replica in pool.serving():
                        self.spawn(self._probe(pool, replica))
            await asyncio.sleep(TICK)

    async def _probe(self, pool: Pool, replica: Replica) -> None:
        if await self._answers(replica.url):
            replica.failures = 0
            return
        replica.failures += 1
        if replica.failures >= 2 and replica.state == "serving":
            await self.lose(pool, replica, "engine /health failed twice")

    def autoscale(self, pool: Pool, now: float) -> None:
        spec = pool.spec
        if spec.max_replicas is None:
            return
        pool.samples.append((now, pool.in_flight()))
        pool.samples = [(t, n) for t, n in pool.samples if now - t <= LOOK_BACK]
        load = sum(n for _, n in pool.samples) / len(pool.samples)
        want = desired_replicas(spec, load)
        if pool.target == 0 and pool.waiting:  # scaled to zero and asked for: no delay
            want = max(want, 1)
            pool.up_since = now - spec.scaling.upscale_delay_s
        if want > pool.target:
            pool.down_since = None
            pool.up_since = now if pool.up_since is None else pool.up_since
            if now - pool.up_since >= spec.scaling.upscale_delay_s:
                self._scale(pool, want, load)
        elif want < pool.target:
            pool.up_since = None
            pool.down_since = now if pool.down_since is None else pool.down_since
            if now - pool.down_since >= spec.scaling.downscale_delay_s:
                self._scale(pool, want, load)
        else:
            pool.up_since = pool.down_since = None

    def _scale(self, pool: Pool, want: int, load: float) -> None:
        before, pool.target = pool.target, want
        pool.up_since = pool.down_since = None
        self.event(pool, "scale", before=before, load=round(load, 2))

    def reconcile(self, pool: Pool) -> None:
        live = pool.live()
        if time.monotonic() >= pool.retry_at:
            for _ in range(pool.target - len(live)):
                self.spawn(self.launch(pool))
        if len(live) > pool.target:
            # not-yet-serving ones first, then the least busy, newest first
            order = sorted(live, key=lambda r: (r.state == "serving", r.busy, -pool.replicas.index(r)))
            for replica in order[: len(live) - pool.target]:
                if replica.state == "starting":
                    replica.state = "cancelled"  # launch() stops it once its actor answers
                else:
                    self.spawn(self.drain(pool, replica))

    async def close(self) -> None:
        """Stop every replica (the front door has drained its requests by now)."""
        self.closing = True
        replicas = [(pool, r) for pool in self.pools.values() for r in list(pool.replicas)]
        await asyncio.gather(*(self._finish(pool, r, "stopped") for pool, r in replicas), return_exceptions=True)
        if self.http is not None:
            await self.http.close()


# ------------------------------------------------------------------------------------------------ main
async def serve(settings: ServeSettings, config: dict) -> None:
    from flagscale.serve import frontdoor

    controller = Controller(settings, config)
    try:
        await controller.start()
        loop = controller.spawn(controller.run())
        app = frontdoor.build_app(controller.upstreams, settings)
        # ray_cluster waits for the front door's /health and this line (every initial replica serves)
        print(f"deployed {', '.join(m.name for m in settings.models)} on Ray", flush=True)
        await frontdoor.serve_forever(app, settings.host, settings.port)  # until SIGTERM, then drained
        loop.cancel()
    finally:
        await controller.close()


def main(argv: list[str]) -> int:
    import ray

    config = json.loads(Path(argv[0]).read_text())
    settings = from_config(config)
    address = config["_ray_address"]
    ray.init(address=address, namespace=f"flagscale-{settings.exp_name}", log_to_driver=False)
    try:
        run = asyncio.run
        try:
            import uvloop  # the front door's loop of choice (as in direct mode); Ray's futures work on it too

            run = uvloop.run
        except ImportError:
            pass
        run(serve(settings, config))
    except LaunchError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
