"""Migration 0007 with a batch row present, on PostgreSQL and SQLite: `batches.padded_tokens`
goes and the row stays; the downgrade brings the column back filled as it was written (equal
to `real_tokens`); a second upgrade drops it again."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import sqlalchemy as sa

from storage import migrate
from storage.db import build_engine
from storage.models import UTCDateTime

AT = datetime(2026, 12, 1, 2, 3, 4, tzinfo=UTC)
# the table as it is at revision 0006 (only the columns written here)
BATCHES = sa.table(
    "batches",
    sa.column("id", sa.Uuid()),
    sa.column("worker", sa.String()),
    sa.column("model", sa.String()),
    *(sa.column(n, sa.Integer()) for n in ("size", "real_tokens", "padded_tokens")),
    sa.column("started_at", UTCDateTime()),
)


def _row(engine: sa.Engine, batch: uuid.UUID) -> dict[str, object]:
    with engine.connect() as conn:
        table = sa.Table("batches", sa.MetaData(), autoload_with=conn)
        (row,) = conn.execute(sa.select(table).where(table.c.id == batch)).mappings()
    return dict(row)


def test_0007_drops_padded_tokens_and_downgrades(empty_db_url: str) -> None:
    url = empty_db_url
    migrate.upgrade(url, "0006")
    engine = build_engine(url)
    batch = uuid.uuid4()
    try:
        with engine.begin() as conn:
            row = {"id": batch, "worker": "w", "model": "m", "size": 2, "started_at": AT}
            conn.execute(sa.insert(BATCHES).values(**row, real_tokens=40, padded_tokens=40))

        migrate.upgrade(url, "0007")
        row = _row(engine, batch)
        assert "padded_tokens" not in row
        assert (row["size"], row["real_tokens"], row["worker"]) == (2, 40, "w")

        migrate.downgrade(url, "0006")
        row = _row(engine, batch)
        assert (row["real_tokens"], row["padded_tokens"]) == (40, 40)

        migrate.upgrade(url, "0007")
        assert "padded_tokens" not in _row(engine, batch)
    finally:
        engine.dispose()
