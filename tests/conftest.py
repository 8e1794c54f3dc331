"""Shared fixtures. Database fixtures need the real PostgreSQL (CI starts it)."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.pool import NullPool

from storage.db import dispose_engines
from storage.migrate import upgrade

PG_ADMIN_URL = os.environ.get(
    "INFERQ_TEST_PG_ADMIN_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)


# -- databases -------------------------------------------------------------------------


@contextmanager
def _pg_database(*, migrate: bool) -> Iterator[str]:
    """A throwaway PostgreSQL database `inferq_test_<hex>`, dropped afterwards."""
    admin = sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT", poolclass=NullPool)
    name = f"inferq_test_{uuid.uuid4().hex[:12]}"
    try:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    except sa.exc.OperationalError as exc:
        admin.dispose()
        pytest.fail(
            f"PostgreSQL is not reachable at {PG_ADMIN_URL} (set INFERQ_TEST_PG_ADMIN_URL): {exc}",
            pytrace=False,
        )
    url = sa.make_url(PG_ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    try:
        if migrate:
            upgrade(url)
        yield url
    finally:
        dispose_engines(url)
        with admin.connect() as conn:
            conn.execute(
                sa.text(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                    " WHERE datname = :name AND pid <> pg_backend_pid()"
                ),
                {"name": name},
            )
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}"')
        admin.dispose()


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """A migrated PostgreSQL database shared by the session (use fresh ids per test)."""
    with _pg_database(migrate=True) as url:
        yield url


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    """A migrated SQLite file database for one test."""
    url = f"sqlite:///{tmp_path / 'inferq.db'}"
    upgrade(url)
    return url


@pytest.fixture(params=["postgresql", "sqlite"])
def db_url(request: pytest.FixtureRequest) -> str:
    """A migrated database URL, once per dialect."""
    return request.getfixturevalue("pg_url" if request.param == "postgresql" else "sqlite_url")


@pytest.fixture(params=["postgresql", "sqlite"])
def empty_db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh, unmigrated database URL of its own, once per dialect (migration tests)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'empty.db'}"
        return
    with _pg_database(migrate=False) as url:
        yield url


# -- Redis, the model, worker settings ---------------------------------------------------

REDIS_URL = os.environ.get("INFERQ_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")


@pytest.fixture
def redis_url() -> str:
    """The real Redis (db 15, flushed); fails clearly when it is not running."""
    import redis

    client = redis.Redis.from_url(REDIS_URL)
    try:
        client.flushdb()
    except redis.ConnectionError as exc:
        pytest.fail(f"Redis is not reachable at {REDIS_URL}: {exc}")
    return REDIS_URL


@pytest.fixture(scope="session")
def model_path() -> str:
    """The default model's fp32 weights, prepared once (cached under INFERQ_HOME)."""
    from inferq.settings import FP_MODEL, get_settings
    from worker.prep.models import resolve_model

    return resolve_model(get_settings(), FP_MODEL)


@pytest.fixture(scope="session")
def gptq_model_path() -> str:
    """The default model: the GPTQ 4-bit variant, prepared once (`make model` does it)."""
    from inferq.settings import DEFAULT_MODEL, get_settings
    from worker.prep.models import resolve_model

    return resolve_model(get_settings(), DEFAULT_MODEL)


@pytest.fixture(scope="session")
def paged_engine(model_path: str):
    """The real model in the paged, prefix-cached engine (fp32, CPU), loaded once."""
    from inferq.settings import FP_MODEL
    from worker.engine.engine import PagedEngine

    engine = PagedEngine(model_path, FP_MODEL, device="cpu", dtype="float32")
    engine.warm_up()
    return engine


@pytest.fixture(scope="session")
def gptq_engine(gptq_model_path: str):
    """The default model (GPTQ 4-bit, bf16 activations) in the paged engine, loaded once."""
    from inferq.settings import DEFAULT_MODEL
    from worker.engine.engine import PagedEngine

    return PagedEngine(gptq_model_path, DEFAULT_MODEL, device="cpu", dtype="auto")


@pytest.fixture
def service_settings(tmp_path: Path, pg_url: str, redis_url: str):
    """Worker/client settings on the real Redis and PostgreSQL, a fresh queue per test."""
    from inferq.settings import FP_MODEL, get_settings

    return get_settings(
        home=tmp_path / "home",
        model=FP_MODEL,
        broker_url=redis_url,
        database_url=pg_url,
        queue=f"inferq-test-{uuid.uuid4().hex[:8]}",
    )
