"""The wire contract: task name, queue, and the Celery settings producers and workers share.

A backend app that does not use `InferqClient` sends `TASK_NAME` with JSON kwargs to the
queue (see the README); these settings are what `InferqClient` itself uses.
"""

from __future__ import annotations

from typing import Any

from celery import Celery
from kombu import Exchange, Queue

from api_client.schema import JobMessage
from api_client.signing import signed
from inferq.settings import Settings, is_redis_url

TASK_NAME = "inferq.generate"
PRIORITY_STEPS = list(range(10))


def broker_options(settings: Settings) -> dict[str, Any]:
    """Transport options: a visibility timeout longer than any wait + run, fast restore of a
    dead worker's messages, and priority queues (Redis)."""
    url = settings.resolved_broker_url
    if is_redis_url(url):
        return {
            "visibility_timeout": settings.visibility_timeout_s,
            "unacked_restore_interval": 2,
            "unacked_restore_throttle": 1,
            "queue_order_strategy": "priority",
            "priority_steps": PRIORITY_STEPS,
        }
    if url.startswith("sqla+"):
        return {}  # kombu hands these options to create_engine(); the defaults are right
    return {"visibility_timeout": settings.visibility_timeout_s}


def job_queue(settings: Settings) -> Queue:
    """The job queue as Celery declares it for `send_task(..., queue=name)`."""
    return Queue(settings.queue, Exchange(settings.queue), routing_key=settings.queue)


def celery_priority(priority: int) -> int:
    """Our priority (9 runs first) on the Redis transport's scale (0 runs first)."""
    return 9 - priority


def producer_app(settings: Settings) -> Celery:
    """A Celery app that sends jobs: JSON only, routed to the job queue."""
    app = Celery("inferq", broker=settings.resolved_broker_url, set_as_current=False)
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        result_serializer="json",
        task_ignore_result=True,
        broker_connection_retry_on_startup=True,
        broker_transport_options=broker_options(settings),
        task_default_queue=settings.queue,
        task_routes={TASK_NAME: {"queue": settings.queue}},
    )
    return app


def kwargs_repr(message: JobMessage) -> str:
    """The `kwargsrepr` header monitoring tools (Flower, `celery events`) show for a job:
    who and what, never the prompt (Celery's default would repr every kwarg, the prompt
    included, at a cost per message)."""
    shown = {"job_id": str(message.job_id), "tenant": message.tenant, "model": message.model}
    return repr({**shown, "priority": message.priority})


def send_job(app: Celery, queue: str, message: JobMessage, key: str | None) -> None:
    """Send one job (signed with `key`, when given) with its job id as the Celery task id."""
    app.send_task(
        TASK_NAME,
        kwargs=signed(message.to_wire(), key),
        queue=queue,
        priority=celery_priority(message.priority),
        task_id=str(message.job_id),
        kwargsrepr=kwargs_repr(message),
    )
