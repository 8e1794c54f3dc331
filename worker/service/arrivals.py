"""A message read as a job, as the intake carries it from reading to dispatch, and the rules
that keep a job id to one job: a message whose job id is a stored job of other content (another
tenant's, say) is not that job, and messages of one take that share a job id are claimed one
content at a time."""

from __future__ import annotations

import uuid
from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from api_client.schema import JobMessage
from storage.records import JobState, NewJob, as_utc
from worker.broker import Received
from worker.service.jobs import LiveJob

ENQUEUE_LOOKBACK = timedelta(days=7)  # an older producer clock is taken as this old
JOB_ID_TAKEN = "job id taken"  # the dead letter of a message whose job id is another job


@dataclass(frozen=True, slots=True)
class Arrival:
    """One message of a take: the job row it claims (its model resolved) and, unless refused,
    the job to run."""

    message: Received
    row: NewJob
    job: LiveJob | None  # None when refused (see `error`)
    error: str | None


def taken(arrival: Arrival, state: JobState | None) -> bool:
    """The message's job id is a stored job that is not this message's job."""
    row = arrival.row
    return state is not None and state.id == row.id and not state.is_job_of(row)


def claim_rounds(arrivals: list[Arrival]) -> list[list[Arrival]]:
    """The arrivals in groups with one content per job id: a message that repeats a job id
    with other content goes to a later group (claimed after, and compared with, the first)."""
    rounds: list[list[Arrival]] = []
    seen: dict[uuid.UUID, list[tuple[Any, ...]]] = defaultdict(list)
    for arrival in arrivals:
        contents, content = seen[arrival.row.id], arrival.row.content()
        if content not in contents:
            contents.append(content)
        k = contents.index(content)
        rounds += [[] for _ in range(k + 1 - len(rounds))]
        rounds[k].append(arrival)
    return rounds


def bounded(job: JobMessage, now: datetime) -> JobMessage:
    """The job with its producer's clock (`submitted_at`) taken within the last 7 days."""
    sent = job.submitted_at and as_utc(job.submitted_at)
    if sent is None or now - ENQUEUE_LOOKBACK <= sent <= now:
        return job
    limited = min(max(sent, now - ENQUEUE_LOOKBACK), now)
    return job.model_copy(update={"submitted_at": limited})
