"""Issue 25, finding 4: a worker that failed to load a model is not ready and does not fail
that model's jobs; jobs for a model a worker does not serve reach a worker that serves it
(null engines, real Redis and PostgreSQL)."""

from __future__ import annotations

import base64
import json
import time
import urllib.request
from contextlib import ExitStack

import pytest
import redis
from service_helpers import running_worker, wait_for, workers_of
from test_trust_health import readyz, wait_readyz

from api_client import InferqClient
from api_client.wire import PRIORITY_STEPS
from worker.broker import queue_key
from worker.engine.null import NullEngine
from worker.service.app import WorkerService

pytestmark = pytest.mark.services


def _settings(service_settings, name: str, model: str, **more):
    return service_settings.model_copy(
        update={
            "model": model,
            "worker_name": name,
            "metrics_port": 0,
            "heartbeat_s": 0.2,
            "unserved_hold_s": 0.2,
            **more,
        }
    )


def _wait_ready(services: list[WorkerService], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not all(s.ready() for s in services):
        assert time.monotonic() < deadline, "workers not ready"
        time.sleep(0.05)
    time.sleep(1.5)  # every worker's view of its peers (registry, workers table) is fresh


def test_worker_that_failed_to_load_a_model_is_not_ready_and_keeps_its_jobs(
    service_settings,
) -> None:
    """Told to serve `null` and `gone`; `gone` fails to load. The worker serves `null`, is
    not ready, and gives `gone` jobs back to the queue untouched; a model no worker serves
    is still refused."""
    settings = _settings(service_settings, "w-broken", "null", models="gone")
    with running_worker(settings, {"null": NullEngine()}) as service:
        assert "gone" in service.load_errors
        client = InferqClient(settings)
        ok = client.submit("Say hi.", params={"max_tokens": 2})
        kept = client.submit("Say hi.", model="gone", params={"max_tokens": 2})
        nowhere = client.submit("Say hi.", model="nowhere", params={"max_tokens": 2})
        views = wait_for(service.repo, [ok, nowhere])
        assert views[ok].status == "done"
        assert views[nowhere].status == "failed" and "unknown model" in views[nowhere].error
        time.sleep(2.0)  # ten holds and give-backs of the `gone` job
        # untouched: never recorded (a producer sends through the broker only), still queued
        assert service.repo.get(kept) is None and client.get(kept) is None
        metrics = (
            urllib.request.urlopen(f"http://127.0.0.1:{service.http.port}/metrics", timeout=5)
            .read()
            .decode()
        )
        assert 'inferq_model_loaded{model="gone"} 0.0' in metrics
        assert 'inferq_model_loaded{model="null"} 1.0' in metrics
        assert service.sweeper.last_ok > 0 and readyz(service) == 503
    # given back on stop, once, waiting for a worker (the sweeper may have sent other
    # sessions' orphaned jobs here too: the session's database is shared)
    assert _queued_ids(settings).count(str(kept)) == 1


def _queued_ids(settings) -> list[str]:
    """The job ids of every message on the queue, over its priority lists."""
    broker = redis.Redis.from_url(settings.broker_url)
    raw = [m for p in PRIORITY_STEPS for m in broker.lrange(queue_key(settings.queue, p), 0, -1)]
    return [json.loads(base64.b64decode(json.loads(m)["body"]))[1]["job_id"] for m in raw]


@pytest.mark.parametrize("affinity", [True, False], ids=["forwarded", "given-back"])
def test_jobs_for_models_served_by_different_workers_end_done_on_the_right_worker(
    service_settings, affinity: bool
) -> None:
    """Two workers, one model each: each takes jobs of the other's model off the shared
    queue and hands them on (affinity: straight to the peer; without: back to the queue
    until the right worker takes them). None fails."""
    names = {"m1": "w-m1", "m2": "w-m2"}
    with ExitStack() as stack:
        services = [
            stack.enter_context(
                running_worker(
                    _settings(service_settings, name, model, affinity=affinity),
                    {model: NullEngine(model)},
                )
            )
            for model, name in names.items()
        ]
        _wait_ready(services)
        wait_readyz(services[0], 200)
        client = InferqClient(_settings(service_settings, "client", "m1"))
        jobs = {
            model: client.submit_many(
                {"prompt": f"question {i}?", "model": model, "params": {"max_tokens": 2}}
                for i in range(20)
            )
            for model in names
        }
        ids = [j for group in jobs.values() for j in group]
        views = wait_for(services[0].repo, ids, timeout=60)
        ran_on = workers_of(services[0].repo, ids)
    assert {v.status for v in views.values()} == {"done"}, {v.error for v in views.values()}
    for model, group in jobs.items():
        assert {ran_on[j] for j in group} == {names[model]}
        assert {views[j].model for j in group} == {model}
