"""One webhook attempt: check the URL and every address its host resolves to (the SSRF guard,
at each attempt: DNS may have changed since the last), sign the body the Standard Webhooks way,
POST it to the very address checked (no redirects followed, no proxy from the environment, no
connection reused), and say what happened. Nothing here logs or returns the URL or the body.
"""

from __future__ import annotations

import ipaddress
import socket
import time
from collections.abc import Sequence
from datetime import datetime
from math import floor
from urllib.parse import SplitResult, urlsplit

import httpx
from standardwebhooks import Webhook

from inferq.callback_urls import CallbackPolicy, IPAddress, literal
from storage.webhooks import DELIVERED, FAILED, REFUSED, Claimed, Outcome

USER_AGENT = "inferq-webhooks/1"


def lease_for(timeout_s: float) -> float:
    """How long a claim holds a delivery: past the longest attempt (name lookup, connect,
    send, answer: each bounded near `timeout_s`), so no live sender's attempt overlaps
    another's."""
    return 4 * timeout_s + 10


def signed_headers(
    msg_id: str, at: datetime, body: bytes, signers: Sequence[Webhook]
) -> dict[str, str]:
    """`webhook-id`, `webhook-timestamp` and `webhook-signature` (one `v1,<base64>` per
    secret, space-separated: receivers accept any, so secrets rotate without downtime)."""
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(floor(at.timestamp())),
        "webhook-signature": " ".join(w.sign(msg_id, at, body) for w in signers),
    }


def resolve(host: str, port: int) -> list[IPAddress]:
    """Every address `host` resolves to (itself when it is one), first as the resolver
    orders them."""
    ip = literal(host)
    if ip is not None:
        return [ip]
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(ipaddress.ip_address(info[4][0]) for info in infos))


def _pinned(parts: SplitResult, ip: IPAddress, port: int) -> str:
    """The URL with its host replaced by the address checked."""
    shown = f"[{ip}]" if ip.version == 6 else str(ip)
    return parts._replace(netloc=f"{shown}:{port}").geturl()


def attempt(
    claimed: Claimed,
    policy: CallbackPolicy,
    signers: Sequence[Webhook],
    timeout_s: float,
) -> Outcome:
    """POST `claimed`'s body once; a refusal (no secret, a URL or an address not allowed) is
    final, anything else but a 2xx answer is retried by the caller."""
    started = time.monotonic()

    def outcome(status: str, http_status: int | None = None, error: str | None = None) -> Outcome:
        return Outcome(status, http_status, round((time.monotonic() - started) * 1000), error)

    if not signers:
        return outcome(
            REFUSED,
            error=f"tenant {claimed.tenant!r} has no webhook secret (INFERQ_WEBHOOK_SECRETS)",
        )
    if claimed.url is None:
        return outcome(REFUSED, error="the job has no callback URL")
    reason = policy.url_refusal(claimed.url)
    if reason is not None:
        return outcome(REFUSED, error=reason)
    parts = urlsplit(claimed.url)
    https = parts.scheme.lower() == "https"
    host, port = parts.hostname or "", parts.port or (443 if https else 80)
    try:
        addresses = resolve(host, port)
    except (OSError, UnicodeError, ValueError) as exc:
        return outcome(FAILED, error=f"name lookup: {type(exc).__name__}")
    reason = policy.address_refusal(host, addresses)
    if reason is not None or not addresses:
        return outcome(REFUSED, error=reason or "the host has no address")
    body = claimed.body.encode()
    headers = {
        "host": parts.netloc,
        "content-type": "application/json",
        "user-agent": USER_AGENT,
        **signed_headers(str(claimed.id), claimed.claimed_at, body, signers),
    }
    # TLS checks the certificate against the URL's host name, not the address dialled
    extensions = {"sni_hostname": host} if https and literal(host) is None else {}
    try:
        with (
            httpx.Client(timeout=timeout_s, follow_redirects=False, trust_env=False) as client,
            client.stream(
                "POST",
                _pinned(parts, addresses[0], port),
                content=body,
                headers=headers,
                extensions=extensions,
            ) as response,
        ):
            code = response.status_code  # the answer's body is never read
    except Exception as exc:  # a timeout, a refused connection, TLS: retried
        return outcome(FAILED, error=type(exc).__name__)
    if 200 <= code < 300:
        return outcome(DELIVERED, code)
    moved = " (redirects are not followed)" if 300 <= code < 400 else ""
    return outcome(FAILED, code, f"HTTP {code}{moved}")
