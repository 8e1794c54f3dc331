"""Webhook test helpers: a real receiver (a threaded `http.server` on 127.0.0.1 that records
every POST: headers, raw body, when; and answers with scripted status codes), the settings
that turn webhooks on, and the SQL that reads back what happened."""

from __future__ import annotations

import base64
import threading
import time
import uuid
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import sqlalchemy as sa

from storage.repository import Repository


@dataclass(frozen=True)
class Hit:
    path: str
    headers: dict[str, str]
    body: bytes
    at: float  # time.monotonic() when it arrived


class Receiver:
    """`with Receiver(statuses=[500, 500]) as r:` answers 500, 500, then `default`, each
    after `delay_s`; `r.url` is its address, `r.hits` what it got."""

    def __init__(self, statuses: list[int] | None = None, default: int = 200, delay_s: float = 0):
        self.statuses, self.default, self.delay_s = list(statuses or []), default, delay_s
        self.hits: list[Hit] = []
        self.answered = 0  # responses sent
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                with receiver._lock:
                    n = len(receiver.hits)
                    receiver.hits.append(
                        Hit(
                            self.path,
                            {k.lower(): v for k, v in self.headers.items()},
                            body,
                            time.monotonic(),
                        )
                    )
                status = receiver.statuses[n] if n < len(receiver.statuses) else receiver.default
                time.sleep(receiver.delay_s)
                self.send_response(status)
                self.send_header("content-length", "2")
                self.end_headers()
                self.wfile.write(b"ok")
                with receiver._lock:
                    receiver.answered += 1

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True  # a slow answer never holds the test's end
        self.port = self.server.server_address[1]
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def url(self, path: str = "/hook", scheme: str = "http", host: str = "127.0.0.1") -> str:
        return f"{scheme}://{host}:{self.port}{path}"

    def wait_hits(self, n: int, timeout: float = 60.0) -> list[Hit]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if len(self.hits) >= n:
                return list(self.hits)
            time.sleep(0.05)
        raise AssertionError(f"the receiver got {len(self.hits)} requests, not {n}")

    def __enter__(self) -> Receiver:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


SECRET = "whsec_" + base64.b64encode(b"inferq webhook test secret, 32 b").decode()
OTHER = "whsec_" + base64.b64encode(b"the next secret: 24 bytes").decode()
PARAMS = {"max_tokens": 6}


def webhook_settings(settings, **changes):
    """The service settings with webhooks on: the tenant `default` signs with SECRET, and
    127.0.0.1 (the receiver) is allowed."""
    return settings.model_copy(
        update={"webhook_secrets": f"default={SECRET}", "webhook_allow": "127.0.0.1", **changes}
    )


def deliveries(repo: Repository, job_ids: list[uuid.UUID]) -> dict[uuid.UUID, sa.Row]:
    with repo.engine.connect() as conn:
        rows = conn.execute(
            sa.text("SELECT * FROM webhook_deliveries WHERE job_id = ANY(:ids)"), {"ids": job_ids}
        )
        return {r.job_id: r for r in rows}


def attempts(repo: Repository, job_id: uuid.UUID) -> list[sa.Row]:
    with repo.engine.connect() as conn:
        return conn.execute(
            sa.text("SELECT * FROM webhook_attempts WHERE job_id = :id ORDER BY attempt"),
            {"id": job_id},
        ).all()


def settled(repo: Repository, job_ids: list[uuid.UUID], timeout: float = 60.0) -> dict:
    """The delivery rows of `job_ids` once none is pending."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rows = deliveries(repo, job_ids)
        if len(rows) == len(job_ids) and all(r.state != "pending" for r in rows.values()):
            return rows
        time.sleep(0.1)
    raise AssertionError(f"deliveries still pending: {deliveries(repo, job_ids)}")
