"""Prometheus metrics of one server: its own registry, so that several servers in one
process (tests) never collide, and nothing but serving appears on /metrics."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from stratus.inference.core import EngineProcess
from stratus.inference.engine import Engine
from stratus.inference.request import Event, Request

# Latency buckets from 1 ms (a tiny model's decode step) to a minute (a long queue).
_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
GENERATION = {"/v1/chat/completions", "/v1/completions"}
PATHS = GENERATION | {"/v1/models", "/health", "/metrics"}


class Metrics:
    def __init__(self, engine: Engine | EngineProcess):
        r = self.registry = CollectorRegistry()
        self.requests = Counter(
            "stratus_requests", "HTTP requests by path and status code", ["path", "status"], registry=r
        )
        self.prompt_tokens = Counter(
            "stratus_prompt_tokens", "prompt tokens of accepted requests", registry=r
        )
        self.generation_tokens = Counter("stratus_generation_tokens", "tokens generated", registry=r)
        self.finished = Counter(
            "stratus_request_finish",
            "how each request ended: stop, length, cancelled, error or timeout (waited past "
            "--queue-timeout) for every sequence the engine took; "
            "rejected (4xx) or error (5xx) for a generation call refused before it reached the engine",
            ["reason"],
            registry=r,
        )
        for reason in ("stop", "length", "cancelled", "error", "timeout", "rejected"):
            self.finished.labels(reason)  # every series exists from the start, at 0
        # the engine reports every ending, including those of clients that left
        engine.on_finish = lambda req: self.finished.labels(req.finish_reason).inc()
        queue = Gauge("stratus_queue_depth", "requests waiting to run", registry=r)
        queue.set_function(lambda: engine.load().waiting)
        running = Gauge("stratus_running_requests", "requests running (holding KV blocks)", registry=r)
        running.set_function(lambda: engine.load().running)
        slots = Gauge("stratus_kv_cache_slots", "sequences that may run at once (rows of a step)", registry=r)
        slots.set(engine.capacity.slots)
        blocks = Gauge("stratus_kv_blocks", "KV blocks in the pool", registry=r)
        blocks.set(engine.capacity.blocks)
        free = Gauge("stratus_kv_blocks_free", "KV blocks no sequence holds (free or cached)", registry=r)
        free.set_function(lambda: engine.load().free_blocks)
        hits = Gauge("stratus_prefix_cache_hit_ratio", "prompt blocks found in the prefix cache", registry=r)
        hits.set_function(lambda: engine.load().hit_ratio)
        preempted = Gauge("stratus_preemptions", "requests preempted for KV blocks since start", registry=r)
        preempted.set_function(lambda: engine.load().preemptions)
        alive = Gauge("stratus_engine_alive", "1 while the engine loop runs", registry=r)
        alive.set_function(lambda: float(engine.alive))
        self.ttft = Histogram(
            "stratus_time_to_first_token_seconds",
            "from arrival to the first generated token",
            buckets=_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "stratus_inter_token_latency_seconds",
            "between consecutive tokens of one request",
            buckets=_BUCKETS,
            registry=r,
        )
        self.latency = Histogram(
            "stratus_request_latency_seconds", "from arrival to the last token", buckets=_BUCKETS, registry=r
        )


class Tracker:
    """Feeds one request's events to the latency histograms."""

    def __init__(self, metrics: Metrics, req: Request):
        self.m, self.req, self.last = metrics, req, None

    def see(self, ev: Event) -> None:
        if ev.token is not None:
            self.m.generation_tokens.inc()
            if self.last is None:
                self.m.ttft.observe(ev.time - self.req.arrival)
            else:
                self.m.itl.observe(ev.time - self.last)
            self.last = ev.time
        if ev.finish_reason is not None:
            self.m.latency.observe(ev.time - self.req.arrival)


class CountRequests:
    """ASGI middleware counting every response by path and status (a plain ASGI wrapper:
    Starlette's BaseHTTPMiddleware would buffer streams and hide client disconnects)."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = [500]

        async def send_and_note(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            path = scope["path"] if scope["path"] in PATHS else "other"
            self.metrics.requests.labels(path, str(status[0])).inc()
            if path in GENERATION and not scope.get("state", {}).get("submitted") and status[0] >= 400:
                self.metrics.finished.labels("rejected" if status[0] < 500 else "error").inc()
