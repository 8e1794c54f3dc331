"""`inferq serve` (the OpenAI-compatible gateway under uvicorn) and `inferq keys` (its API
keys: create, list, revoke; and tenants' token quotas)."""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import importlib
import os
import signal
import sys
import uuid
from typing import Any

from inferq.settings import get_settings

PR_SET_PDEATHSIG = 1  # prctl(2)


def _cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from gateway import create_app
    from inferq.logs import configure_logging, get_logger

    configure_logging(args.loglevel)
    # uvloop's loop and httptools' parser where they import ([gateway] installs both), else
    # uvicorn's pure-Python asyncio and h11 (docs/gateway.md: the enqueue path's CPU)
    loop, http = _importable_or("uvloop", "asyncio"), _importable_or("httptools", "h11")
    get_logger("inferq.gateway").info(
        "gateway.serve", host=args.host, port=args.port, workers=args.workers, loop=loop, http=http
    )
    config = uvicorn.Config(
        create_app(),
        host=args.host,
        port=args.port,
        loop=loop,
        http=http,
        log_config=None,
        access_log=False,
        proxy_headers=True,
    )
    if args.workers == 1:
        uvicorn.Server(config).run()
        return 0
    return _serve_forked(config, args.workers)


def _serve_forked(config: Any, workers: int) -> int:
    """`workers` gateway processes accepting on one listening socket (the kernel spreads the
    connections): bound here, then each process forked with the app built and no thread or
    event loop started yet. They leave with this one (SIGTERM or SIGINT here: each drains as
    it would alone); when one ends, the others are stopped and its exit status is returned,
    so that whatever runs `inferq serve` restarts the whole of it."""
    import uvicorn

    sock = config.bind_socket()
    pids = []
    for _ in range(workers):
        pid = os.fork()
        if pid == 0:  # a gateway process, in a process group of its own: a terminal's ^C
            # reaches only this one, which stops each once (a second SIGINT would not drain)
            os.setpgid(0, 0)
            _die_with_parent()
            code = 1
            try:
                uvicorn.Server(config).run(sockets=[sock])
                code = 0
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else 1
            finally:
                os._exit(code)
        pids.append(pid)
    sock.close()
    stopping = False

    def stop(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    ended, status = os.wait()
    pids.remove(ended)
    stopped_here = stopping
    stop(signal.SIGTERM, None)
    for pid in pids:
        os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if stopped_here and code == -signal.SIGTERM:  # uvicorn re-raises the signal it drained on
        return 0
    return code if code >= 0 else 128 - code  # killed by signal N: 128 + N, as a shell says


def _die_with_parent() -> None:
    """SIGTERM this process when its parent ends (Linux; elsewhere nothing)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


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


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"at least 1, not {value}")
    return value


def add_parsers(verbs: argparse._SubParsersAction) -> None:
    serve = verbs.add_parser("serve", help="the OpenAI-compatible HTTP gateway (docs/gateway.md)")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on")
    serve.add_argument("--port", type=int, default=8000, help="port to listen on")
    serve.add_argument("--loglevel", default="INFO", help="DEBUG, INFO, WARNING, ERROR")
    serve.add_argument(
        "--workers", type=_positive, default=1, help="gateway processes on the one port"
    )
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
