"""`inferq report` and `inferq prices`: the reports of `storage.reports` as a table, CSV or
JSON (and a figure), and the price and compute-rate versions of `storage.prices`.

Times are UTC: `--since` is inclusive, `--until` exclusive; both take an ISO date or date-time
(naive means UTC). Money is `Decimal` throughout: JSON writes it as a string, CSV as written.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal, InvalidOperation
from typing import IO, Any

REPORTS = ("usage", "latency", "engine", "failures", "jobs")
FORMATS = ("table", "csv", "json")
DEFAULT_DAYS = 7
NONE = "\N{EN DASH}"  # a missing value in a table
# which report takes which filter (others refuse it, rather than ignore it)
FILTERS = {
    "tenant": ("usage", "jobs"),
    "model": ("usage", "latency", "engine", "jobs"),
    "worker": ("engine",),
    "status": ("jobs",),
}
# the columns a table shows after the first (CSV and JSON give every column)
TABLE_COLUMNS = {
    "engine": (
        "worker",
        "model",
        "device",
        "busy_s",
        "idle_s",
        "busy_share",
        "output_tokens_per_s",
        "computed_tokens_per_busy_s",
        "mean_running_seqs",
        "prefix_hit_rate",
        "recompute_tokens",
    ),
    "jobs": (
        "tenant",
        "model",
        "status",
        "worker",
        "finished_at",
        "queue_wait_s",
        "ttft_s",
        "total_s",
        "prompt_tokens",
        "completion_tokens",
        "list_cost",
        "compute_cost",
        "error",
    ),
}
Row = dict[str, Any]


# -- parsing ---------------------------------------------------------------------------------


def parse_when(text: str) -> datetime:
    """An ISO date or date-time as tz-aware UTC (naive means UTC)."""
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO date or date-time: {text!r}") from None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def parse_money(text: str) -> Decimal:
    """A non-negative decimal amount with at most 10 places (the money columns' scale)."""
    try:
        value = Decimal(text)
    except InvalidOperation:
        raise argparse.ArgumentTypeError(f"not a decimal amount: {text!r}") from None
    if not value.is_finite() or value < 0:
        raise argparse.ArgumentTypeError(f"not a finite amount >= 0: {text!r}")
    if int(value.as_tuple().exponent) < -10:
        raise argparse.ArgumentTypeError(f"more than 10 decimal places: {text!r}")
    return value


def window(since: datetime | None, until: datetime | None) -> tuple[datetime, datetime]:
    """`[since, until)`: by default the last 7 UTC days, today included."""
    if until is None:
        today = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
        until = today + timedelta(days=1)
    return since or until - timedelta(days=DEFAULT_DAYS), until


# -- output ----------------------------------------------------------------------------------


def money(value: Decimal) -> str:
    """An amount with 4 to 6 decimals (rounded at the 6th)."""
    whole, _, fraction = f"{value.quantize(Decimal('1e-6')):f}".partition(".")
    return f"{whole}.{fraction.rstrip('0').ljust(4, '0')}"


def cell(value: Any) -> str:
    """A value as a table shows it."""
    if value is None:
        return NONE
    if isinstance(value, Decimal):
        return money(value)
    if isinstance(value, float):
        return f"{value:,.3f}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    if isinstance(value, datetime):
        return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")
    return value.isoformat() if isinstance(value, date) else str(value)


def plain(value: Any) -> Any:
    """A value for JSON (money and ids as strings, times in ISO 8601)."""
    if isinstance(value, (date, datetime)):
        return value.isoformat()
    if isinstance(value, (Decimal, uuid.UUID)):
        return str(value)
    raise TypeError(f"not serializable: {type(value).__name__}")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, Decimal)) and not isinstance(value, bool)


def _totals(rows: Sequence[Row], columns: Sequence[str]) -> list[str]:
    """A footer: the sum of each numeric column (counts, tokens, seconds, money)."""
    footer = ["total"]
    for name in columns[1:]:
        values = [r[name] for r in rows if r[name] is not None]
        numeric = values and all(_is_number(v) for v in values)
        footer.append(cell(sum(values)) if numeric else "")
    return footer


def emit(
    rows: Sequence[Row],
    fmt: str,
    title: str,
    out: IO[str],
    totals: bool = False,
    shown: Sequence[str] = (),
) -> None:
    """Write `rows` as a rich table (the first column and `shown`, or all), CSV (header
    first) or a JSON list of objects."""
    if fmt == "json":
        json.dump(list(rows), out, default=plain, indent=2)
        out.write("\n")
        return
    columns = list(rows[0]) if rows else []
    if fmt == "csv":
        writer = csv.writer(out, lineterminator="\n")
        if columns:
            writer.writerow(columns)
        for r in rows:
            writer.writerow(["" if r[c] is None else plain_text(r[c]) for c in columns])
        return
    from rich.console import Console
    from rich.table import Table

    console = Console(file=out, width=None if out.isatty() else 240)
    if not rows:
        console.print(f"{title}: no rows")
        return
    if shown:
        columns = [columns[0], *shown]
    table = Table(title=title, show_footer=totals)
    footer = _totals(rows, columns) if totals else [""] * len(columns)
    for name, foot in zip(columns, footer, strict=True):
        numeric = any(_is_number(r[name]) for r in rows)
        table.add_column(
            name,
            footer=foot,
            justify="right" if numeric else "left",
            min_width=36 if name == "job_id" else None,
        )
    for r in rows:
        table.add_row(*(cell(r[c]) for c in columns))
    console.print(table)


def plain_text(value: Any) -> str:
    """A value for CSV: as written (money exact), times in ISO 8601."""
    return value.isoformat() if isinstance(value, (date, datetime)) else str(value)


# -- commands --------------------------------------------------------------------------------


def _engine() -> Any:
    from inferq.settings import get_settings
    from storage.db import make_engine

    return make_engine(get_settings().resolved_database_url)


def _guarded(command: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Database errors as one line on stderr (exit 1), with the usual cause named."""

    def run(args: argparse.Namespace) -> int:
        import sqlalchemy as sa

        try:
            return command(args)
        except sa.exc.DBAPIError as exc:
            print(f"error: {type(exc.orig).__name__}: {exc.orig}".rstrip(), file=sys.stderr)
            print("(is the database migrated? `inferq migrate`)", file=sys.stderr)
            return 1

    return run


def _report_args(args: argparse.Namespace, since: datetime, until: datetime) -> dict[str, Any]:
    """Keyword arguments for the report's statement and function."""
    kw: dict[str, Any] = {"since": since, "until": until}
    kw.update({f: getattr(args, f) for f, kinds in FILTERS.items() if args.kind in kinds})
    if args.kind == "jobs":
        kw["limit"] = args.limit
    else:
        kw["by"] = args.by or ("hour" if args.kind == "engine" else "day")
    return kw


def cmd_report(args: argparse.Namespace) -> int:
    """`inferq report KIND`: print one report; `--plot` also draws the figure."""
    from storage import reports

    for name, kinds in FILTERS.items():
        if getattr(args, name) is not None and args.kind not in kinds:
            print(f"error: --{name} does not apply to the {args.kind} report", file=sys.stderr)
            return 2
    since, until = window(args.since, args.until)
    if since >= until:
        print("error: --since must be before --until", file=sys.stderr)
        return 2
    engine = _engine()
    kw = _report_args(args, since, until)
    if args.sql:
        statement = reports.STATEMENTS[args.kind](engine.dialect.name, **kw)
        print(reports.render_sql(engine, statement) + ";")
        return 0
    run = {
        "usage": reports.usage,
        "latency": reports.latency,
        "failures": reports.failures,
        "engine": reports.engine_efficiency,
        "jobs": reports.jobs,
    }[args.kind]
    rows = run(engine, **kw)
    span = f"{since:%Y-%m-%d %H:%M} to {until:%Y-%m-%d %H:%M} UTC"
    by = f" by {kw['by']}" if "by" in kw else ""
    title = f"{args.kind}{by}, {span}"
    shown = TABLE_COLUMNS.get(args.kind, ())
    emit(rows, args.format, title, sys.stdout, totals=args.kind == "usage", shown=shown)
    if args.plot:
        from inferq.report_plot import plot_report

        by = args.by or "day"
        usage = reports.usage(engine, since, until, args.tenant, args.model, by)
        latency = reports.latency(engine, since, until, args.model, by)
        plot_report(args.plot, usage, latency, by, since, until)
        print(f"figure written to {args.plot}", file=sys.stderr)
    return 0


def cmd_prices_set(args: argparse.Namespace) -> int:
    """`inferq prices set MODEL`: add a price version."""
    from storage.prices import set_price

    price_id = set_price(
        _engine(),
        args.model,
        args.prompt,
        args.cached,
        args.completion,
        args.effective_from,
        args.currency,
    )
    print(
        f"price {price_id} for {args.model}: prompt {args.prompt}, cached {args.cached}, "
        f"completion {args.completion} {args.currency} per million tokens"
    )
    return 0


def cmd_prices_rate(args: argparse.Namespace) -> int:
    """`inferq prices rate TARGET`: add a compute rate version."""
    from storage.prices import set_rate

    rate_id = set_rate(_engine(), args.target, args.per_hour, args.effective_from, args.currency)
    print(f"rate {rate_id} for {args.target}: {args.per_hour} {args.currency} per hour")
    return 0


def cmd_prices_list(args: argparse.Namespace) -> int:
    """`inferq prices list`: every price and rate version, oldest first per model/target."""
    from storage.prices import list_prices

    prices, rates = list_prices(_engine())
    rows = [
        {
            "kind": "price",
            "id": p.id,
            "target": p.model,
            "effective_from": p.effective_from,
            "prompt_per_mtok": p.prompt_per_mtok,
            "cached_prompt_per_mtok": p.cached_prompt_per_mtok,
            "completion_per_mtok": p.completion_per_mtok,
            "per_hour": None,
            "currency": p.currency,
        }
        for p in prices
    ] + [
        {
            "kind": "rate",
            "id": r.id,
            "target": r.target,
            "effective_from": r.effective_from,
            "prompt_per_mtok": None,
            "cached_prompt_per_mtok": None,
            "completion_per_mtok": None,
            "per_hour": r.per_hour,
            "currency": r.currency,
        }
        for r in rates
    ]
    emit(rows, args.format, "prices (per million tokens) and compute rates", sys.stdout)
    return 0


# -- parsers ---------------------------------------------------------------------------------


def cmd_retention(args: argparse.Namespace) -> int:
    """`inferq retention --older-than-days N`: delete old ended jobs and dead letters."""
    import time
    from datetime import UTC, timedelta

    from storage.retention import purge

    before = datetime.now(UTC) - timedelta(days=args.older_than_days)
    started = time.perf_counter()
    purged = purge(_engine(), before, args.batch)
    print(
        f"deleted {purged.jobs} jobs (with their results and facts), {purged.batches} "
        f"batches and {purged.dead_letters} dead letters older than {before:%Y-%m-%d %H:%M} "
        f"UTC in {time.perf_counter() - started:.1f}s"
    )
    return 0


def add_parsers(verbs: Any) -> None:
    """Add the `report`, `prices` and `retention` verbs to the `inferq` subparsers."""
    report = verbs.add_parser("report", help="usage, latency, engine, failure and job reports")
    report.add_argument("kind", nargs="?", default="usage", choices=REPORTS)
    report.add_argument("--tenant", help="usage, jobs: one tenant")
    report.add_argument("--model", help="usage, latency, engine, jobs: one model")
    report.add_argument("--worker", help="engine: one worker")
    report.add_argument("--status", help="jobs: one status (done, failed, ...)")
    report.add_argument("--since", type=parse_when, help="ISO date/time, UTC (default: 7 days)")
    report.add_argument("--until", type=parse_when, help="exclusive (default: end of today)")
    report.add_argument("--by", choices=("day", "hour"), help="bucket (engine: hour, else day)")
    report.add_argument("--format", choices=FORMATS, default="table")
    report.add_argument("--limit", type=int, default=100, help="jobs: how many, newest first")
    report.add_argument("--plot", metavar="FILE.png", help="also draw throughput/latency/cost")
    report.add_argument("--sql", action="store_true", help="print the query instead of rows")
    report.set_defaults(func=_guarded(cmd_report))

    prices = verbs.add_parser("prices", help="price and compute-rate versions")
    prices_verbs = prices.add_subparsers(dest="prices_verb", required=True)
    set_ = prices_verbs.add_parser("set", help="a model's prices per million tokens")
    set_.add_argument("model")
    for flag, what in (
        ("--prompt", "uncached prompt"),
        ("--cached", "cached prompt"),
        ("--completion", "completion"),
    ):
        set_.add_argument(flag, type=parse_money, required=True, help=f"{what} tokens")
    set_.add_argument("--from", dest="effective_from", type=parse_when, help="default: now")
    set_.add_argument("--currency", default="USD")
    set_.set_defaults(func=_guarded(cmd_prices_set))
    rate = prices_verbs.add_parser("rate", help="an hour of a worker or device class")
    rate.add_argument("target", help="a worker name or a device class (cpu, cuda:NVIDIA H200)")
    rate.add_argument("--per-hour", type=parse_money, required=True)
    rate.add_argument("--from", dest="effective_from", type=parse_when, help="default: now")
    rate.add_argument("--currency", default="USD")
    rate.set_defaults(func=_guarded(cmd_prices_rate))
    listing = prices_verbs.add_parser("list", help="every price and rate version")
    listing.add_argument("--format", choices=FORMATS, default="table")
    listing.set_defaults(func=_guarded(cmd_prices_list))

    keep = verbs.add_parser("retention", help="delete ended jobs and dead letters past N days")
    keep.add_argument("--older-than-days", type=float, required=True)
    keep.add_argument("--batch", type=int, default=20_000, help="rows per transaction")
    keep.set_defaults(func=_guarded(cmd_retention))
