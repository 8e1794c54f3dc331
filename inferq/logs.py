"""structlog JSON logging for inferq and for Celery's own log lines."""

from __future__ import annotations

import logging
import sys

import structlog

_SHARED = [
    structlog.contextvars.merge_contextvars,
    structlog.stdlib.add_log_level,
    structlog.stdlib.add_logger_name,
    structlog.processors.TimeStamper(fmt="iso", utc=True),
]


def configure_logging(level: str = "INFO", stream=None) -> None:
    """Route structlog and stdlib (Celery, kombu) records through one JSON renderer."""
    structlog.configure(
        processors=[*_SHARED, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=_SHARED,
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.dict_tracebacks,
            structlog.processors.JSONRenderer(),
        ],
    )
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.captureWarnings(True)  # warnings (e.g. Celery's as-root notice) become JSON lines too
    for noisy in ("httpx", "urllib3", "filelock", "alembic"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def install_celery_hooks() -> None:
    """Stop Celery from taking over logging; our JSON handler stays in charge."""
    from celery.signals import setup_logging

    @setup_logging.connect(weak=False)
    def _keep_ours(**_: object) -> None:
        return None


def get_logger(name: str = "inferq", **bound: object) -> structlog.stdlib.BoundLogger:
    return structlog.get_logger(name, **bound)
