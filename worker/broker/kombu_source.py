"""Any kombu transport as a message source (the embedded SQLite-file broker, `memory://`), one
message at a time."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from kombu import Connection, Consumer

from api_client.wire import broker_options, job_queue
from inferq.settings import Settings
from worker.broker.source import Received


class KombuSource:
    """Any kombu transport, one message at a time."""

    handles_outlive_connection = False  # kombu gives a closed channel's messages back itself

    GATHER_S = 0.002

    def __init__(self, settings: Settings):
        options = broker_options(settings)
        self.conn = Connection(settings.resolved_broker_url, transport_options=options)
        self.conn.ensure_connection(max_retries=1)
        self._got: list[Received] = []
        self.consumer = Consumer(
            self.conn.channel(),
            queues=[job_queue(settings)],
            on_message=lambda m: self._got.append(
                Received(m.body, m.content_type, m.headers or {}, m)
            ),
            accept=["json"],
            no_ack=False,
        )
        self.consumer.consume()

    def receive(self, limit: int, wait_s: float) -> list[Received]:
        timeout = wait_s
        while len(self._got) < limit:
            try:
                self.conn.drain_events(timeout=timeout)
            except TimeoutError:
                break
            timeout = self.GATHER_S
        got, self._got = self._got, []
        return got

    def ack(self, handles: list[Any]) -> None:
        for message in handles:
            message.ack()

    def requeue(self, handles: list[Any]) -> None:
        for message in handles:
            message.requeue()

    def tick(self, holding: Callable[[], list[Any]]) -> None:
        pass  # no affinity, and the connection holds what this worker took

    def owner(self, key: Callable[[], bytes | None], model: str) -> str | None:
        return None

    def forward(self, message: Received, worker: str) -> bool:
        return False

    def routed(self) -> None:
        pass

    def retire(self) -> None:
        pass

    def close(self) -> None:
        self.conn.release()
