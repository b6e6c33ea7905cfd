"""Prometheus metrics of the front door (one registry per app, so several apps in one process do not clash)."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
TTFT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class _Replicas:
    """flagscale_replicas{model}: asked of the Upstreams at each scrape (Ray mode scales them)."""

    def __init__(self, upstreams: Any) -> None:
        self.upstreams = upstreams

    def collect(self):
        family = GaugeMetricFamily("flagscale_replicas", "Engine replicas serving each model", labels=["model"])
        for model in self.upstreams.models():
            family.add_metric([model], float(self.upstreams.replicas(model)))
        yield family

    def describe(self):
        return []


class Metrics:
    def __init__(self, upstreams: Any) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter(
            "flagscale_requests", "API requests by model, route and status", ["model", "route", "status"], registry=r
        )
        self.latency = Histogram(
            "flagscale_request_duration_seconds",
            "Time from the request to the end of its response (streams: the last byte)",
            ["model", "route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            "flagscale_time_to_first_token_seconds",
            "Streaming requests: time from the request to the engine's first event",
            ["model", "route"],
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter(
            "flagscale_prompt_tokens", "Prompt tokens, from the engine's usage", ["model"], registry=r
        )
        self.completion_tokens = Counter(
            "flagscale_completion_tokens", "Completion tokens, from the engine's usage", ["model"], registry=r
        )
        self.in_flight = Gauge("flagscale_requests_in_flight", "Requests at an engine now", ["model"], registry=r)
        r.register(_Replicas(upstreams))
        for model in upstreams.models():  # every served model shows up from the first scrape
            self.in_flight.labels(model)
            self.prompt_tokens.labels(model)
            self.completion_tokens.labels(model)

    def done(self, model: str, route: str, status: int, seconds: float) -> None:
        self.requests.labels(model, route, str(status)).inc()
        self.latency.labels(model, route).observe(seconds)

    def usage(self, model: str, usage: Any) -> None:
        if not isinstance(usage, dict):
            return
        for key, counter in (("prompt_tokens", self.prompt_tokens), ("completion_tokens", self.completion_tokens)):
            value = usage.get(key)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                counter.labels(model).inc(value)
