"""Webhook rules without a server: callback URL syntax (the wire schema) and the SSRF policy,
signing secrets in the settings, the Standard Webhooks headers, and the retry delays."""

from __future__ import annotations

import base64
import ipaddress
import json
import random
import uuid
from datetime import UTC, datetime

import pytest
from pydantic import ValidationError
from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError

from api_client.schema import JobMessage
from inferq.callback_urls import MAX_URL_CHARS, CallbackPolicy, address_class
from inferq.settings import Settings
from storage.records import utcnow
from worker.broker import Received
from worker.service.messages import Refusal, Trust, read_job
from worker.service.retry import backoff_delay
from worker.webhooks.delivery import resolve, signed_headers

SECRET = "whsec_" + base64.b64encode(b"s" * 32).decode()
OTHER = "whsec_" + base64.b64encode(b"o" * 24).decode()

GOOD = [
    "https://example.com/hook",
    "https://hooks.example.com:8443/a/b?token=x&y=1",
    "http://127.0.0.1:9000/",  # syntax only: the policy decides about http
    "https://[2001:4860:4860::8888]/x",
    "https://8.8.8.8/",
    "https://xn--bcher-kva.example/",
]
BAD = {
    "ftp://example.com/": "https://",
    "javascript:alert(1)": "https://",
    "https:///path": "host",
    "https://user:pw@example.com/": "user name or password",
    "https://example.com/#frag": "fragment",
    "https://exa mple.com/": "printable ASCII",
    "https://bücher.example/": "printable ASCII",
    "https://example.com:99999/": "valid host and port",
    "https://example.com:0/": "port other than 0",
    "https://[not:an:address]/": "valid host",
    "https://under_score-.example/": "host name",
    "https://2130706433/": "dotted-quad",
    "https://0x7f.1/": "dotted-quad",
    "https://127.1/": "dotted-quad",
    "https://example.com/" + "a" * MAX_URL_CHARS: f"at most {MAX_URL_CHARS}",
}


@pytest.mark.parametrize("url", GOOD)
def test_the_schema_takes_well_formed_urls(url: str) -> None:
    job = JobMessage(prompt="hi", callback_url=url)
    assert job.callback_url == url and job.to_job("m").row()["callback_url"] == url
    assert job.to_wire()["callback_url"] == url


@pytest.mark.parametrize(("url", "why"), BAD.items())
def test_the_schema_refuses_malformed_urls_and_reasons_never_echo_them(url: str, why: str) -> None:
    with pytest.raises(ValidationError, match="callback_url") as caught:
        JobMessage(prompt="hi", callback_url=url)
    if "at most" not in why:  # pydantic's own length message is the one for an overlong URL
        assert why in str(caught.value)
    reason = CallbackPolicy().url_refusal(url)  # the reason a worker records and logs
    assert reason is not None and why in reason
    assert url not in reason and "pw" not in reason and "#frag" not in reason


def test_a_job_without_a_callback_keeps_the_wire_as_it_was() -> None:
    assert "callback_url" not in JobMessage(prompt="hi").to_wire()


def test_the_worker_dead_letters_a_message_with_a_bad_callback_url() -> None:
    body = json.dumps([[], {"prompt": "hi", "callback_url": "gopher://x/"}, {}])
    got = read_job(
        Received(
            body, "application/json", {"task": "inferq.generate", "id": str(uuid.uuid4())}, None
        ),
        Trust(),
        utcnow(),
    )
    assert isinstance(got, Refusal) and got.reason == "invalid job message"
    assert "callback_url" in got.error


REFUSED = {
    "https://169.254.169.254/latest/meta-data/": "metadata",
    "https://[fd00:ec2::254]/": "metadata",
    "https://169.254.1.1/": "link-local",
    "https://[fe80::1]/": "link-local",
    "https://10.0.0.1/": "private",
    "https://172.16.5.4/": "private",
    "https://192.168.1.1/": "private",
    "https://[fc00::1]/": "private",
    "https://127.0.0.1/": "loopback",
    "https://[::1]/": "loopback",
    "https://[::ffff:127.0.0.1]/": "loopback",  # IPv4-mapped
    "https://[64:ff9b::a9fe:a9fe]/": "metadata",  # NAT64 of 169.254.169.254
    "https://[2002:a00:1::]/": "private",  # 6to4 of 10.0.0.1
    "https://100.64.0.1/": "CGNAT",
    "https://0.0.0.0/": "unspecified",
    "https://224.0.0.1/": "multicast",
    "https://192.0.2.1/": "reserved",  # documentation range
    "https://localhost/": "local host name",
    "https://api.localhost/": "local host name",
    "http://example.com/": "plain http",
}


@pytest.mark.parametrize(("url", "why"), REFUSED.items())
def test_the_policy_refuses_local_and_private_targets(url: str, why: str) -> None:
    reason = CallbackPolicy().url_refusal(url)
    assert reason is not None and why in reason


def test_allowed_hosts_and_ranges_lift_the_refusal_and_allow_http() -> None:
    policy = CallbackPolicy.parse(" 127.0.0.1 , hooks.internal., 10.1.0.0/16, [fd00::1] ")
    assert policy.url_refusal("http://127.0.0.1:8080/x") is None
    assert policy.url_refusal("http://[::ffff:127.0.0.1]:8080/x") is None
    assert policy.url_refusal("http://HOOKS.internal/x") is None
    assert policy.url_refusal("https://10.1.200.3/x") is None
    assert policy.url_refusal("http://[fd00::1]/x") is None
    assert "private" in (policy.url_refusal("https://10.2.0.1/") or "")
    assert "plain http" in (policy.url_refusal("http://10.2.0.1/") or "")
    assert "loopback" in (policy.url_refusal("https://127.0.0.2/") or "")
    assert "plain http" in (policy.url_refusal("http://localhost:8080/") or "")
    # a name resolved at delivery: allowed by range, or by its name
    addrs = [ipaddress.ip_address("10.1.0.9")]
    assert policy.address_refusal("svc.example", addrs) is None
    assert policy.address_refusal("hooks.internal", [ipaddress.ip_address("192.168.0.1")]) is None
    mixed = [ipaddress.ip_address("8.8.8.8"), ipaddress.ip_address("169.254.169.254")]
    assert "metadata" in (policy.address_refusal("rebind.example", mixed) or "")
    for entry in ("not a host!", "10.0.0.0/33", "exa mple"):
        with pytest.raises(ValueError, match="entry 1"):
            CallbackPolicy.parse(entry)


def test_a_name_is_judged_by_what_it_resolves_to() -> None:
    """`localhost` resolved for real: refused as loopback unless allowed by name or range."""
    addresses = resolve("localhost", 443)
    assert addresses and all(address_class(a) == "loopback" for a in addresses)
    assert "loopback" in (CallbackPolicy().address_refusal("localhost", addresses) or "")
    assert CallbackPolicy.parse("localhost").address_refusal("localhost", addresses) is None
    ranges = CallbackPolicy.parse("127.0.0.0/8, ::1")
    assert ranges.address_refusal("localhost", addresses) is None
    assert address_class(ipaddress.ip_address("93.184.215.14")) is None


def test_webhook_secrets_parse_rotate_and_never_echo() -> None:
    settings = Settings(webhook_secrets=f"acme={SECRET}, acme={OTHER}, beta={OTHER}")
    assert settings.webhook_signing_secrets() == {"acme": (SECRET, OTHER), "beta": (OTHER,)}
    short = "whsec_" + base64.b64encode(b"x" * 23).decode()
    for bad in (
        f"acme={short}",
        f"acme={SECRET[6:]}",
        "acme=whsec_not*base64*at*all*here",
        "acme",
        f"={SECRET}",
    ):
        with pytest.raises(ValidationError, match="INFERQ_WEBHOOK_SECRETS") as caught:
            Settings(webhook_secrets=bad)
        assert SECRET[6:] not in str(caught.value) and short not in str(caught.value)
    with pytest.raises(ValidationError, match="INFERQ_WEBHOOK_ALLOW"):
        Settings(webhook_allow="127.0.0.1, bad host")


def test_signed_headers_verify_with_standardwebhooks_for_each_secret() -> None:
    body = json.dumps({"type": "job.done", "data": {"text": "é"}}, ensure_ascii=True).encode()
    at = datetime.now(UTC)
    headers = signed_headers("3f0c", at, body, [Webhook(SECRET), Webhook(OTHER)])
    assert headers["webhook-id"] == "3f0c"
    assert headers["webhook-timestamp"] == str(int(at.timestamp()))
    assert [s[:3] for s in headers["webhook-signature"].split(" ")] == ["v1,", "v1,"]
    for secret in (SECRET, OTHER):  # a receiver with either secret accepts it
        assert Webhook(secret).verify(body, headers)["data"]["text"] == "é"
    wrong = "whsec_" + base64.b64encode(b"w" * 32).decode()
    with pytest.raises(WebhookVerificationError):
        Webhook(wrong).verify(body, headers)
    with pytest.raises(WebhookVerificationError):  # a changed body
        Webhook(SECRET).verify(body.replace(b"done", b"fail"), headers)


@pytest.mark.parametrize(("base", "cap"), [(5.0, 1800.0), (0.1, 10.0), (2.0, 2.0)])
def test_backoff_doubles_to_the_cap_with_jitter_inside_bounds(base: float, cap: float) -> None:
    rng = random.Random(7)
    for failures in range(0, 80):
        ceiling = min(cap, base * 2**failures)
        draws = [backoff_delay(failures, base, cap, rng) for _ in range(200)]
        assert all(ceiling / 2 <= d <= ceiling for d in draws)
        assert max(draws) - min(draws) > ceiling / 4  # jittered, not one fixed delay
    assert backoff_delay(10**6, base, cap, rng) <= cap  # no overflow far past the cap
    assert backoff_delay(-3, base, cap, rng) <= base  # never below the first delay's range


def test_a_day_of_retries_at_the_defaults_is_bounded() -> None:
    """At the default settings, the schedule reaches the cap after nine retries and a day
    holds a bounded number of attempts (the time bound, not a count, ends them)."""
    s = Settings()
    rng = random.Random(1)
    at, attempts = 0.0, 0
    while at <= s.webhook_retry_for_s:
        at += backoff_delay(attempts, s.webhook_backoff_s, s.webhook_backoff_cap_s, rng)
        attempts += 1
    longest = s.webhook_retry_for_s / (s.webhook_backoff_cap_s / 2) + 12
    assert 48 <= attempts <= longest
