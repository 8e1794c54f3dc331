"""The SQL and the synthetic data's shape for bench/report_scale.py (kept apart so the
script stays readable): the loader's statements, the timed queries, the rollup prototype and
the retention delete."""

from __future__ import annotations

TARGET_MS = 2000.0
TENANTS = [f"tenant-{i:02d}" for i in range(1, 21)]  # Zipf-like: weight 1/rank
MODELS = ["tinyllama-1.1b-chat", "qwen2.5-7b-instruct", "llama-3.1-70b-instruct"]
MODEL_CDF = [0.55, 0.9]  # 55 %, 35 %, 10 % of the jobs
PRICES = [("0.10", "0.025", "0.40"), ("0.30", "0.075", "1.20"), ("2.00", "0.50", "6.00")]
DEVICES = {"cpu": "0.20", "cuda:NVIDIA H200": "4.50"}  # compute rate per hour
WORKERS = [
    ("worker-0", "cuda:NVIDIA H200"),
    ("worker-1", "cuda:NVIDIA H200"),
    ("worker-2", "cpu"),
    ("worker-3", "cpu"),
]
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
SUMMED = (
    "prompt_tokens",
    "cached_prompt_tokens",
    "computed_prompt_tokens",
    "completion_tokens",
    "compute_s",
    "list_cost",
    "compute_cost",
    "cache_savings",
)
STATUSES = ("done", "failed", "cancelled", "expired")
AGGS = ", ".join(
    [
        "count(*) AS jobs",
        *(f"count(*) FILTER (WHERE status = '{s}') AS {s}" for s in STATUSES),
        *(f"sum({c}) AS {c}" for c in SUMMED),
    ]
)
USAGE_COLS = ", ".join(["tenant, model, day, jobs", *STATUSES, *SUMMED])
RAW_USAGE = f"""SELECT tenant, model, {DAY} AS day, {AGGS} FROM job_metrics
WHERE finished_at >= %(t0)s AND finished_at < %(t1)s {{extra}}
GROUP BY tenant, model, {DAY} ORDER BY day, tenant, model"""
LAT = ", ".join(
    f"percentile_cont(ARRAY[0.5, 0.95, 0.99]) WITHIN GROUP (ORDER BY {c}) AS {c}"
    for c in ("queue_wait_s", "ttft_s", "total_s", "decode_tokens_per_s")
)
RAW_LAT = f"""SELECT model, {{bucket}} AS bucket, count(*) AS jobs, {LAT} FROM job_metrics
WHERE status = 'done' AND finished_at >= %(t0)s AND finished_at < %(t1)s
GROUP BY model, {{bucket}} ORDER BY model, bucket"""
TOP_COST = """SELECT tenant, {jobs} AS jobs, sum(list_cost) AS list_cost,
  sum(compute_cost) AS compute_cost FROM {src} GROUP BY tenant
ORDER BY list_cost DESC NULLS LAST LIMIT 10"""
ROLLUP_COLS = ("jobs", *STATUSES, *SUMMED)
ROLLUP_DDL = [
    "CREATE TABLE usage_daily_rollup (tenant varchar(128) NOT NULL, model varchar(256) NOT NULL, "
    "day date NOT NULL, "
    + ", ".join(f"{c} bigint NOT NULL DEFAULT 0" for c in ROLLUP_COLS[:9])
    + ", compute_s double precision NOT NULL DEFAULT 0, "
    + ", ".join(f"{c} numeric(30, 10) NOT NULL DEFAULT 0" for c in SUMMED[5:])
    + ", PRIMARY KEY (tenant, model, day))",
    "CREATE INDEX ix_usage_daily_rollup_day ON usage_daily_rollup (day)",
]
# The facts of the given jobs, signed: the write path would retract (-1) a batch's rows before
# it changes them and add them (+1) after, in the same transaction.
ROLLUP_SELECT = (
    f"""SELECT coalesce(tenant, '') AS tenant, coalesce(model, '') AS model,
{DAY} AS day, {{sign}} * count(*) AS jobs, """
    + ", ".join(
        [
            *(f"{{sign}} * count(*) FILTER (WHERE status = '{s}') AS {s}" for s in STATUSES),
            *(f"{{sign}} * coalesce(sum({c}), 0) AS {c}" for c in SUMMED),
        ]
    )
    + " FROM job_metrics WHERE finished_at IS NOT NULL {where} GROUP BY 1, 2, 3"
)
ROLLUP_FILL = "INSERT INTO usage_daily_rollup " + ROLLUP_SELECT.format(sign=1, where="")
ROLLUP_UPSERT = (
    "INSERT INTO usage_daily_rollup AS r "
    + ROLLUP_SELECT.format(sign="%(sign)s", where="AND job_id = ANY(%(ids)s)")
    + " ORDER BY 1, 2, 3 ON CONFLICT "
    "(tenant, model, day) DO UPDATE SET "
    + ", ".join(f"{c} = r.{c} + EXCLUDED.{c}" for c in ROLLUP_COLS)
)
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
    (
        "+ statistics",
        [
            f"CREATE STATISTICS st_job_metrics_usage_day (ndistinct) ON tenant, "
            f"model, ({DAY}) FROM job_metrics",
            "ANALYZE job_metrics",
        ],
        False,
    ),
    ("+ statistics, generic plans", ["SET plan_cache_mode = force_generic_plan"], True),
    (
        "+ day indexes",
        [
            "RESET plan_cache_mode",
            f"CREATE INDEX ix_job_metrics_utc_day ON job_metrics (({DAY}))",
            f"CREATE INDEX ix_job_metrics_tenant_utc_day ON job_metrics (tenant, ({DAY}))",
            "ANALYZE job_metrics",
        ],
        False,
    ),
]
UNDO = [
    "DROP INDEX IF EXISTS ix_job_metrics_utc_day, ix_job_metrics_tenant_utc_day",
    "DROP STATISTICS IF EXISTS st_job_metrics_usage_day",
    "ANALYZE job_metrics",
]
RETENTION = """DELETE FROM jobs WHERE id IN (SELECT id FROM jobs WHERE queued_at < %s
  AND status IN ('done', 'failed', 'cancelled', 'expired') ORDER BY queued_at LIMIT %s)"""
SIZES = """SELECT relname, pg_relation_size(oid), pg_indexes_size(oid), pg_total_relation_size(oid)
FROM pg_class WHERE relname IN ('jobs', 'job_metrics', 'results') AND relkind = 'r'
ORDER BY relname"""
SHOW = ("shared_buffers", "work_mem", "max_parallel_workers_per_gather", "jit", "autovacuum")
