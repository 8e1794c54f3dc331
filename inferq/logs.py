"""structlog JSON logging for inferq and for the libraries' own log lines (kombu, ...)."""

from __future__ import annotations

import logging
import sys

import structlog

# Tracebacks as JSON, without frame locals (they can hold secrets and prompts).
_TRACEBACKS = structlog.processors.ExceptionRenderer(
    structlog.tracebacks.ExceptionDictTransformer(show_locals=False)
)
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
            _TRACEBACKS,
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


def get_logger(name: str = "inferq", **bound: object) -> structlog.stdlib.BoundLogger:
    return structlog.get_logger(name, **bound)


def send_library_logs_to(stream, level: str = "INFO") -> logging.Handler:
    """Add a plain, timestamped handler on the root logger writing to `stream` (a log file),
    lowering the root level to `level` where it is higher. Returns the handler; remove it
    from the root logger (and restore the level) to stop.

    Leaves `configure_logging`'s handlers in place: use it on top, or alone."""
    handler = logging.StreamHandler(stream)
    handler.setFormatter(
        logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
    )
    handler.setLevel(level.upper())
    root = logging.getLogger()
    root.addHandler(handler)
    if root.level > handler.level or root.level == logging.NOTSET:
        root.setLevel(handler.level)
    return handler
