"""JSON logging: structlog loggers and stdlib (Celery) records come out as one JSON line each."""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime, timedelta

import structlog

from inferq.logs import get_logger


def _recent(stamp: str) -> bool:
    when = datetime.fromisoformat(stamp)
    return when.utcoffset() == timedelta(0) and abs(datetime.now(UTC) - when) < timedelta(minutes=1)


def test_structlog_logger_emits_one_json_line(json_logs) -> None:
    log = get_logger("inferq.test", job_id="j-1").bind(batch_id="b-7")
    log.info("batch.done", size=3)
    (line,) = json_logs()
    assert line["event"] == "batch.done"
    assert (line["job_id"], line["batch_id"], line["size"]) == ("j-1", "b-7", 3)
    assert line["level"] == "info"
    assert line["logger"] == "inferq.test"
    assert _recent(line["timestamp"])


def test_level_filters_debug(json_logs) -> None:
    log = get_logger("inferq.test")
    log.debug("hidden")
    logging.getLogger("inferq.other").debug("hidden too")
    log.warning("shown")
    assert [(x["event"], x["level"]) for x in json_logs()] == [("shown", "warning")]


def test_stdlib_celery_records_are_json(json_logs) -> None:
    logging.getLogger("celery.worker").warning("lost connection to %s", "redis")
    (line,) = json_logs()
    assert line["event"] == "lost connection to redis"
    assert line["level"] == "warning"
    assert line["logger"] == "celery.worker"
    assert _recent(line["timestamp"])


def test_contextvars_are_merged(json_logs) -> None:
    log = get_logger("inferq.test")
    with structlog.contextvars.bound_contextvars(job_id="ctx-9", tenant="acme"):
        log.info("job.start")
        logging.getLogger("celery.app").error("stdlib inside")
    log.info("job.after")
    inside, stdlib, after = json_logs()
    assert (inside["job_id"], inside["tenant"]) == ("ctx-9", "acme")
    assert (stdlib["job_id"], stdlib["level"]) == ("ctx-9", "error")
    assert "job_id" not in after and "tenant" not in after


def test_exceptions_are_structured(json_logs) -> None:
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        get_logger("inferq.test").exception("job.failed", job_id="j-2")
    (line,) = json_logs()
    assert line["level"] == "error" and line["job_id"] == "j-2"
    frames = line["exception"]
    assert frames[0]["exc_type"] == "RuntimeError" and frames[0]["exc_value"] == "boom"


def test_tracebacks_carry_no_frame_locals(json_logs) -> None:
    def connect(password: str) -> None:
        raise ConnectionError("database is away")

    try:
        connect("s3cret-pw")
    except ConnectionError:
        get_logger("inferq.test").exception("sink.write_failed")
    (line,) = json_logs()
    assert line["exception"][0]["frames"], "the traceback itself is kept"
    assert "s3cret-pw" not in json.dumps(line)
