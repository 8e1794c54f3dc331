"""Which models the live workers serve, from their heartbeats in the workers table, judged
by the database's clock (never this host's)."""

from __future__ import annotations

from datetime import timedelta

import sqlalchemy as sa

from storage.db import db_now
from storage.models import workers_table
from storage.repository import Repository

W = workers_table


def live_models(repo: Repository, dead_after_s: float) -> set[str]:
    """The models of every worker that has not stopped and beat within `dead_after_s`."""
    with repo.engine.connect() as conn:
        cut = db_now(conn) - timedelta(seconds=dead_after_s)
        query = sa.select(W.c.models).where(W.c.stopped_at.is_(None), W.c.last_seen_at >= cut)
        rows = conn.scalars(query).all()
    return {str(model) for models in rows if isinstance(models, list) for model in models}
