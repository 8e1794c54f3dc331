"""Webhook callback URLs: their syntax (the wire schema checks it) and which hosts a worker may
call (the SSRF guard). A leaf: the standard library only, no I/O (resolving a host is the
sender's: `worker/webhooks/delivery.py`), so the schema, the settings and the worker share it.

A URL is `https://` (or `http://` to a host the operator allows), with a host, no user or
password, no fragment, printable ASCII (international names in punycode), at most
`MAX_URL_CHARS`. Every address its host resolves to must be public, unless the host name or
a range holding the address is allowed (`INFERQ_WEBHOOK_ALLOW`): loopback, link-local (cloud
metadata), private, shared (CGNAT), multicast, unspecified and reserved addresses are refused,
and IPv6 forms that carry an IPv4 address (mapped, NAT64, 6to4) are judged by that address.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import SplitResult, urlsplit

MAX_URL_CHARS = 2048
SCHEMES = ("https", "http")
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

_LABEL = r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
_HOST_NAME = re.compile(rf"^(?=.{{1,253}}\.?$){_LABEL}(?:\.{_LABEL})*\.?$")
_NUMERIC_LABEL = re.compile(r"^(?:0x[0-9a-f]*|[0-9]+)$", re.IGNORECASE)
_LOCAL_NAMES = ("localhost", "localhost.localdomain")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")

#: Well-known cloud metadata endpoints (most are link-local or private as well: named apart
#: so a refusal says what was hit).
METADATA = frozenset(
    ipaddress.ip_address(a)
    for a in ("169.254.169.254", "169.254.170.2", "fd00:ec2::254", "100.100.100.200", "192.0.0.192")
)
#: Refused address classes, checked in order (anything else not global is "reserved").
_CLASSES: tuple[tuple[str, tuple[IPNetwork, ...]], ...] = tuple(
    (name, tuple(ipaddress.ip_network(n) for n in nets))
    for name, nets in (
        ("unspecified", ("0.0.0.0/8", "::/128")),
        ("loopback", ("127.0.0.0/8", "::1/128")),
        ("link-local", ("169.254.0.0/16", "fe80::/10")),
        ("private", ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7")),
        ("shared (CGNAT)", ("100.64.0.0/10",)),
        ("multicast", ("224.0.0.0/4", "ff00::/8")),
    )
)


def split_url(url: str) -> SplitResult:
    """The parts of a syntactically valid callback URL; ValueError says what is wrong (never
    echoing the URL: it may hold a token)."""
    if not isinstance(url, str):
        raise ValueError("a callback URL must be a string")
    if len(url) > MAX_URL_CHARS:
        raise ValueError(f"a callback URL has at most {MAX_URL_CHARS} characters")
    if not url.isascii() or not url.isprintable() or any(c.isspace() for c in url):
        raise ValueError("a callback URL is printable ASCII without spaces (punycode names)")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise ValueError("a callback URL must have a valid host and port") from None
    if parts.scheme.lower() not in SCHEMES:
        raise ValueError("a callback URL must be https:// (or http:// to an allowed host)")
    if "@" in parts.netloc:
        raise ValueError("a callback URL must not carry a user name or password")
    if parts.fragment or url.endswith("#"):
        raise ValueError("a callback URL must not have a fragment")
    host = parts.hostname or ""
    if not host or port == 0:
        raise ValueError("a callback URL must have a host (and a port other than 0)")
    if ":" in host:  # bracketed IPv6
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError("a callback URL's IPv6 host is not an address") from None
    elif not _HOST_NAME.match(host):
        raise ValueError("a callback URL's host is not a valid host name")
    elif _NUMERIC_LABEL.match(host.rstrip(".").rsplit(".", 1)[-1]) and literal(host) is None:
        raise ValueError("a callback URL's numeric host must be a dotted-quad IPv4 address")
    return parts


def check_url(url: str) -> str:
    """`url` if it is a syntactically valid callback URL (the wire schema's validator)."""
    split_url(url)
    return url


def literal(host: str) -> IPAddress | None:
    """The address a host names literally (IPv6 without brackets), else None."""
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None


def _embedded(ip: IPAddress) -> IPAddress:
    """The IPv4 address an IPv6 address carries (mapped, NAT64, 6to4), else `ip`."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return ip.ipv4_mapped
        if ip in _NAT64:
            return ipaddress.IPv4Address(ip.packed[-4:])
        if ip.sixtofour is not None:
            return ip.sixtofour
    return ip


def address_class(ip: IPAddress) -> str | None:
    """Why `ip` is not a public address ("loopback", "metadata", ...), or None when it is."""
    for candidate in dict.fromkeys((_embedded(ip), ip)):
        if candidate in METADATA:
            return "metadata"
        for name, networks in _CLASSES:
            if any(candidate in n for n in networks):
                return name
        if not candidate.is_global:
            return "reserved"
    return None


@dataclass(frozen=True, slots=True)
class CallbackPolicy:
    """Hosts and ranges a worker may call although they are not public, and over plain http:
    from `INFERQ_WEBHOOK_ALLOW` (`Settings.webhook_policy`)."""

    names: frozenset[str] = frozenset()
    networks: tuple[IPNetwork, ...] = ()

    @classmethod
    def parse(cls, spec: str) -> CallbackPolicy:
        """`host, 10.0.0.0/8, fd00::1, ...` (comma-separated host names, addresses, CIDR
        ranges); ValueError names the entry that is neither."""
        names: set[str] = set()
        networks: list[IPNetwork] = []
        for n, entry in enumerate(filter(None, (e.strip() for e in spec.split(","))), 1):
            try:
                networks.append(ipaddress.ip_network(entry.strip("[]"), strict=False))
                continue
            except ValueError:
                pass
            name = entry.lower().rstrip(".")
            if not _HOST_NAME.match(name):
                raise ValueError(
                    f"INFERQ_WEBHOOK_ALLOW: entry {n} is not a host name, an "
                    "address or a CIDR range"
                )
            names.add(name)
        return cls(frozenset(names), tuple(networks))

    def allows_host(self, host: str) -> bool:
        """Whether `host` (as the URL writes it) is allowed by name or as an address."""
        ip = literal(host)
        if ip is None:
            return host.lower().rstrip(".") in self.names
        return self.allows_address(ip)

    def allows_address(self, ip: IPAddress) -> bool:
        return any(
            a.version == n.version and a in n for a in {ip, _embedded(ip)} for n in self.networks
        )

    def url_refusal(self, url: str) -> str | None:
        """Why a worker would refuse to call `url`, judged without DNS (syntax, scheme, a
        literal address, a local name), or None. The reason never holds the URL."""
        try:
            parts = split_url(url)
        except ValueError as exc:
            return str(exc)
        host = parts.hostname or ""
        allowed = self.allows_host(host)
        if parts.scheme.lower() == "http" and not allowed:
            return "plain http is allowed only to hosts in INFERQ_WEBHOOK_ALLOW"
        if allowed:
            return None
        name = host.lower().rstrip(".")
        if name in _LOCAL_NAMES or name.endswith(".localhost"):
            return "a local host name (loopback) is not allowed"
        ip = literal(host)
        return None if ip is None else self.address_refusal(host, [ip])

    def address_refusal(self, host: str, addresses: Iterable[IPAddress]) -> str | None:
        """Why the addresses `host` resolved to may not be called, or None: every one must
        be public, allowed by range, or `host` allowed by name."""
        if self.allows_host(host):
            return None
        for ip in addresses:
            kind = address_class(ip)
            if kind is not None and not self.allows_address(ip):
                return f"{ip} is a {kind} address (not in INFERQ_WEBHOOK_ALLOW)"
        return None
