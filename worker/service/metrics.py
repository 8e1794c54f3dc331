"""The worker's Prometheus metrics, and its HTTP endpoint: `/metrics`, `/healthz` (the
service threads are alive) and `/readyz` (every model loaded, the broker and database
answering, the engine not stalled)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from worker.engine.api import EngineStats

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900)


class Metrics:
    """Every figure the service exports; one registry per worker (tests build several)."""

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        by_model = ["model"]
        self.jobs = Counter("inferq_jobs", "Jobs finished", ["model", "status"], registry=r)
        self.dead_letters = Counter("inferq_dead_letters", "Refused", ["reason"], registry=r)
        self.retries = Counter("inferq_retries", "Retried calls", ["component"], registry=r)
        self.output_tokens = Counter("inferq_output_tokens", "Generated", by_model, registry=r)
        self.spec_drafted_tokens = Counter(
            "inferq_spec_drafted_tokens",
            "Tokens drafted by prompt lookup and verified (docs/speculative.md)",
            by_model,
            registry=r,
        )
        self.spec_accepted_tokens = Counter(
            "inferq_spec_accepted_tokens",
            "Drafted tokens the model kept (each saved a decode step)",
            by_model,
            registry=r,
        )
        self.latency = Histogram(
            "inferq_job_seconds",
            "Queue wait, time to first token and total time of finished jobs",
            ["model", "kind"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.sequences = Gauge("inferq_sequences", "In the engine", ["model", "state"], registry=r)
        self.kv_blocks = Gauge("inferq_kv_blocks", "KV blocks", ["model", "state"], registry=r)
        self.prefix_hit = Gauge(
            "inferq_prefix_hit_ratio", "Prompt tokens served from the cache", by_model, registry=r
        )
        self.step_tokens = Histogram(
            "inferq_step_tokens",
            "Tokens computed per engine step",
            by_model,
            buckets=(1, 8, 32, 64, 128, 256, 512, 1024, 2048, 4096),
            registry=r,
        )
        self.webhook_attempts = Counter(
            "inferq_webhook_attempts", "Webhook POSTs and refusals", ["status"], registry=r
        )
        self.held = Gauge("inferq_held_jobs", "Claimed, not yet written", registry=r)
        self.queue_depth = Gauge("inferq_queue_depth", "Messages on the queue", registry=r)
        self.model_loaded = Gauge(
            "inferq_model_loaded",
            "1: serving; 0: it failed to load (not ready)",
            by_model,
            registry=r,
        )

    def engine_step(self, model: str, stats: EngineStats, step_tokens: int) -> None:
        """After an engine step (memory only: the engine thread calls this)."""
        self.sequences.labels(model, "running").set(stats.running)
        self.sequences.labels(model, "waiting").set(stats.waiting)
        blocks = {"used": stats.blocks_used, "free": stats.blocks_free}
        blocks["evictable"] = stats.blocks_evictable
        for state, n in blocks.items():
            self.kv_blocks.labels(model, state).set(n)
        self.prefix_hit.labels(model).set(stats.hit_rate)
        if step_tokens:
            self.step_tokens.labels(model).observe(step_tokens)


class HealthServer:
    """`/metrics`, `/healthz`, `/readyz` on `port` (0: a free port; see `.port`)."""

    def __init__(
        self,
        metrics: Metrics,
        alive: Callable[[], bool],
        ready: Callable[[], bool],
        port: int,
        host: str = "0.0.0.0",
    ):
        routes = {
            "/metrics": lambda: (200, CONTENT_TYPE_LATEST, generate_latest(metrics.registry)),
            "/healthz": lambda: _status(alive()),
            "/readyz": lambda: _status(ready()),
        }

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                route = routes.get(self.path.split("?")[0])
                code, ctype, body = route() if route else (404, "text/plain", b"not found\n")
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:  # no access log lines
                return

        self.server = ThreadingHTTPServer((host, port), Handler)
        self.port = self.server.server_address[1]
        self._thread = threading.Thread(
            target=self.server.serve_forever, name="inferq-http", daemon=True
        )

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _status(ok: bool) -> tuple[int, str, bytes]:
    return (200, "text/plain", b"ok\n") if ok else (503, "text/plain", b"unavailable\n")
