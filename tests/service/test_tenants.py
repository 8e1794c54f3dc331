"""Signed tenants: a worker that knows a tenant's key runs only messages signed with it; a
message forged as that tenant becomes a dead letter and never touches the prefix cache."""

from __future__ import annotations

import uuid

import pytest
from service_helpers import producer, running_worker, wait_for

from api_client import InferqClient
from api_client.signing import sign

pytestmark = [pytest.mark.model, pytest.mark.services]
KEY = "acme-key-0123456789abcdef"
SYSTEM = {"role": "system", "content": "You are the Acme support assistant. " * 6}


def test_only_signed_messages_run_as_a_signed_tenant(service_settings, paged_engine) -> None:
    tenant = f"acme-{uuid.uuid4().hex[:6]}"
    keys = f"{tenant}={KEY}, other=other-key-0123456789"
    settings = service_settings.model_copy(update={"tenant_keys": keys})
    acme = InferqClient(settings, tenant=tenant, key=KEY)
    ask = {"messages": [SYSTEM, {"role": "user", "content": "Hi?"}], "params": {"max_tokens": 3}}
    forged_ids = [uuid.uuid4(), uuid.uuid4()]
    wire = {**acme.build(**ask).to_wire(), "job_id": str(forged_ids[0])}
    bad = {**wire, "job_id": str(forged_ids[1])}
    bad["signature"] = sign(bad, "not-the-key-0123456789")
    with running_worker(settings, {paged_engine.model_name: paged_engine}) as worker:
        first = acme.wait(acme.submit(**ask), timeout=120)  # signed: runs, fills the cache
        for kwargs in (wire, bad):  # unsigned, and signed with the wrong key
            producer(settings).send_task("inferq.generate", queue=settings.queue, kwargs=kwargs)
        second = acme.wait(acme.submit(**ask), timeout=120)
        letters = []
        for _ in range(100):
            letters = [d for d in worker.repo.dead_letters(50) if d["job_id"] in forged_ids]
            if len(letters) == 2:
                break
            wait_for(worker.repo, [second.id], timeout=1)
        assert sorted(d["reason"] for d in letters) == ["bad signature"] * 2
    assert first.status == second.status == "done"
    assert second.result.cached_tokens > 0  # the real tenant still shares its own prefix
    assert worker.repo.get_many(forged_ids) == {}  # the forgeries never became jobs
