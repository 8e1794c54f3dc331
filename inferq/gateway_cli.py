"""`inferq serve` (the OpenAI-compatible gateway under uvicorn) and `inferq keys` (its API
keys: create, list, revoke; and tenants' token quotas)."""

from __future__ import annotations

import argparse
import importlib
import sys
import uuid

from inferq.settings import get_settings


def _cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from gateway import create_app
    from inferq.logs import configure_logging, get_logger

    configure_logging(args.loglevel)
    # uvloop's loop and httptools' parser where they import ([gateway] installs both), else
    # uvicorn's pure-Python asyncio and h11 (docs/gateway.md: the enqueue path's CPU)
    loop, http = _importable_or("uvloop", "asyncio"), _importable_or("httptools", "h11")
    get_logger("inferq.gateway").info(
        "gateway.serve", host=args.host, port=args.port, loop=loop, http=http
    )
    uvicorn.run(
        create_app(),
        host=args.host,
        port=args.port,
        loop=loop,
        http=http,
        workers=1,
        log_config=None,
        access_log=False,
        proxy_headers=True,
    )
    return 0


def _importable_or(module: str, fallback: str) -> str:
    """`module` (uvicorn's name for the implementation it provides) if it imports, else
    `fallback`."""
    try:
        importlib.import_module(module)
    except ImportError:
        return fallback
    return module


def _keys():
    from storage.api_keys import ApiKeys

    return ApiKeys(get_settings().resolved_database_url)


def _quota_text(tpm: int | None, tpd: int | None) -> str:
    parts = [f"{n} tokens/{span}" for n, span in ((tpm, "minute"), (tpd, "day")) if n]
    return ", ".join(parts) or "no token quota"


def _cmd_keys_create(args: argparse.Namespace) -> int:
    keys = _keys()
    try:
        if args.tpm is not None or args.tpd is not None:
            keys.set_quota(args.tenant, args.tpm, args.tpd)
        key_id, key = keys.create(args.tenant, args.rpm)
    except ValueError as exc:
        print(exc, file=sys.stderr)
        return 2
    limit = f"{args.rpm} requests/minute" if args.rpm else "no rate limit"
    quota = _quota_text(*keys.quota(args.tenant))
    print(f"tenant {args.tenant} ({quota}), key id {key_id}, {limit}; the key (shown once):")
    print(key)
    return 0


def _cmd_keys_quota(args: argparse.Namespace) -> int:
    keys = _keys()
    try:
        keys.set_quota(args.tenant, args.tpm, args.tpd)
    except ValueError as exc:
        print(exc, file=sys.stderr)
        return 2
    print(f"tenant {args.tenant}: {_quota_text(*keys.quota(args.tenant))}")
    return 0


def _cmd_keys_list(args: argparse.Namespace) -> int:
    for row in _keys().rows(args.tenant):
        state = f"revoked {row.revoked_at.isoformat()}" if row.revoked_at else "active"
        rpm = row.rate_limit_rpm or "-"
        print(
            f"{row.id}  {row.tenant}  {row.prefix}...  rpm={rpm}  "
            f"created {row.created_at.isoformat()}  {state}"
        )
    return 0


def _cmd_keys_revoke(args: argparse.Namespace) -> int:
    try:
        key_id = uuid.UUID(args.key_id)
    except ValueError:
        print(f"not a key id: {args.key_id!r} (see `inferq keys list`)", file=sys.stderr)
        return 2
    if not _keys().revoke(key_id):
        print(f"no active key {key_id}", file=sys.stderr)
        return 1
    print(f"revoked {key_id}")
    return 0


def _quota_options(parser: argparse.ArgumentParser, lead: str) -> None:
    what = "prompt + max output tokens the tenant's requests may use"
    parser.add_argument("--tpm", type=int, help=f"{lead}{what} a minute")
    parser.add_argument("--tpd", type=int, help=f"{lead}{what} a day (UTC)")


def add_parsers(verbs: argparse._SubParsersAction) -> None:
    serve = verbs.add_parser("serve", help="the OpenAI-compatible HTTP gateway (docs/gateway.md)")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on")
    serve.add_argument("--port", type=int, default=8000, help="port to listen on")
    serve.add_argument("--loglevel", default="INFO", help="DEBUG, INFO, WARNING, ERROR")
    serve.set_defaults(func=_cmd_serve)

    keys = verbs.add_parser("keys", help="the gateway's API keys (one tenant each)")
    key_verbs = keys.add_subparsers(dest="keys_verb", required=True)
    create = key_verbs.add_parser("create", help="a new key for TENANT (printed alone, last)")
    create.add_argument("tenant")
    create.add_argument("--rpm", type=int, help="requests a minute the key may make")
    _quota_options(create, "and set the tenant's token quota: ")
    create.set_defaults(func=_cmd_keys_create)
    quota = key_verbs.add_parser("quota", help="set TENANT's token quota (none given: none)")
    quota.add_argument("tenant")
    _quota_options(quota, "")
    quota.set_defaults(func=_cmd_keys_quota)
    listing = key_verbs.add_parser("list", help="keys (ids, tenants, prefixes; never the keys)")
    listing.add_argument("tenant", nargs="?")
    listing.set_defaults(func=_cmd_keys_list)
    revoke = key_verbs.add_parser("revoke", help="revoke a key by its id")
    revoke.add_argument("key_id")
    revoke.set_defaults(func=_cmd_keys_revoke)
