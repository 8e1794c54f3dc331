"""Reporting at scale: load N synthetic ended jobs into a fresh PostgreSQL database (the real
migrations), time the report queries, prototype a daily rollup and measure a retention delete.

Usage: .venv/bin/python bench/report_scale.py [--jobs 1000000] [--keep] [--skip-load]
Needs the local PostgreSQL (`make services`; trust auth as `postgres`). Creates (or recreates)
the database `inferq_scale`, drops it at the end unless --keep; --skip-load reuses a kept one.
Each query runs once untimed and 5 times timed (warm cache). The retention delete runs on a
copy (CREATE DATABASE ... TEMPLATE), so the kept database stays whole. Writes the generated
part of docs/reporting-scale.md (between the report_scale markers; the rest is kept).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Sequence
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
from report_scale_doc import mib, write_doc  # bench/, beside this script
from report_scale_sql import (
    DAY,
    DAYS,
    DEVICES,
    EXACT,
    FACTS,
    JOBS,
    LOREM,
    MODEL_CDF,
    MODELS,
    PHASES,
    PRICES,
    RAW_LAT,
    RAW_USAGE,
    REFACT,
    RESULTS,
    RETENTION,
    ROLLUP_DDL,
    ROLLUP_FILL,
    ROLLUP_SELECT,
    ROLLUP_UPSERT,
    SHOW,
    SIZES,
    STAGE,
    TARGET_MS,
    TENANTS,
    TOP_COST,
    UNDO,
    USAGE,
    USAGE_COLS,
    WORKERS,
)

from storage.migrate import upgrade

Query = tuple[str, str, dict[str, Any]]


def dsn(args: argparse.Namespace, db: str) -> str:
    return f"{args.pg}/{db}"


def recreate(args: argparse.Namespace, db: str, create: str | None = "") -> None:
    """Drop `db`, then create it (`create`: extra clauses, such as a template) unless None."""
    with psycopg.connect(dsn(args, "postgres"), autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')
        if create is not None:
            conn.execute(f'CREATE DATABASE "{db}" {create}')


def gen_params(n_jobs: int, t0: float) -> dict[str, Any]:
    weights = [1 / rank for rank in range(1, len(TENANTS) + 1)]
    cdf = [sum(weights[: i + 1]) / sum(weights) for i in range(len(TENANTS) - 1)]
    return {
        "tcdf": cdf,
        "mcdf": MODEL_CDF,
        "t0": t0,
        "step": DAYS * 86400 / n_jobs,
        "models": MODELS,
        "tenants": TENANTS,
        "workers": [w for w, _ in WORKERS],
        "devices": [d for _, d in WORKERS],
        "lorem": LOREM,
    }


def load_chunks(
    conn: psycopg.Connection, params: dict[str, Any], lo: int, hi: int, chunk: int
) -> None:
    start = time.perf_counter()
    for first in range(lo, hi, chunk):
        with conn.transaction():
            p = {**params, "lo": first, "hi": min(first + chunk, hi)}
            conn.execute(STAGE, p)
            for sql in (JOBS, FACTS, RESULTS):
                conn.execute(sql, p)
        done, took = min(first + chunk, hi) - lo, time.perf_counter() - start
        print(f"  {done:>9,} / {hi - lo:,} jobs  {took:6.1f} s  ({done / took:,.0f} jobs/s)")


def load(args: argparse.Namespace) -> dict[str, float]:
    recreate(args, args.db)
    upgrade(dsn(args, args.db).replace("postgresql://", "postgresql+psycopg://", 1))
    t0 = time.time() - DAYS * 86400
    params, took = gen_params(args.jobs, t0), {}
    with psycopg.connect(dsn(args, args.db), autocommit=True) as conn:
        start = time.perf_counter()
        conn.execute("SET synchronous_commit = off")
        since = datetime.fromtimestamp(t0 - 86400, UTC)
        conn.cursor().executemany(
            "INSERT INTO prices (model, effective_from, prompt_per_mtok, cached_prompt_per_mtok, "
            "completion_per_mtok) VALUES (%s, %s, %s, %s, %s)",
            [(m, since, *p) for m, p in zip(MODELS, PRICES, strict=True)],
        )
        conn.cursor().executemany(
            "INSERT INTO compute_rates (target, effective_from, per_hour) VALUES (%s, %s, %s)",
            [(t, since, r) for t, r in DEVICES.items()],
        )
        conn.execute(USAGE, params)
        print(f"loading {args.jobs:,} jobs into {args.db} in chunks of {args.chunk:,}")
        load_chunks(conn, params, 0, args.jobs, args.chunk)
        took["insert_s"] = time.perf_counter() - start
        conn.execute("VACUUM ANALYZE")
        took["total_s"] = time.perf_counter() - start
        print(f"loaded in {took['insert_s']:.1f} s, {took['total_s']:.1f} s with VACUUM ANALYZE")
    return took


def queries(conn: psycopg.Connection) -> list[Query]:
    """(name, sql, params) of each timed query, anchored to the data's last end time."""
    end = conn.execute("SELECT max(finished_at) FROM job_metrics").fetchone()[0]  # type: ignore[index]
    d_end = end.astimezone(UTC).date() + timedelta(days=1)
    month1 = (d_end.replace(day=1) - timedelta(days=1)).replace(day=1)  # last full month
    month2 = (month1 + timedelta(days=32)).replace(day=1)
    by_size = conn.execute("SELECT tenant FROM job_metrics GROUP BY 1 ORDER BY count(*) DESC")
    tenants = [t for (t,) in by_size]
    big, mid = tenants[0], tenants[len(tenants) // 2]

    def win(d0: date, days: int, **more: Any) -> dict[str, Any]:
        d1 = d0 + timedelta(days=days)
        t0, t1 = (datetime(d.year, d.month, d.day, tzinfo=UTC) for d in (d0, d1))
        return {
            "d0": d0,
            "d1": d1,
            "t0": t0,
            "t1": t1,
            "h0": t0.replace(tzinfo=None),
            "h1": t1.replace(tzinfo=None),
            **more,
        }

    def view(where: str = "") -> str:
        return (
            f"SELECT {USAGE_COLS} FROM usage_daily WHERE day >= %(d0)s AND day < %(d1)s "
            f"{where} ORDER BY day, tenant, model"
        )

    r30, r90, week = (win(d_end - timedelta(days=k), k) for k in (30, DAYS + 1, 7))
    out = [
        ("1a daily, all tenants, 30 d (view)", view(), r30),
        ("1b daily, all tenants, 30 d (range)", RAW_USAGE.format(extra=""), r30),
        ("2a daily, all tenants, 90 d (view)", view(), r90),
        ("2b daily, all tenants, 90 d (range)", RAW_USAGE.format(extra=""), r90),
    ]
    for label, tenant in ((f"mid {mid}", mid), (f"largest {big}", big)):
        p = win(month1, (month2 - month1).days, tenant=tenant)
        out += [
            (f"3 one tenant, {month1:%Y-%m}, {label} (view)", view("AND tenant = %(tenant)s"), p),
            (
                f"3 one tenant, {month1:%Y-%m}, {label} (range)",
                RAW_USAGE.format(extra="AND tenant = %(tenant)s"),
                p,
            ),
        ]
    day = win(d_end - timedelta(days=1), 1)
    return [
        *out,
        (
            "4a latency p50/95/99 per model per hour, 1 d (view)",
            "SELECT * FROM latency_hourly "
            "WHERE hour >= %(h0)s AND hour < %(h1)s ORDER BY model, hour",
            day,
        ),
        (
            "4a latency p50/95/99 per model per hour, 1 d (range)",
            RAW_LAT.format(bucket="date_trunc('hour', finished_at AT TIME ZONE 'UTC')"),
            day,
        ),
        ("4b latency p50/95/99 per model per day, 7 d (range)", RAW_LAT.format(bucket=DAY), week),
        (
            "5 top 10 tenants by cost, 7 d (view)",
            TOP_COST.format(
                jobs="sum(jobs)", src="usage_daily WHERE day >= %(d0)s AND day < %(d1)s"
            ),
            week,
        ),
        (
            "5 top 10 tenants by cost, 7 d (range)",
            TOP_COST.format(
                jobs="count(*)",
                src="job_metrics WHERE finished_at >= %(t0)s AND finished_at < %(t1)s",
            ),
            week,
        ),
    ]


def time_all(
    conn: psycopg.Connection, qs: Sequence[Query], explain: bool, prepare: bool = False
) -> list[dict]:
    """Each query once untimed, 5 times timed; prepare=False: planned for its parameters."""
    rows = []
    for name, sql, params in qs:
        conn.execute(sql, params, prepare=prepare).fetchall()  # warm
        times = []
        for _ in range(5):
            start = time.perf_counter()
            n = len(conn.execute(sql, params, prepare=prepare).fetchall())
            times.append((time.perf_counter() - start) * 1000)
        row = {"name": name, "rows": n, "median": statistics.median(times), "max": max(times)}
        if explain:
            plan = conn.execute("EXPLAIN (ANALYZE, BUFFERS) " + sql, params).fetchall()
            row["plan"] = [line for (line,) in plan]
        rows.append(row)
        ok = "yes" if row["median"] < TARGET_MS else "NO"
        print(f"  {name:<58} {n:>6} rows {row['median']:9.1f} {row['max']:9.1f} ms  {ok}")
    return rows


def rollup(conn: psycopg.Connection, qs: Sequence[Query]) -> dict[str, Any]:
    """Prototype: the daily rollup filled from job_metrics, and the usage queries over it."""
    conn.execute("DROP TABLE IF EXISTS usage_daily_rollup")
    for stmt in ROLLUP_DDL:
        conn.execute(stmt)
    start = time.perf_counter()
    conn.execute(ROLLUP_FILL)
    fill_s = time.perf_counter() - start
    conn.execute("VACUUM ANALYZE usage_daily_rollup")
    n = conn.execute("SELECT count(*) FROM usage_daily_rollup").fetchone()[0]  # type: ignore[index]
    swapped = [
        (
            name.replace("(view)", "(rollup)"),
            sql.replace("FROM usage_daily ", "FROM usage_daily_rollup "),
            p,
        )
        for name, sql, p in qs
        if "FROM usage_daily " in sql
    ]
    timed = time_all(conn, swapped, explain=True)
    # the write path: 200 transactions (savepoints in one rolled-back transaction, so the
    # database stays as loaded) each change the facts of 32 recent jobs, as a re-end would
    picked = conn.execute("SELECT job_id FROM job_metrics ORDER BY finished_at DESC LIMIT 6400")
    ids, upserts = [i for (i,) in picked], []
    with conn.transaction(force_rollback=True):
        for k in range(0, len(ids), 32):
            with conn.transaction():
                p = {"ids": ids[k : k + 32], "sign": -1}
                start = time.perf_counter()
                conn.execute(ROLLUP_UPSERT, p)
                took = time.perf_counter() - start
                conn.execute(REFACT, p)
                start = time.perf_counter()
                conn.execute(ROLLUP_UPSERT, {**p, "sign": 1})
                upserts.append((took + time.perf_counter() - start) * 1000)
        fresh = ROLLUP_SELECT.format(sign=1, where="")
        drift = conn.execute(
            f"SELECT count(*) FROM (SELECT {EXACT} FROM usage_daily_rollup "
            f"WHERE jobs <> 0 EXCEPT SELECT {EXACT} FROM ({fresh}) f) d"
        )
        drift = drift.fetchone()[0]  # type: ignore[index]
    print(
        f"  write path: retract + add {statistics.median(upserts):.2f} ms median per "
        f"32-job transaction, max {max(upserts):.2f} ms; rows differing from a fresh "
        f"aggregate: {drift}"
    )
    conn.execute("DROP TABLE usage_daily_rollup")
    return {"fill_s": fill_s, "rows": n, "timed": timed, "upserts": upserts, "drift": drift}


def sizes(conn: psycopg.Connection) -> dict[str, tuple[int, int, int]]:
    return {name: tuple(rest) for name, *rest in conn.execute(SIZES).fetchall()}  # type: ignore[misc]


def retention(args: argparse.Namespace) -> dict[str, Any]:
    """On a copy: delete the oldest 30 days of jobs in batches, VACUUM, then load as many new
    jobs in three parts (a VACUUM before the 2nd and 3rd, as autovacuum would run): how long
    each batch takes and whether the freed space is reused."""
    copy = f"{args.db}_retention"
    recreate(args, copy, f'TEMPLATE "{args.db}" STRATEGY file_copy')
    out: dict[str, Any] = {"batch": args.batch, "batches": [], "steps": []}
    try:
        with psycopg.connect(dsn(args, copy), autocommit=True) as conn:
            first = conn.execute("SELECT min(queued_at) + interval '30 days' FROM jobs")
            cutoff = first.fetchone()[0]  # type: ignore[index]
            out["steps"].append(("before", sizes(conn)))
            while True:
                t = time.perf_counter()
                n = conn.execute(RETENTION, (cutoff, args.batch)).rowcount
                if n <= 0:
                    break
                out["batches"].append((n, time.perf_counter() - t))
            out["deleted"] = deleted = sum(n for n, _ in out["batches"])
            out["steps"].append(("after DELETE", sizes(conn)))
            t = time.perf_counter()
            conn.execute("VACUUM jobs, job_metrics, results")
            out["vacuum_s"] = time.perf_counter() - t
            out["steps"].append(("after VACUUM", sizes(conn)))
            took = sum(s for _, s in out["batches"])
            print(
                f"  deleted {deleted:,} jobs in {len(out['batches'])} batches, {took:.1f} s; "
                f"VACUUM {out['vacuum_s']:.1f} s"
            )
            params = gen_params(args.jobs, time.time() - DAYS * 86400)  # later in time
            bounds = [args.jobs + deleted * k // 3 for k in range(4)]
            for k in range(3):
                if k:
                    conn.execute("VACUUM jobs, job_metrics, results")
                load_chunks(conn, params, bounds[k], bounds[k + 1], args.chunk)
                label = f"+ {bounds[k + 1] - args.jobs:,} new jobs"
                out["steps"].append((label + (" (VACUUM first)" if k else ""), sizes(conn)))
    finally:
        recreate(args, copy, None)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=1_000_000)
    parser.add_argument("--chunk", type=int, default=100_000)
    parser.add_argument("--batch", type=int, default=20_000, help="retention delete batch")
    parser.add_argument("--db", default="inferq_scale")
    parser.add_argument("--pg", default="postgresql://postgres@127.0.0.1:5432", help="server")
    parser.add_argument("--keep", action="store_true", help="keep the database at the end")
    parser.add_argument("--skip-load", action="store_true", help="reuse a kept database")
    parser.add_argument("--skip-retention", action="store_true")
    parser.add_argument("--doc", type=Path, default=Path("docs/reporting-scale.md"))
    args = parser.parse_args()
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    info: dict[str, Any] = {"when": when, "phases": []}
    info["load"] = None if args.skip_load else load(args)
    try:
        with psycopg.connect(dsn(args, args.db), autocommit=True) as conn:
            for stmt in UNDO:  # a kept database as migrated
                conn.execute(stmt)
            info["jobs"] = conn.execute("SELECT count(*) FROM jobs").fetchone()[0]  # type: ignore[index]
            got = conn.execute(
                f"SELECT version(), {', '.join(map('current_setting({!r})'.format, SHOW))}"
            )
            info["machine"] = {
                "CPUs (nproc)": os.cpu_count(),
                **dict(zip(("PostgreSQL", *SHOW), got.fetchone(), strict=True)),
            }  # type: ignore[arg-type]
            info["machine"].update(
                {
                    f"{t} MiB (heap / indexes / total)": " / ".join(map(mib, s))
                    for t, s in sizes(conn).items()
                }
            )
            qs = queries(conn)
            for k, (label, setup, generic) in enumerate(PHASES):
                start = time.perf_counter()
                for stmt in setup:
                    conn.execute(stmt)
                took = time.perf_counter() - start
                print(f"timing {info['jobs']:,} jobs, {label}: query, rows, median, max, < 2 s")
                info["phases"].append((label, took, time_all(conn, qs, k < 2, generic)))
            print("rollup prototype:")
            info["rollup"] = rollup(conn, qs)
            for stmt in UNDO:
                conn.execute(stmt)
        if not args.skip_retention:
            print("retention (on a copy):")
            info["retention"] = retention(args)
        write_doc(args.doc, info)
        print(f"wrote {args.doc}")
    finally:
        if not args.keep:
            recreate(args, args.db, None)


if __name__ == "__main__":
    main()
