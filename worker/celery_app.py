"""The Celery app: JSON only, late acks, redelivery on worker loss, one runtime per process."""

from __future__ import annotations

import threading

from celery import Celery
from celery.exceptions import Reject
from celery.worker.consumer import Consumer
from kombu.exceptions import ContentDisallowed

from inferq.logs import get_logger
from inferq.settings import TASK_NAME, Settings

log = get_logger("inferq.celery")


def broker_options(settings: Settings) -> dict:
    """Transport options: a visibility timeout longer than any wait + run, fast restore."""
    url = settings.resolved_broker_url
    if url.startswith(("redis://", "rediss://")):
        return {
            "visibility_timeout": settings.visibility_timeout_s,
            "unacked_restore_interval": 2,
            "unacked_restore_throttle": 1,
            "queue_order_strategy": "priority",
            "priority_steps": list(range(10)),
        }
    if url.startswith("sqla+"):
        return {}  # kombu hands these options to create_engine(); the defaults are right
    return {"visibility_timeout": settings.visibility_timeout_s}


def celery_priority(priority: int) -> int:
    """Our priority (9 runs first) on the Redis transport's scale (0 runs first)."""
    return 9 - priority


class DeadLetterConsumer(Consumer):
    """Records messages Celery cannot run (not JSON, unknown task, malformed) before dropping."""

    def _dead_letter(self, reason: str, message, exc: BaseException | None) -> None:
        try:
            from worker.runtime import record_dead_letter

            record_dead_letter(self.app, reason, message, exc)
        except Exception as err:  # never let bookkeeping take the consumer down
            log.exception("dead_letter.record_failed", error=repr(err))

    def on_decode_error(self, message, exc):
        self._dead_letter("undecodable message", message, exc)
        return super().on_decode_error(message, exc)

    def on_unknown_message(self, body, message):
        self._dead_letter("unknown message format", message, None)
        return super().on_unknown_message(body, message)

    def on_unknown_task(self, body, message, exc):
        self._dead_letter("unknown task name", message, exc)
        return super().on_unknown_task(body, message, exc)

    def on_invalid_task(self, body, message, exc):
        reason = (
            "non-JSON message refused"
            if isinstance(exc, ContentDisallowed)
            else ("invalid task message")
        )
        self._dead_letter(reason, message, exc)
        return super().on_invalid_task(body, message, exc)


def create_app(settings: Settings) -> Celery:
    """A Celery app for producers and workers alike; the worker runtime loads lazily."""
    app = Celery("inferq", broker=settings.resolved_broker_url, set_as_current=False)
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        result_serializer="json",
        event_serializer="json",
        task_ignore_result=True,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_acks_on_failure_or_timeout=True,
        worker_prefetch_multiplier=1,
        worker_hijack_root_logger=False,
        worker_consumer="worker.celery_app:DeadLetterConsumer",
        worker_cancel_long_running_tasks_on_connection_loss=True,
        broker_connection_retry_on_startup=True,
        broker_transport_options=broker_options(settings),
        task_default_queue=settings.queue,
        task_routes={TASK_NAME: {"queue": settings.queue}},
    )
    app.inferq_settings = settings
    app.inferq_lock = threading.Lock()
    app.inferq_runtime = None

    @app.task(name=TASK_NAME, bind=True, shared=False, acks_late=True, reject_on_worker_lost=True)
    def generate(self, **kwargs: object) -> str:
        """Run one generation job (see the README's wire format)."""
        from worker.runtime import get_runtime

        try:
            return get_runtime(self.app).handle(kwargs)
        except Reject:
            raise
        except Exception as exc:  # infrastructure trouble: put the message back
            log.exception("job.requeue", job_id=str(kwargs.get("job_id")), error=repr(exc))
            raise Reject(repr(exc), requeue=True) from exc

    return app
