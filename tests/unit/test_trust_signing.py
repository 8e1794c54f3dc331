"""Signing and reading a message never raise on what a message holds (issue 25, findings 2
and 11): a signature is 64 lowercase hex characters, keys have a minimum length and rotate,
and a signed message is fresh."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from pydantic import ValidationError

from api_client.schema import JobMessage
from api_client.signing import sign, signed, verify
from inferq.settings import Settings
from worker.service.messages import Refusal, Trust, read_job

KEY, OLD_KEY = "new-key-0123456789abcdef", "old-key-0123456789abcdef"
NOW = datetime(2026, 1, 1, 12, tzinfo=UTC)


@dataclass
class Message:
    body: str
    content_type: str = "application/json"
    headers: dict[str, Any] = field(default_factory=lambda: {"task": "inferq.generate"})


def _message(kwargs: dict[str, Any], **headers: Any) -> Message:
    return Message(json.dumps([[], kwargs, {}]), headers={"task": "inferq.generate", **headers})


def _wire(**extra: Any) -> dict[str, Any]:
    job = JobMessage(tenant="acme", prompt="Hi", submitted_at=NOW, **extra)
    return job.to_wire()


def test_non_ascii_signature_is_refused_without_raising() -> None:
    kwargs = _wire()
    for given in ("é" * 64, "A" * 64, "0" * 63, 7, None, ["x"], "g" * 64):
        assert verify({**kwargs, "signature": given}, [KEY]) is False
    assert verify({"signature": "0" * 64, "x": {1, 2}}, [KEY]) is False  # not JSON at all
    with pytest.raises(ValidationError, match="signature"):
        JobMessage.model_validate({**kwargs, "signature": "é" * 64})


def test_nested_body_deeper_than_the_recursion_limit_is_refused() -> None:
    got = read_job(Message("[" * 5000), Trust(), NOW)
    assert isinstance(got, Refusal) and got.reason == "undecodable message"
    deep_headers = Message("[]", content_type=[[[]]], headers={"task": [[["x"]]]})  # type: ignore[arg-type]
    assert isinstance(read_job(deep_headers, Trust(), NOW), Refusal)


def test_several_keys_per_tenant_the_first_signs() -> None:
    settings = Settings(tenant_keys=f"acme={KEY}, acme={OLD_KEY}, beta={OLD_KEY}")
    assert settings.signing_keys() == {"acme": (KEY, OLD_KEY), "beta": (OLD_KEY,)}
    trust = Trust.of(settings)
    for key in (KEY, OLD_KEY):
        assert isinstance(read_job(_message(signed(_wire(), key)), trust, NOW), JobMessage)
    got = read_job(_message(signed(_wire(), "a-third-key-0123456789")), trust, NOW)
    assert isinstance(got, Refusal) and got.reason == "bad signature"


@pytest.mark.parametrize("keys", ["acme=", "acme=short", "acme", f"={KEY}", f"acme={KEY},b="])
def test_short_or_empty_signing_key_refuses_to_start(keys: str) -> None:
    with pytest.raises(ValidationError, match="INFERQ_TENANT_KEYS") as caught:
        Settings(tenant_keys=keys)
    assert KEY not in str(caught.value)  # the error never echoes a key


def test_short_client_signing_key_is_refused() -> None:
    with pytest.raises(ValidationError, match="at least 16"):
        Settings(tenant_key="")


def test_signed_message_outside_the_time_window_is_a_stale_signature() -> None:
    trust = Trust.of(Settings(tenant_keys=f"acme={KEY}"))
    for sent in (NOW - timedelta(minutes=6), NOW + timedelta(minutes=6), None):
        kwargs = {**_wire(), "submitted_at": sent and sent.isoformat()}
        got = read_job(_message(signed(kwargs, KEY)), trust, NOW)
        assert isinstance(got, Refusal) and got.reason == "stale signature", sent
    fresh = {**_wire(), "submitted_at": (NOW - timedelta(minutes=4)).isoformat()}
    assert isinstance(read_job(_message(signed(fresh, KEY)), trust, NOW), JobMessage)


def test_message_without_job_id_takes_the_celery_task_id() -> None:
    task_id = uuid.uuid4()
    kwargs = {k: v for k, v in _wire().items() if k != "job_id"}
    trust = Trust.of(Settings())
    got = read_job(_message(kwargs, id=str(task_id)), trust, NOW)
    assert isinstance(got, JobMessage) and got.job_id == task_id
    assert isinstance(read_job(_message(kwargs, id="not-a-uuid"), trust, NOW), JobMessage)


def test_signed_message_without_job_id_is_refused() -> None:
    """The task id is not signed: a signed message replayed under a new task id would be a
    new job (billed again), so a signed message must name its job itself."""
    kwargs = signed({k: v for k, v in _wire().items() if k != "job_id"}, KEY)
    trust = Trust.of(Settings(tenant_keys=f"acme={KEY}"))
    got = read_job(_message(kwargs, id=str(uuid.uuid4())), trust, NOW)
    assert isinstance(got, Refusal) and got.reason == "bad signature" and "job_id" in got.error


def test_require_signature_refuses_unkeyed_tenants() -> None:
    trust = Trust.of(Settings(tenant_keys=f"beta={KEY}", require_signature=True))
    got = read_job(_message(_wire()), trust, NOW)
    assert isinstance(got, Refusal) and got.reason == "unsigned tenant"
    beta = {**_wire(), "tenant": "beta"}
    assert isinstance(read_job(_message(signed(beta, KEY)), trust, NOW), JobMessage)


def test_sign_is_what_verify_accepts() -> None:
    kwargs = _wire()
    assert verify({**kwargs, "signature": sign(kwargs, KEY)}, [OLD_KEY, KEY])
