"""Autoscaling in Ray mode, for real: a ramped load of 1 -> 16 -> 1 closed-loop clients drives the tiny model from
1 to 3 replicas and back to 1, within the configured delays, with no failed request.

The app logs each replica event (join, scale, drain, stop) to <exp_dir>/logs/replicas.jsonl; the test prints the
replica count over time from it and checks: the scale-up comes no sooner than upscale_delay_s after the load rose
and the new replicas serve within seconds of it; the scale-down no sooner than downscale_delay_s after the load
fell; a replica joins routing only after its engine answered /health; every replica stopped on scale-down was
drained (nothing left in flight).

With the tiny model a request lasts milliseconds, and scale-down picks idle replicas first, so the ramp's drains
rarely find a request in flight; two fast tests run the controller's own code without a cluster: a replica being
removed leaves routing at once and stops only once the request it had is released, and the target moves exactly
upscale_delay_s / downscale_delay_s after the averaged load asks for it.
"""

from __future__ import annotations

import http.client
import json
import threading
import time

import pytest
from llama_cpp_support import REPO_ROOT, backend_env, flagscale, free_port, installed_backend, tiny_gguf, work_root

CONF = REPO_ROOT / "examples" / "tiny_llama" / "conf"
UP, DOWN, TARGET = 2.0, 4.0, 1  # upscale_delay_s, downscale_delay_s, target_ongoing_requests
LOOK_BACK = 2.0  # flagscale.serve.ray_app.LOOK_BACK: the load is averaged over this many seconds


class Load:
    """Up to 16 closed-loop keep-alive clients; `active` of them post completions, the rest wait."""

    def __init__(self, port: int) -> None:
        self.port, self.active, self.stop = port, 0, threading.Event()
        self.ok, self.failed, self.lock = 0, [], threading.Lock()
        self.threads = [threading.Thread(target=self.client, args=(i,), daemon=True) for i in range(16)]
        for thread in self.threads:
            thread.start()

    def client(self, index: int) -> None:
        body = json.dumps({"model": "tiny", "prompt": "Once upon a time", "max_tokens": 24, "ignore_eos": True})
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        while not self.stop.is_set():
            if index >= self.active:
                time.sleep(0.05)
                continue
            try:
                conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
                response = conn.getresponse()
                data = response.read()
                if response.status != 200 or json.loads(data)["usage"]["completion_tokens"] != 24:
                    raise RuntimeError(f"HTTP {response.status}: {data[:200]!r}")
                with self.lock:
                    self.ok += 1
            except Exception as exc:
                with self.lock:
                    self.failed.append(f"{type(exc).__name__}: {exc}")
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        conn.close()

    def close(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(60)


def _events(run_dir) -> list[dict]:
    path = run_dir / "logs" / "replicas.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _serving(run_dir) -> int:
    events = _events(run_dir)
    return events[-1]["serving"] if events else 0


@pytest.mark.integration
def test_ramped_load_scales_one_to_three_and_back(tmp_path):
    pytest.importorskip("ray")
    root = work_root()
    env = {**backend_env(installed_backend(root)), "TINY_LLAMA_GGUF": str(tiny_gguf(root))}
    run_dir, port = tmp_path / "run", free_port()
    args = [
        "serve=tiny_ray",
        f"experiment.exp_dir={run_dir}",
        f"experiment.runner.port={port}",
        f"+experiment.runner.ray_port={free_port()}",
        "serve.0.replicas=1",
        "serve.0.engine_args.parallel=4",
        "serve.0.autoscaling.min_replicas=1",
        "serve.0.autoscaling.max_replicas=3",
        f"+serve.0.autoscaling.target_ongoing_requests={TARGET}",
        f"+serve.0.autoscaling.upscale_delay_s={UP}",
        f"+serve.0.autoscaling.downscale_delay_s={DOWN}",
    ]
    result = flagscale("serve", str(CONF), *args, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    timeline: list[tuple[float, int, int]] = []  # (seconds, active clients, serving replicas)
    load = Load(port)
    try:
        began = time.monotonic()

        def sample_until(seconds: float, done=lambda: False) -> None:
            end = time.monotonic() + seconds
            while time.monotonic() < end and not done():
                timeline.append((time.monotonic() - began, load.active, _serving(run_dir)))
                time.sleep(0.5)

        load.active = 1
        sample_until(5)
        assert _serving(run_dir) == 1, "one client scaled the model up"
        load.active, rose_at = 16, time.time()
        sample_until(UP + LOOK_BACK + 20, lambda: _serving(run_dir) == 3)
        sample_until(3)  # 16 clients on 3 replicas
        load.active, fell_at = 1, time.time()
        sample_until(DOWN + LOOK_BACK + 20, lambda: _serving(run_dir) == 1)
        sample_until(2)
    finally:
        load.close()
        events = _events(run_dir)
        stopped = flagscale("serve", str(CONF), *args, "action=stop", env=env, cwd=tmp_path)

    print("\nreplica count over time (s, clients, serving replicas):")
    shown = [timeline[0]] + [b for a, b in zip(timeline, timeline[1:], strict=False) if a[1:] != b[1:]]
    for t, clients, serving in shown:
        print(f"  {t:6.1f} s  {clients:2d} clients  {serving} replicas")
    print("events:")
    for e in events:
        extra = {k: v for k, v in e.items() if k not in ("t", "model", "event", "serving", "target", "url")}
        print(f"  {e['t'] - rose_at:+7.2f} s  {e['event']:<5}  serving={e['serving']} target={e['target']}  {extra}")
    print(f"requests: {load.ok} answered, {len(load.failed)} failed")
    assert stopped.returncode == 0, stopped.stderr
    assert not load.failed, load.failed[:5]
    assert max(s for _, _, s in timeline) == 3 and timeline[-1][2] == 1, shown

    scales = [e for e in events if e["event"] == "scale"]
    up = [e for e in scales if e["target"] > e["before"]]
    down = [e for e in scales if e["target"] < e["before"]]
    assert up and up[-1]["target"] == 3 and down and down[-1]["target"] == 1, scales
    assert up[0]["t"] - rose_at >= UP, "scaled up before upscale_delay_s"
    assert up[0]["t"] - rose_at <= UP + LOOK_BACK + 2, "scaled up too late"
    assert down[0]["t"] - fell_at >= DOWN, "scaled down before downscale_delay_s"
    assert down[0]["t"] - fell_at <= DOWN + LOOK_BACK + 2, "scaled down too late"
    joins = [e for e in events if e["event"] == "join"]
    assert len(joins) >= 3
    # routed to only once its engine answered /health (on its node, then from the front door); a request sent to
    # an engine still loading would have got llama-server's 503 and failed above
    assert all(e["t"] >= e["healthy_at"] for e in joins), joins
    stops = [e for e in events if e["event"] == "stop"]
    assert len(stops) >= 2 and all(e["left"] == 0 for e in stops), stops


# ------------------------------------------------------- the controller's own logic, fast (no Ray cluster, no engine)
def _controller(tmp_path, **scaling):
    from flagscale.serve.ray_app import Controller
    from flagscale.serve.settings import from_config

    config = {
        "experiment": {"exp_name": "t", "exp_dir": str(tmp_path), "runner": {"drain_timeout": 5}},
        "serve": [
            {"serve_id": "tiny", "engine": "llama.cpp", "engine_args": {"model": "x.gguf"}, "autoscaling": scaling}
        ],
    }
    return Controller(from_config(config), config)


def _add_serving(pool, *urls):
    from flagscale.serve.ray_app import Replica

    for url in urls:  # replicas whose engines answered: no actor behind them here
        replica = Replica(url.rsplit("/", 1)[1], None, "serving", url)
        pool.replicas.append(replica)
        pool.by_url[url] = replica


def test_scale_down_takes_the_replica_out_of_routing_then_waits_for_its_requests(tmp_path):
    import asyncio

    controller = _controller(tmp_path, min_replicas=1, max_replicas=2)
    pool, upstreams = controller.pools["tiny"], controller.upstreams

    async def scenario() -> list[str]:
        _add_serving(pool, "http://a", "http://b")
        first, second = await upstreams.acquire("tiny"), await upstreams.acquire("tiny")
        assert {first, second} == {"http://a", "http://b"}  # least busy: one each
        draining = asyncio.ensure_future(controller.drain(pool, pool.by_url["http://b"]))
        await asyncio.sleep(0.3)
        routed = [await upstreams.acquire("tiny") for _ in range(4)]  # b is out of routing at once
        for url in routed:
            upstreams.release("tiny", url)
        assert not draining.done()  # b still has the request it had
        upstreams.release("tiny", "http://b")
        await asyncio.wait_for(draining, 2)
        return routed

    assert asyncio.run(scenario()) == ["http://a"] * 4
    assert [r.url for r in pool.replicas] == ["http://a"]
    events = [json.loads(line) for line in (tmp_path / "logs" / "replicas.jsonl").read_text().splitlines()]
    stop = events[-1]
    assert stop["event"] == "stop" and stop["busy_at_drain"] == 1 and stop["left"] == 0 and stop["waited_s"] >= 0.3


def test_the_target_moves_only_after_the_delays(tmp_path):
    import asyncio

    controller = _controller(
        tmp_path, min_replicas=1, max_replicas=3, target_ongoing_requests=2, upscale_delay_s=3, downscale_delay_s=6
    )
    pool, upstreams = controller.pools["tiny"], controller.upstreams

    async def scenario() -> list[tuple[float, int]]:
        _add_serving(pool, "http://a")
        held = [await upstreams.acquire("tiny") for _ in range(6)]  # 6 in flight: 3 replicas wanted
        targets = []
        for step in range(60):  # the controller's ticks, 0.25 s apart, on a clock of our own
            now = 100 + step * 0.25
            if step == 20:  # the load falls to 1 in flight
                for url in held[1:]:
                    upstreams.release("tiny", url)
            controller.autoscale(pool, now)
            targets.append((now - 100, pool.target))
        return targets

    targets = asyncio.run(scenario())
    changes = [(t, n) for (t, n), (_, before) in zip(targets[1:], targets, strict=False) if n != before]
    print(f"\ntarget changes (s, replicas): {changes}")
    # up: upscale_delay_s (3 s) after 6 in flight (3 wanted) began; down: the load falls to 1 in flight at 5 s, the
    # 2 s average wants fewer than 3 from 5.75 s (4 of its 9 samples at 1), then downscale_delay_s (6 s) more
    assert changes == [(3.0, 3), (11.75, 1)], changes
