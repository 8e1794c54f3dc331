"""Fixtures shared by the engine tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """torch on one thread for a module (`pytestmark = pytest.mark.usefixtures("one_thread")`):
    tiny models gain nothing from threads, and on a loaded machine each OpenMP barrier of a
    multi-threaded kernel waits for a descheduled thread (100x slower here)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
