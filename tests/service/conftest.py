"""Service fixtures: a worker service in this process on the real Redis and PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from service_helpers import running_worker

from worker.service.app import WorkerService


@pytest.fixture
def fp_worker(service_settings, paged_engine) -> Iterator[WorkerService]:
    """A worker serving the fp32 model (the shared engine fixture)."""
    with running_worker(service_settings, {paged_engine.model_name: paged_engine}) as service:
        yield service
