"""Speculative decoding's per-job counts through the worker (docs/speculative.md): a job the
real model runs with drafting on has its drafted and accepted tokens in `job_metrics`, the
worker's `/metrics` counts them by model, and the doc's acceptance query reads them."""

from __future__ import annotations

import re
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from prometheus_client.parser import text_string_to_metric_families
from service_helpers import records, running_worker

from api_client import InferqClient
from inferq.params import EngineConfig
from worker.engine.engine import PagedEngine, speculation

pytestmark = [pytest.mark.services, pytest.mark.model]
ROOT = Path(__file__).resolve().parents[2]
DOC = (ROOT / "docs" / "speculative.md").read_text()
(ACCEPTANCE_SQL,) = re.findall(r"```sql\n(.*?)```", DOC, flags=re.S)  # the doc's one query
COUNTERS = ("inferq_spec_drafted_tokens", "inferq_spec_accepted_tokens")


@pytest.fixture
def drafting(paged_engine: PagedEngine) -> Iterator[PagedEngine]:
    """The shared real-model engine with prompt lookup on (k = 4) for one test, whatever the
    default; its own setting back afterwards."""
    before = paged_engine.scheduler.speculation
    paged_engine.scheduler.speculation = speculation(EngineConfig(spec_tokens=4))
    try:
        yield paged_engine
    finally:
        paged_engine.scheduler.speculation = before


def _scrape(port: int, model: str) -> dict[str, float]:
    """The speculation counters of `model` on the worker's `/metrics`."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return {
        s.name.removesuffix("_total"): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name.removesuffix("_total") in COUNTERS and s.labels == {"model": model}
    }


def test_drafted_and_accepted_tokens_reach_job_metrics_and_prometheus(
    service_settings, drafting: PagedEngine
) -> None:
    settings = service_settings.model_copy(update={"metrics_port": 0})
    model = drafting.model_name
    passage = (ROOT / "worker" / "data" / "heldout.txt").read_text()[:300]
    client = InferqClient(settings).for_tenant(f"t-{uuid.uuid4().hex[:8]}")
    with running_worker(settings, {model: drafting}) as worker:
        job = client.submit(
            messages=[{"role": "user", "content": "Repeat this text word for word:\n\n" + passage}],
            params={"max_tokens": 24},
        )
        assert client.wait(job, timeout=120).status == "done"
        deadline = time.monotonic() + 10  # the sink counts just after it acknowledges
        while len(counted := _scrape(worker.http.port, model)) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
    with records(settings).engine.connect() as conn:
        facts = conn.execute(
            sa.text("SELECT * FROM job_metrics WHERE job_id = :j"), {"j": job}
        ).one()
        rates = {r.model: r for r in conn.execute(sa.text(ACCEPTANCE_SQL.strip().rstrip(";")))}
    assert facts.spec_drafted_tokens >= facts.spec_accepted_tokens > 0
    assert facts.spec_accepted_tokens < facts.completion_tokens
    # this worker's registry saw only this job
    assert counted == {
        "inferq_spec_drafted_tokens": facts.spec_drafted_tokens,
        "inferq_spec_accepted_tokens": facts.spec_accepted_tokens,
    }
    assert 0 < rates[model].accepted_pct <= 100
