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

from storage.migrate import upgrade

TARGET_MS = 2000.0
TENANTS = [f"tenant-{i:02d}" for i in range(1, 21)]  # Zipf-like: weight 1/rank
MODELS = ["tinyllama-1.1b-chat", "qwen2.5-7b-instruct", "llama-3.1-70b-instruct"]
MODEL_CDF = [0.55, 0.9]  # 55 %, 35 %, 10 % of the jobs
PRICES = [("0.10", "0.025", "0.40"), ("0.30", "0.075", "1.20"), ("2.00", "0.50", "6.00")]
DEVICES = {"cpu": "0.20", "cuda:NVIDIA H200": "4.50"}  # compute rate per hour
WORKERS = [("worker-0", "cuda:NVIDIA H200"), ("worker-1", "cuda:NVIDIA H200"),
           ("worker-2", "cpu"), ("worker-3", "cpu")]  # fmt: skip
DAYS = 90
LOREM = (
    "Please summarise the conversation below for the support lead, keep the customer's own "
    "words where they matter, list every action item with its owner and due date, flag any "
    "refund or escalation request, and answer in English even when the thread is not. "
)
MARK = ("<!-- report_scale:begin -->", "<!-- report_scale:end -->")

# One chunk of synthetic jobs [lo, hi): a temp table `s` that the inserts below read.
STAGE = """
CREATE TEMP TABLE s ON COMMIT DROP AS
WITH a AS MATERIALIZED (
  SELECT n, gen_random_uuid() AS id, width_bucket(random(), %(tcdf)s::float8[]) + 1 AS ti,
         width_bucket(random(), %(mcdf)s::float8[]) + 1 AS mi, n %% 4 + 1 AS wi,
         to_timestamp(%(t0)s + (n + random()) * %(step)s) AS fin, random() AS rs,
         50 + floor(1500 * random() ^ 2)::int AS pt,
         CASE WHEN random() < 0.45 THEN 0.8 * random() ELSE 0 END AS cshare,
         random() AS r1, random() AS r2, random() AS r3
  FROM generate_series(%(lo)s::bigint, %(hi)s::bigint - 1) AS n),
b AS MATERIALIZED (
  SELECT a.*, CASE WHEN rs < 0.94 THEN 'done' WHEN rs < 0.97 THEN 'failed'
                   WHEN rs < 0.99 THEN 'cancelled' ELSE 'expired' END AS status,
         floor(pt * cshare)::int AS ct, (%(models)s::text[])[mi] AS model,
         %(tenants)s::text[] AS tn, (%(workers)s::text[])[wi] AS worker,
         (%(devices)s::text[])[wi] AS device
  FROM a),
c AS MATERIALIZED (
  SELECT b.*, tn[ti] AS tenant,
         CASE status WHEN 'done' THEN 20 + floor(700 * r1 ^ 1.5) WHEN 'failed' THEN floor(30 * r1)
                     WHEN 'cancelled' THEN floor(200 * r1) ELSE 0 END::int AS ot,
         CASE WHEN status = 'expired' THEN 900 + 60 * r2 ELSE -ln(1 - r2) * 1.5 END AS wait_s,
         CASE WHEN status <> 'expired'
              THEN (pt - ct)::float8 / (ARRAY[6000, 2500, 600])[mi] + 0.01 END AS prefill_s,
         (ARRAY[120, 45, 12])[mi] * (0.7 + 0.6 * r3) AS tps
  FROM b),
d AS MATERIALIZED (
  SELECT c.*, CASE WHEN prefill_s IS NOT NULL THEN ot / tps END AS decode_s,
         fin - make_interval(secs => coalesce(ot / tps, 0)) AS ftok FROM c)
SELECT d.*, ftok - make_interval(secs => prefill_s) AS adm,
       coalesce(ftok - make_interval(secs => prefill_s + 0.005), fin) AS seen,
       fin - make_interval(secs => wait_s + coalesce(prefill_s + decode_s + 0.005, 0)) AS enq
FROM d"""
JOBS = """
INSERT INTO jobs (id, tenant, idempotency_key, model, prompt, params, status, priority,
                  queued_at, started_at, finished_at, attempts, error, worker, expires_at,
                  enqueued_at, first_seen_at)
SELECT id, tenant, CASE WHEN r1 < 0.3 THEN 'key-' || n END, model,
       'Ticket #' || n || ' (' || tenant || '): ' || substr(%(lorem)s, 1 + (n %% 61)::int, 180),
       jsonb_build_object('max_tokens', (ARRAY[256, 512, 1024])[1 + n %% 3],
                          'temperature', round(r2::numeric, 2), 'top_p', 0.95,
                          'stop', jsonb_build_array('</s>')),
       status, (n %% 10 = 0)::int, enq, CASE WHEN status <> 'expired' THEN seen END, fin,
       1 + (r3 < 0.03)::int,
       CASE status WHEN 'failed' THEN 'EngineError: ' || (ARRAY['out of memory',
            'prompt too long', 'worker lost'])[1 + n %% 3]
            WHEN 'expired' THEN 'expired: deadline passed while queued' END,
       CASE WHEN status <> 'expired' THEN worker END, enq + interval '15 minutes', enq,
       CASE WHEN status <> 'expired' THEN seen END
FROM s ORDER BY n"""
FACTS = """
INSERT INTO job_metrics (job_id, tenant, model, status, worker, device, attempts, enqueued_at,
  first_seen_at, admitted_at, first_token_at, finished_at, prompt_tokens, cached_prompt_tokens,
  computed_prompt_tokens, completion_tokens, compute_s, queue_wait_s, ttft_s, prefill_s,
  decode_s, total_s, decode_tokens_per_s, price_id, rate_id, list_cost, compute_cost,
  cache_savings)
SELECT s.id, tenant, s.model, status, s.worker, s.device, 1 + (r3 < 0.03)::int, enq,
       CASE WHEN status <> 'expired' THEN seen END, adm, CASE WHEN ot > 0 THEN ftok END, fin,
       pt, ct, pt - ct, ot, coalesce((prefill_s + decode_s) / 8, 0), wait_s,
       CASE WHEN ot > 0 THEN wait_s + prefill_s END, prefill_s, decode_s,
       extract(epoch FROM fin - enq), CASE WHEN ot > 0 THEN tps END, p.id, r.id,
       CASE WHEN status = 'done' THEN round(((pt - ct) * p.prompt_per_mtok
            + ct * p.cached_prompt_per_mtok + ot * p.completion_per_mtok) / 1e6, 10) END,
       round(coalesce((prefill_s + decode_s) / 8, 0)::numeric * r.per_hour / 3600, 10),
       CASE WHEN status = 'done'
            THEN round(ct * (p.prompt_per_mtok - p.cached_prompt_per_mtok) / 1e6, 10) END
FROM s JOIN prices p ON p.model = s.model JOIN compute_rates r ON r.target = s.device
ORDER BY n"""
RESULTS = """
INSERT INTO results (job_id, text, finish_reason, prompt_tokens, completion_tokens,
                     cached_tokens, created_at)
SELECT id, 'Summary for ticket #' || n || ': ' || repeat(substr(%(lorem)s, 1 + (n %% 37)::int,
       150), 2), CASE WHEN r1 > 0.9 THEN 'length' ELSE 'stop' END, pt, ot, ct, fin
FROM s WHERE status = 'done' ORDER BY n"""
USAGE = """
INSERT INTO worker_usage (worker, model, hour, device, busy_s, idle_s, steps, seq_steps,
  prefill_tokens, decode_tokens, recompute_tokens, cache_queried_tokens, cache_hit_tokens)
SELECT w.worker, m.model, h, w.device, 3600 * r, 3600 * (1 - r), (36000 * r)::bigint,
       (288000 * r)::bigint, (900000 * r)::bigint, (288000 * r)::bigint, 0,
       (1200000 * r)::bigint, (400000 * r)::bigint
FROM unnest(%(workers)s::text[], %(devices)s::text[]) AS w(worker, device),
     unnest(%(models)s::text[]) AS m(model),
     generate_series(date_trunc('hour', to_timestamp(%(t0)s)), now(), interval '1 hour') AS h,
     LATERAL (SELECT 0.3 + 0.6 * random() + 0 * extract(epoch FROM h) AS r) AS x"""

DAY = "CAST(finished_at AT TIME ZONE 'UTC' AS DATE)"
SUMMED = ("prompt_tokens", "cached_prompt_tokens", "computed_prompt_tokens", "completion_tokens",
          "compute_s", "list_cost", "compute_cost", "cache_savings")  # fmt: skip
STATUSES = ("done", "failed", "cancelled", "expired")
AGGS = ", ".join(["count(*) AS jobs", *(f"count(*) FILTER (WHERE status = '{s}') AS {s}"
                  for s in STATUSES), *(f"sum({c}) AS {c}" for c in SUMMED)])  # fmt: skip
USAGE_COLS = ", ".join(["tenant, model, day, jobs", *STATUSES, *SUMMED])
RAW_USAGE = f"""SELECT tenant, model, {DAY} AS day, {AGGS} FROM job_metrics
WHERE finished_at >= %(t0)s AND finished_at < %(t1)s {{extra}}
GROUP BY tenant, model, {DAY} ORDER BY day, tenant, model"""
LAT = ", ".join(f"percentile_cont(ARRAY[0.5, 0.95, 0.99]) WITHIN GROUP (ORDER BY {c}) AS {c}"
                for c in ("queue_wait_s", "ttft_s", "total_s", "decode_tokens_per_s"))  # fmt: skip
RAW_LAT = f"""SELECT model, {{bucket}} AS bucket, count(*) AS jobs, {LAT} FROM job_metrics
WHERE status = 'done' AND finished_at >= %(t0)s AND finished_at < %(t1)s
GROUP BY model, {{bucket}} ORDER BY model, bucket"""
TOP_COST = """SELECT tenant, {jobs} AS jobs, sum(list_cost) AS list_cost,
  sum(compute_cost) AS compute_cost FROM {src} GROUP BY tenant
ORDER BY list_cost DESC NULLS LAST LIMIT 10"""
ROLLUP_COLS = ("jobs", *STATUSES, *SUMMED)
ROLLUP_DDL = [
    "CREATE TABLE usage_daily_rollup (tenant varchar(128) NOT NULL, model varchar(256) NOT NULL, "
    "day date NOT NULL, " + ", ".join(f"{c} bigint NOT NULL DEFAULT 0" for c in ROLLUP_COLS[:9])
    + ", compute_s double precision NOT NULL DEFAULT 0, " + ", ".join(f"{c} numeric(30, 10) "
    "NOT NULL DEFAULT 0" for c in SUMMED[5:]) + ", PRIMARY KEY (tenant, model, day))",
    "CREATE INDEX ix_usage_daily_rollup_day ON usage_daily_rollup (day)",
]  # fmt: skip
# The facts of the given jobs, signed: the write path would retract (-1) a batch's rows before
# it changes them and add them (+1) after, in the same transaction.
ROLLUP_SELECT = f"""SELECT coalesce(tenant, '') AS tenant, coalesce(model, '') AS model,
{DAY} AS day, {{sign}} * count(*) AS jobs, """ + ", ".join(
    [*(f"{{sign}} * count(*) FILTER (WHERE status = '{s}') AS {s}" for s in STATUSES),
     *(f"{{sign}} * coalesce(sum({c}), 0) AS {c}" for c in SUMMED)]
) + " FROM job_metrics WHERE finished_at IS NOT NULL {where} GROUP BY 1, 2, 3"  # fmt: skip
ROLLUP_FILL = "INSERT INTO usage_daily_rollup " + ROLLUP_SELECT.format(sign=1, where="")
ROLLUP_UPSERT = ("INSERT INTO usage_daily_rollup AS r " + ROLLUP_SELECT.format(
    sign="%(sign)s", where="AND job_id = ANY(%(ids)s)") + " ORDER BY 1, 2, 3 ON CONFLICT "
    "(tenant, model, day) DO UPDATE SET " + ", ".join(f"{c} = r.{c} + EXCLUDED.{c}"
                                                       for c in ROLLUP_COLS))  # fmt: skip
REFACT = """UPDATE job_metrics SET finished_at = finished_at + interval '20 hours',
  status = CASE status WHEN 'done' THEN 'failed' ELSE 'done' END,
  completion_tokens = completion_tokens + 1, list_cost = coalesce(list_cost, 0) + 0.001
WHERE job_id = ANY(%(ids)s)"""
EXACT = ", ".join(c for c in ("tenant", "model", "day", *ROLLUP_COLS) if c != "compute_s")
# What to try before a rollup, cumulative: planner statistics on the report's group key (no
# write cost), the same as prepared statements on generic plans (what psycopg's auto-prepare
# gets after 5 runs of a statement on one connection), then indexes on the UTC day (one more
# index entry per job each). Each: (label, setup statements, prepared with generic plans?).
PHASES = [
    ("as migrated", [], False),
    ("+ statistics", [f"CREATE STATISTICS st_job_metrics_usage_day (ndistinct) ON tenant, "
                      f"model, ({DAY}) FROM job_metrics", "ANALYZE job_metrics"], False),
    ("+ statistics, generic plans", ["SET plan_cache_mode = force_generic_plan"], True),
    ("+ day indexes", ["RESET plan_cache_mode",
                       f"CREATE INDEX ix_job_metrics_utc_day ON job_metrics (({DAY}))",
                       "CREATE INDEX ix_job_metrics_tenant_utc_day ON job_metrics "
                       f"(tenant, ({DAY}))", "ANALYZE job_metrics"], False),
]  # fmt: skip
UNDO = ["DROP INDEX IF EXISTS ix_job_metrics_utc_day, ix_job_metrics_tenant_utc_day",
        "DROP STATISTICS IF EXISTS st_job_metrics_usage_day", "ANALYZE job_metrics"]  # fmt: skip
RETENTION = """DELETE FROM jobs WHERE id IN (SELECT id FROM jobs WHERE queued_at < %s
  AND status IN ('done', 'failed', 'cancelled', 'expired') ORDER BY queued_at LIMIT %s)"""
SIZES = """SELECT relname, pg_relation_size(oid), pg_indexes_size(oid), pg_total_relation_size(oid)
FROM pg_class WHERE relname IN ('jobs', 'job_metrics', 'results') AND relkind = 'r'
ORDER BY relname"""
SHOW = ("shared_buffers", "work_mem", "max_parallel_workers_per_gather", "jit", "autovacuum")
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
    return {"tcdf": cdf, "mcdf": MODEL_CDF, "t0": t0, "step": DAYS * 86400 / n_jobs,
            "models": MODELS, "tenants": TENANTS, "workers": [w for w, _ in WORKERS],
            "devices": [d for _, d in WORKERS], "lorem": LOREM}  # fmt: skip


def load_chunks(conn: psycopg.Connection, params: dict[str, Any], lo: int, hi: int,
                chunk: int) -> None:  # fmt: skip
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
            [(m, since, *p) for m, p in zip(MODELS, PRICES, strict=True)])  # fmt: skip
        conn.cursor().executemany(
            "INSERT INTO compute_rates (target, effective_from, per_hour) VALUES (%s, %s, %s)",
            [(t, since, r) for t, r in DEVICES.items()])  # fmt: skip
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
        return {"d0": d0, "d1": d1, "t0": t0, "t1": t1, "h0": t0.replace(tzinfo=None),
                "h1": t1.replace(tzinfo=None), **more}  # fmt: skip

    def view(where: str = "") -> str:
        return (f"SELECT {USAGE_COLS} FROM usage_daily WHERE day >= %(d0)s AND day < %(d1)s "
                f"{where} ORDER BY day, tenant, model")  # fmt: skip

    r30, r90, week = (win(d_end - timedelta(days=k), k) for k in (30, DAYS + 1, 7))
    out = [("1a daily, all tenants, 30 d (view)", view(), r30),
           ("1b daily, all tenants, 30 d (range)", RAW_USAGE.format(extra=""), r30),
           ("2a daily, all tenants, 90 d (view)", view(), r90),
           ("2b daily, all tenants, 90 d (range)", RAW_USAGE.format(extra=""), r90)]  # fmt: skip
    for label, tenant in ((f"mid {mid}", mid), (f"largest {big}", big)):
        p = win(month1, (month2 - month1).days, tenant=tenant)
        out += [(f"3 one tenant, {month1:%Y-%m}, {label} (view)",
                 view("AND tenant = %(tenant)s"), p), (f"3 one tenant, {month1:%Y-%m}, {label} "
                 "(range)", RAW_USAGE.format(extra="AND tenant = %(tenant)s"), p)]  # fmt: skip
    day = win(d_end - timedelta(days=1), 1)
    return [*out,
        ("4a latency p50/95/99 per model per hour, 1 d (view)", "SELECT * FROM latency_hourly "
         "WHERE hour >= %(h0)s AND hour < %(h1)s ORDER BY model, hour", day),
        ("4a latency p50/95/99 per model per hour, 1 d (range)",
         RAW_LAT.format(bucket="date_trunc('hour', finished_at AT TIME ZONE 'UTC')"), day),
        ("4b latency p50/95/99 per model per day, 7 d (range)", RAW_LAT.format(bucket=DAY), week),
        ("5 top 10 tenants by cost, 7 d (view)", TOP_COST.format(
            jobs="sum(jobs)", src="usage_daily WHERE day >= %(d0)s AND day < %(d1)s"), week),
        ("5 top 10 tenants by cost, 7 d (range)", TOP_COST.format(jobs="count(*)",
         src="job_metrics WHERE finished_at >= %(t0)s AND finished_at < %(t1)s"), week),
    ]  # fmt: skip


def time_all(conn: psycopg.Connection, qs: Sequence[Query], explain: bool,
             prepare: bool = False) -> list[dict]:  # fmt: skip
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
    swapped = [(name.replace("(view)", "(rollup)"),
                sql.replace("FROM usage_daily ", "FROM usage_daily_rollup "), p)
               for name, sql, p in qs if "FROM usage_daily " in sql]  # fmt: skip
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
    print(f"  write path: retract + add {statistics.median(upserts):.2f} ms median per "
          f"32-job transaction, max {max(upserts):.2f} ms; rows differing from a fresh "
          f"aggregate: {drift}")  # fmt: skip
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
            print(f"  deleted {deleted:,} jobs in {len(out['batches'])} batches, {took:.1f} s; "
                  f"VACUUM {out['vacuum_s']:.1f} s")  # fmt: skip
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


def mib(n: int) -> str:
    return f"{n / 2**20:,.0f}"


def cell(r: dict[str, Any]) -> str:
    over = " **over**" if r["median"] >= TARGET_MS else ""
    ms = [f"{v:,.1f}" if v < 10 else f"{v:,.0f}" for v in (r["median"], r["max"])]
    return f"{ms[0]} / {ms[1]}{over}"


def write_doc(path: Path, info: dict[str, Any]) -> None:
    load = info["load"]
    md = [MARK[0], f"Run: {info['when']}, {info['jobs']:,} jobs" + (
          f", loaded in {load['total_s']:.0f} s (inserts {load['insert_s']:.0f} s, then VACUUM "
          "ANALYZE)." if load else " (`--skip-load`: the kept database)."), "",
          "| machine | |", "|---|---|"]  # fmt: skip
    md += [f"| {k} | {v} |" for k, v in info["machine"].items()]
    labels = [label for label, _, _ in info["phases"]]
    md += ["", "Timings: median / max ms of 5 warm runs (after 1 untimed); **over** = median "
           "at or over 2 s. Phases are cumulative: " + "; ".join(
           f"{label} ({setup:.1f} s to set up)" for label, setup, _ in info["phases"]) + ".", "",
           "| query | rows | " + " | ".join(labels) + " |",
           "|---|---:|" + "---:|" * len(labels)]  # fmt: skip
    for k, r in enumerate(info["phases"][0][2]):
        md.append(f"| {r['name']} | {r['rows']} | "
                  + " | ".join(cell(p[2][k]) for p in info["phases"]) + " |")  # fmt: skip
    ro = info["rollup"]
    md += ["", f"Rollup prototype: `usage_daily_rollup` ({ro['rows']:,} rows) filled from "
           f"job_metrics by one INSERT ... SELECT in {ro['fill_s']:.1f} s. Write path: "
           f"{len(ro['upserts'])} transactions each change the facts of 32 recent jobs (status, "
           "day, tokens, cost), retracting their rows from the rollup before (sign -1) and "
           f"adding them after (+1): {statistics.median(ro['upserts']):.2f} ms median, "
           f"{max(ro['upserts']):.2f} ms max for the two upserts; rollup rows differing from a "
           f"fresh aggregate after: {ro['drift']}.", "",
           "| query | rows | median / max ms |", "|---|---:|---:|"]  # fmt: skip
    md += [f"| {r['name']} | {r['rows']} | {cell(r)} |" for r in ro["timed"]]
    if ret := info.get("retention"):
        per = [s for _, s in ret["batches"]]
        md += ["", f"### Retention: the oldest 30 days, batches of {ret['batch']:,}", "",
               f"{ret['deleted']:,} jobs deleted (their job_metrics and results rows by ON "
               f"DELETE CASCADE) in {len(per)} batches, {sum(per):.1f} s: per batch median "
               f"{statistics.median(per):.2f} s, min {min(per):.2f} s, max {max(per):.2f} s. "
               f"Plain VACUUM of the three tables after: {ret['vacuum_s']:.1f} s. Sizes in MiB,"
               " heap / indexes (total with TOAST):", "",
               "| step | " + " | ".join(ret["steps"][0][1]) + " | all three |",
               "|---|---:|---:|---:|---:|"]  # fmt: skip
        for label, sz in ret["steps"]:
            parts = [f"{mib(h)} / {mib(i)} ({mib(t)})" for h, i, t in sz.values()]
            md.append(f"| {label} | {' | '.join(parts)} | {mib(sum(t for *_, t in sz.values()))} |")
        md += ["", "Seconds per batch: " + ", ".join(f"{s:.2f}" for s in per)]
    md += ["", "### Plans (EXPLAIN (ANALYZE, BUFFERS); over 40 lines trimmed)"]
    plans = [(label, r) for label, _, rs in info["phases"] for r in rs if "plan" in r]
    for label, r in [*plans, *(("rollup", r) for r in ro["timed"])]:
        lines = r["plan"] if len(r["plan"]) <= 40 else [*r["plan"][:40], "  ... (trimmed)"]
        md += ["", f"**{r['name']}**, {label}", "", "```", *lines, "```"]
    text = path.read_text() if path.exists() else "# Reporting at scale\n\n"
    head, _, rest = text.partition(MARK[0])
    path.write_text(head + "\n".join([*md, MARK[1]]) + (rest.partition(MARK[1])[2] or "\n"))


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
            info["machine"] = {"CPUs (nproc)": os.cpu_count(), **dict(zip(("PostgreSQL", *SHOW),
                               got.fetchone(), strict=True))}  # type: ignore[arg-type]  # fmt: skip
            info["machine"].update({f"{t} MiB (heap / indexes / total)": " / ".join(map(mib, s))
                                    for t, s in sizes(conn).items()})  # fmt: skip
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
