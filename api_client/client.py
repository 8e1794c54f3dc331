"""The client a backend app imports: validate and enqueue jobs, then get, wait for, cancel
and stream them, through the broker's Redis alone (docs/results.md). No database URL."""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Iterator, Mapping
from contextlib import closing
from functools import cached_property
from typing import Any

import redis

from api_client import kombu_push, plans
from api_client.notify import Subscriptions, Watch
from api_client.producer import InvalidJobError, Producer, tenant_view
from api_client.results import result_key
from inferq.settings import is_redis_url
from storage.records import JobView

__all__ = ["InferqClient", "InvalidJobError"]


class InferqClient(Producer):
    """Submit generation jobs and read their states and results, as one tenant, blocking.

    Reads go to the job's result key (`celery-task-meta-<id>`, Celery's format): a queued or
    unknown job, or one of another tenant, reads as None. Waits block on the key's Redis
    notification and re-read every `INFERQ_RESULT_POLL_S` (2 s) in case one was lost."""

    def for_tenant(self, tenant: str, key: str | None = None) -> InferqClient:
        """A client for another tenant on the same broker."""
        return InferqClient(self.settings, tenant, key)

    @cached_property
    def redis(self) -> redis.Redis:
        return redis.Redis.from_url(
            self.result_url, health_check_interval=30, max_connections=plans.MAX_CONNECTIONS
        )

    @cached_property
    def broker_redis(self) -> redis.Redis:
        """The broker's Redis (the results' one when they are the same)."""
        url = self.settings.resolved_broker_url
        return self.redis if url == self.result_url else redis.Redis.from_url(url)

    @cached_property
    def subscriptions(self) -> Subscriptions:
        """The one subscription all this client's waits share (`api_client.notify`)."""
        return Subscriptions(self.result_url)

    def close(self) -> None:
        self.celery.close()
        if "subscriptions" in self.__dict__:
            self.subscriptions.close()
        broker = self.__dict__.get("broker_redis")
        if broker is not None and broker is not self.__dict__.get("redis"):
            broker.close()
        if "redis" in self.__dict__:
            self.redis.close()

    def submit(self, prompt: str | None = None, **job: Any) -> uuid.UUID:
        """Enqueue one job and return its id (an idempotency key's own id, see `build`)."""
        return self.enqueue(self.build(prompt, **job))

    def submit_many(self, jobs: Iterable[Mapping[str, Any]]) -> list[uuid.UUID]:
        """Validate every job first (nothing is enqueued if one is invalid), then enqueue all:
        on a Redis broker in one round trip (`api_client.kombu_push`), so a worker takes them
        together; else through Celery's producer, one by one."""
        messages = self.build_many(jobs)
        if not is_redis_url(self.settings.resolved_broker_url):
            return [self.enqueue(msg) for msg in messages]
        with self.broker_redis.pipeline(transaction=False) as pipe:
            kombu_push.queue_jobs(pipe, self.settings.queue, messages, self.key, self._reply_to)
            pipe.execute()
        return [msg.job_id for msg in messages]

    def get(self, job_id: uuid.UUID | str) -> JobView | None:
        """The job's latest state (running, or ended with its result), or None while it is
        queued (or unknown, another tenant's, or its result has expired)."""
        job_id = uuid.UUID(str(job_id))
        return tenant_view(self.redis.get(result_key(job_id)), job_id, self.tenant)

    def wait(
        self, job_id: uuid.UUID | str, timeout: float = 60.0, poll: float | None = None
    ) -> JobView:
        """Block until the job is done, failed, expired or cancelled; TimeoutError otherwise."""
        return self.wait_many([job_id], timeout, poll)[0]

    def wait_many(
        self, job_ids: Iterable[uuid.UUID | str], timeout: float = 300.0, poll: float | None = None
    ) -> list[JobView]:
        """Every job's ended view, in order; TimeoutError when some have not ended in time."""
        waiting = plans.Waiting(job_ids, self.tenant)
        for _ in self._run(plans.ended(waiting, timeout, poll or self.poll_s)):
            pass
        return waiting.views()

    def as_completed(
        self, job_ids: Iterable[uuid.UUID | str], timeout: float = 300.0, poll: float | None = None
    ) -> Iterator[JobView]:
        """Each job's ended view as it ends; TimeoutError when some have not ended in time."""
        waiting = plans.Waiting(job_ids, self.tenant)
        return self._run(plans.ended(waiting, timeout, poll or self.poll_s))

    def cancel(self, job_id: uuid.UUID | str, wait: float = 5.0) -> bool:
        """Ask the workers to cancel a queued or running job of this tenant. True: the job is
        cancelled, or had not ended and the request is recorded (a queued job is cancelled
        when a worker takes it, before it runs; a running one is dropped at once; a request
        the rules refuse, docs/security.md, changes nothing). False: it had ended otherwise,
        or is another tenant's. Waits up to `wait` s for a running job to end."""
        job_id = uuid.UUID(str(job_id))
        plan = plans.cancel(job_id, self.tenant, self.key, wait, self.poll_s)
        with closing(self._run(plan)) as answers:
            return next(answers)

    def stream(self, job_id: uuid.UUID | str, timeout: float = 300.0) -> Iterator[str]:
        """The job's text as it is generated, delta by delta (joined: its result's text); a
        reader that comes late gets the text so far first. Ends when the job is done; raises
        the job's error (`JobFailed`, `JobExpired`, Celery's `TaskRevokedError`) when it
        ended otherwise, TimeoutError after `timeout` s."""
        return self._run(plans.stream(uuid.UUID(str(job_id)), self.tenant, timeout, self.poll_s))

    def _run(self, plan: plans.Plan) -> Iterator[Any]:
        """Run a plan with blocking Redis calls; yield what it emits."""
        watch: Watch | None = None
        reply: Any = None
        try:
            while True:
                try:
                    op = plan.send(reply)
                except StopIteration:
                    return
                reply = None
                match op:
                    case plans.Emit(value):
                        yield value
                    case plans.Read(keys):
                        reply = self.redis.mget(keys)
                    case plans.Subscribe(channels):
                        watch = self.subscriptions.watch(channels, self.poll_s)
                    case plans.Listen(seconds):
                        assert watch is not None
                        reply = self.subscriptions.wait(watch, seconds)
                    case plans.XRead(key, last_id, count, block_ms):
                        got = self.redis.xread({key: last_id}, count, block_ms)
                        reply = got[0][1] if got else []
                    case plans.Send(commands):
                        with self.redis.pipeline(transaction=False) as pipe:
                            for command in commands:
                                pipe.execute_command(*command)
                            reply = pipe.execute()
        finally:
            plan.close()
            if watch is not None:
                self.subscriptions.unwatch(watch)
