"""Fixtures for the unit tests."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Callable, Iterator

import pytest
import structlog

from inferq.logs import configure_logging

NOISY = ("httpx", "urllib3", "filelock")


def _ours(handler: logging.Handler) -> bool:
    return type(handler).__module__ != "_pytest.logging"  # pytest re-adds its own per phase


@pytest.fixture
def json_logs() -> Iterator[Callable[[], list[dict]]]:
    """JSON logging into a buffer; yields a reader of the lines so far; restores everything."""
    root = logging.getLogger()
    handlers = [h for h in root.handlers if _ours(h)]
    level = root.level
    noisy = {name: logging.getLogger(name).level for name in NOISY}
    config = structlog.get_config()
    buf = io.StringIO()
    configure_logging("INFO", stream=buf)

    def lines() -> list[dict]:
        return [json.loads(line) for line in buf.getvalue().splitlines()]

    yield lines
    root.handlers[:] = [h for h in root.handlers if not _ours(h)] + handlers
    root.setLevel(level)
    for name, lvl in noisy.items():
        logging.getLogger(name).setLevel(lvl)
    structlog.reset_defaults()
    structlog.configure(**config)
