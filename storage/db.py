"""Engine construction: per-URL cached engines with SQLite and PostgreSQL tuning."""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import make_url
from sqlalchemy.pool import StaticPool

SQLITE_BUSY_TIMEOUT_MS = 30_000
#: Execution option that makes a SQLite transaction start with ``BEGIN IMMEDIATE``.
WRITE_OPTION = "inferq_write"

_engines: dict[str, sa.Engine] = {}
_lock = threading.Lock()


def make_engine(url: str) -> sa.Engine:
    """Return the process-wide engine for `url`, creating it on first use."""
    with _lock:
        engine = _engines.get(url)
        if engine is None:
            engine = build_engine(url)
            _engines[url] = engine
        return engine


def dispose_engines(url: str | None = None) -> None:
    """Dispose and forget the cached engine for `url`, or all of them (tests, forks)."""
    with _lock:
        urls = list(_engines) if url is None else [url]
        for key in urls:
            engine = _engines.pop(key, None)
            if engine is not None:
                engine.dispose()


def build_engine(url: str, **kwargs: Any) -> sa.Engine:
    """Create a new, uncached engine; `kwargs` go to `sqlalchemy.create_engine`."""
    parsed = make_url(url)
    kwargs.setdefault("hide_parameters", True)  # job payloads stay out of error messages
    if parsed.get_backend_name() != "sqlite":
        kwargs.setdefault("pool_pre_ping", True)
        return sa.create_engine(parsed, **kwargs)

    connect_args = dict(kwargs.pop("connect_args", {}))
    connect_args.setdefault("check_same_thread", False)
    connect_args.setdefault("timeout", SQLITE_BUSY_TIMEOUT_MS / 1000)
    if parsed.database in (None, "", ":memory:"):
        kwargs.setdefault("poolclass", StaticPool)
    engine = sa.create_engine(parsed, connect_args=connect_args, **kwargs)
    _install_sqlite_hooks(engine)
    return engine


def _install_sqlite_hooks(engine: sa.Engine) -> None:
    """Pragmas on connect; SQLAlchemy (not sqlite3) emits BEGIN so transactions are real."""

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None  # we emit BEGIN ourselves
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        finally:
            cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: sa.Connection) -> None:
        write = conn.get_execution_options().get(WRITE_OPTION, False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")


CHUNK = 5000  # ids per IN list (SQLite caps bound parameters)


IDS = "ids"  # the expanding IN list of the statements built once (`ids_in`)


def ids_in(column: sa.ColumnElement[Any]) -> sa.ColumnElement[bool]:
    """`column IN :ids`, the list bound at execution: a statement built once (the sink's,
    every commit) is not rebuilt for each list of ids."""
    return column.in_(sa.bindparam(IDS, expanding=True))


def chunks(items: Sequence[Any], size: int = CHUNK) -> Iterator[Sequence[Any]]:
    """`items` in slices of at most `size`, for IN lists."""
    for start in range(0, len(items), size):
        yield items[start : start + size]


def dialect_insert(conn: sa.Connection | sa.Engine | str, table: sa.Table) -> Any:
    """An INSERT with the ON CONFLICT clauses of `conn`'s dialect (or the dialect named:
    PostgreSQL or SQLite)."""
    from sqlalchemy.dialects import postgresql, sqlite

    name = conn if isinstance(conn, str) else conn.dialect.name
    if name == "postgresql":
        return postgresql.insert(table)
    if name == "sqlite":
        return sqlite.insert(table)
    raise NotImplementedError(f"unsupported database dialect: {name}")


def db_now(conn: sa.Connection) -> datetime:
    """The database's clock, tz-aware UTC: liveness compares times written by many hosts, so
    they all come from here (PostgreSQL: the transaction's start; SQLite: the current time,
    to the millisecond)."""
    if conn.dialect.name == "sqlite":
        text = conn.scalar(sa.text("SELECT strftime('%Y-%m-%d %H:%M:%f', 'now')"))
        return datetime.fromisoformat(str(text)).replace(tzinfo=UTC)
    value = conn.scalar(sa.select(sa.func.now()))
    assert isinstance(value, datetime)
    return value.astimezone(UTC) if value.tzinfo else value.replace(tzinfo=UTC)
