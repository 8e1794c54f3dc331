"""Run Alembic programmatically against the bundled `migrations` package (any cwd)."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config

import migrations


def migrations_dir() -> Path:
    """The folder holding `env.py` and `versions/`."""
    return Path(migrations.__file__).resolve().parent


def alembic_config(url: str) -> Config:
    """An Alembic config for `url` with no ini file (so logging is left alone)."""
    cfg = Config()
    cfg.set_main_option("script_location", str(migrations_dir()).replace("%", "%%"))
    cfg.set_main_option("path_separator", "os")
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def upgrade(url: str, revision: str = "head") -> None:
    """Upgrade the database at `url` to `revision`."""
    command.upgrade(alembic_config(url), revision)


def downgrade(url: str, revision: str = "base") -> None:
    """Downgrade the database at `url` to `revision`."""
    command.downgrade(alembic_config(url), revision)


def current(url: str) -> str | None:
    """The revision the database at `url` is at (None: not migrated)."""
    from alembic.runtime.migration import MigrationContext

    from storage.db import build_engine

    engine = build_engine(url)
    try:
        with engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()
    finally:
        engine.dispose()
