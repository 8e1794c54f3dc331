"""What the service benchmarks share: a fresh PostgreSQL database and Redis queue, a worker
process, and counts read back from PostgreSQL."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import redis
import sqlalchemy as sa
from cpu_split import stat_cpu_s  # bench/, beside this module
from sqlalchemy.pool import NullPool

from api_client import InferqClient
from inferq.settings import Settings, get_settings
from storage.db import dispose_engines, make_engine
from storage.migrate import upgrade

PG_ADMIN = os.environ.get(
    "INFERQ_BENCH_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)
REDIS = os.environ.get("INFERQ_BENCH_REDIS", "redis://127.0.0.1:6379/15")


def proc_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process (Linux /proc)."""
    return stat_cpu_s(Path(f"/proc/{pid}/stat"))


def proc_rss_mb(pid: int) -> float:
    """Resident memory of a process, MB (Linux /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise ValueError(f"no VmRSS for {pid}")


def postgres(action: str) -> None:
    """Stop or start the local PostgreSQL cluster (the fault runs; needs root)."""
    version = sorted(os.listdir("/etc/postgresql"))[-1]
    cmd = ["pg_ctlcluster", "--skip-systemctl-redirect", version, "main", action]
    subprocess.run([*cmd, *(["-m", "fast"] if action == "stop" else [])], check=True)


class ServiceEnv:
    """A throwaway database and a flushed Redis db, with a client and a raw producer."""

    def __init__(self, tag: str, keep: bool = False, **settings: object):
        self.db = f"inferq_bench_{tag}_{uuid.uuid4().hex[:8]}"
        self.keep = keep  # leave the database for `inferq report`
        self.admin = sa.create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT", poolclass=NullPool)
        self.url = sa.make_url(PG_ADMIN).set(database=self.db).render_as_string(False)
        self.settings_overrides = settings

    def __enter__(self) -> ServiceEnv:
        with self.admin.connect() as conn:
            conn.exec_driver_sql(f'CREATE DATABASE "{self.db}"')
        upgrade(self.url)
        redis.Redis.from_url(REDIS).flushdb()
        self.settings: Settings = get_settings(
            broker_url=REDIS, database_url=self.url, queue="bench", **self.settings_overrides
        )
        self.client = InferqClient(self.settings)
        self.producer = self.client.celery
        self.db_engine = make_engine(self.url)  # the operator's view: reports, counts
        return self

    def __exit__(self, *exc: object) -> None:
        dispose_engines(self.url)
        if self.keep:
            print(f"database kept: INFERQ_DATABASE_URL={self.url}", flush=True)
        else:
            with self.admin.connect() as conn:
                conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{self.db}" WITH (FORCE)')
        self.admin.dispose()

    def count_done(self) -> int:
        with self.db_engine.connect() as conn:
            return conn.scalar(sa.text("SELECT count(*) FROM results"))

    def lost_and_duplicates(self, ids: list[uuid.UUID]) -> tuple[int, int]:
        """Jobs without exactly a done status and a result; results beyond one per job."""
        with self.db_engine.connect() as conn:
            done = conn.scalar(
                sa.text("SELECT count(*) FROM jobs WHERE status = 'done' AND id = ANY(:ids)"),
                {"ids": ids},
            )
            results = conn.scalar(
                sa.text("SELECT count(*) FROM results WHERE job_id = ANY(:ids)"), {"ids": ids}
            )
        return len(ids) - done, results - done


def start_worker(
    env: ServiceEnv,
    extra: dict[str, str],
    log: Path,
    loglevel: str = "WARNING",
    checkout: Path | None = None,
) -> subprocess.Popen:
    """An `inferq worker` process on the env's broker and database; its code from `checkout`
    (another checkout of inferq, for an A/B) when given, else from this one."""
    environ = {
        **os.environ,
        "INFERQ_BROKER_URL": env.settings.broker_url or "",
        "INFERQ_DATABASE_URL": env.url,
        "INFERQ_QUEUE": env.settings.queue,
        **extra,
    }
    if checkout is not None:
        environ["PYTHONPATH"] = str(checkout)
    proc = subprocess.Popen(
        [sys.executable, "-m", "inferq.cli", "worker", "--loglevel", loglevel],
        env=environ,
        cwd=checkout,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )
    return proc


def stop_worker(proc: subprocess.Popen, timeout: float = 60) -> None:
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
