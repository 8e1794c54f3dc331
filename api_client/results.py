"""A job's state on Redis, in Celery's own result-backend format, and the keys around it.

Workers write; Celery's `AsyncResult`, `InferqClient` and `AsyncInferqClient` read (see
docs/results.md). No I/O here: what the key and its notification hold, and how to read them.

- `celery-task-meta-<job id>` (Celery's `RedisBackend` key): JSON `{"status", "result",
  "traceback", "children", "date_done", "task_id"}`, SET with an expiry and PUBLISHed on the
  channel of the same name, which wakes Celery's `ResultConsumer` and our waiters. The state:
  running -> STARTED, done -> SUCCESS, failed and expired -> FAILURE, cancelled -> REVOKED;
  a queued (or unknown) job has no key: Celery's PENDING.
- `result` is the job as `JobView.to_dict()` writes it (STARTED, SUCCESS), or the exception
  `.get()` raises (FAILURE, REVOKED: Celery's JSON form, `exc_type`, `exc_message`,
  `exc_module`), the job then under the extra key `job`.
- `inferq:stream:<job id>`: a Redis Stream of the job's text deltas (`api_client.streams`).
- `inferq:cancel:<job id>`: a set of cancel requests (`api_client.cancels`), announced on the
  channel `inferq:cancel`.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

from celery.exceptions import TaskRevokedError

from storage.records import JobStatus, JobView

RESULT_PREFIX = "celery-task-meta-"  # celery.backends.base.KeyValueStoreBackend.task_keyprefix
STREAM_PREFIX = "inferq:stream:"
CANCEL_PREFIX = "inferq:cancel:"
CANCEL_CHANNEL = "inferq:cancel"
PIDBOX_EXCHANGE = "celery.pidbox"  # Celery's control exchange ("celery" + ".pidbox")
MAX_META_BYTES = 8 << 20  # a meta larger than this is not ours: never parsed

PENDING, STARTED, SUCCESS = "PENDING", "STARTED", "SUCCESS"
FAILURE, REVOKED = "FAILURE", "REVOKED"
CELERY_STATE = {
    JobStatus.QUEUED: PENDING,
    JobStatus.RUNNING: STARTED,
    JobStatus.DONE: SUCCESS,
    JobStatus.FAILED: FAILURE,
    JobStatus.EXPIRED: FAILURE,
    JobStatus.CANCELLED: REVOKED,
}
READY_STATES = frozenset({SUCCESS, FAILURE, REVOKED})


class JobFailed(Exception):
    """A job failed; its only argument is the reason. A Celery producer's `.get()` raises
    it (Celery builds a class of this name when this module is not loaded)."""


class JobExpired(JobFailed):
    """A job's deadline (`ttl_s`) passed before it finished."""


def job_error(view: JobView) -> Exception:
    """What a job that ended without a result raises where its result was asked for: the
    exception `.get()` raises a Celery producer."""
    if view.status == JobStatus.CANCELLED:
        return TaskRevokedError("cancelled")
    kind = JobExpired if view.status == JobStatus.EXPIRED else JobFailed
    return kind(view.error or view.status)


def result_key(job_id: uuid.UUID | str) -> str:
    return f"{RESULT_PREFIX}{job_id}"


def stream_key(job_id: uuid.UUID | str) -> str:
    return f"{STREAM_PREFIX}{job_id}"


def cancel_key(job_id: uuid.UUID | str) -> str:
    return f"{CANCEL_PREFIX}{job_id}"


def pidbox_channel(db: int) -> str:
    """Where kombu's Redis transport PUBLISHes Celery's broadcast commands (`revoke`...)."""
    return f"/{db}.{PIDBOX_EXCHANGE}"


def _exception(view: JobView) -> dict[str, Any]:
    """Celery's JSON form (`Backend.prepare_exception`) of the job's `job_error`."""
    exc = job_error(view)
    kind = type(exc)
    return {
        "exc_type": kind.__qualname__,
        "exc_message": list(exc.args),
        "exc_module": kind.__module__,
    }


def to_meta(view: JobView) -> dict[str, Any] | None:
    """The Celery meta of a job's state (None: queued, which has no key)."""
    state = CELERY_STATE[JobStatus(view.status)]
    if state == PENDING:
        return None
    job = view.to_dict()
    meta: dict[str, Any] = {
        "status": state,
        "result": job if state in (STARTED, SUCCESS) else _exception(view),
        "traceback": None,
        "children": [],
        "date_done": job["finished_at"] if state in READY_STATES else None,
        "task_id": job["id"],
    }
    if state in (FAILURE, REVOKED):
        meta["job"] = job
    return meta


def encode(meta: dict[str, Any]) -> bytes:
    return json.dumps(meta, separators=(",", ":")).encode()


def from_meta(raw: bytes | str | None, job_id: uuid.UUID | None = None) -> JobView | None:
    """The job a stored meta describes; None when there is none, or it is not a job meta of
    ours (of `job_id`, when given): a malformed or foreign value is treated as absent, never
    raised."""
    if raw is None or len(raw) > MAX_META_BYTES:
        return None
    try:
        meta = json.loads(raw)
        if meta.get("status") not in CELERY_STATE.values():
            return None
        data = meta.get("job") if meta["status"] in (FAILURE, REVOKED) else meta.get("result")
        view = JobView.from_dict(data)
        if CELERY_STATE.get(JobStatus(view.status)) != meta["status"]:
            return None
    except (ValueError, TypeError, KeyError, AttributeError, RecursionError):
        return None
    return view if job_id is None or view.id == job_id else None
