"""The `inferq report --plot` figure: per day (or hour), throughput, latency percentiles and
cost, drawn with matplotlib's Agg canvas (no display needed)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any

Row = dict[str, Any]
SECONDS = {"day": 86_400, "hour": 3_600}
LATENCY_SERIES = (
    ("ttft_s_p50", "TTFT p50", "-"),
    ("ttft_s_p95", "TTFT p95", "--"),
    ("total_s_p50", "total p50", "-"),
    ("total_s_p95", "total p95", "--"),
)
COST_SERIES = (("list_cost", "list", -0.25), ("compute_cost", "compute", 0.25))


def as_instant(value: date | datetime) -> datetime:
    """A bucket key as a UTC datetime (a day at its midnight)."""
    if isinstance(value, datetime):
        return value.astimezone(UTC)
    return datetime(value.year, value.month, value.day, tzinfo=UTC)


def buckets(since: datetime, until: datetime, by: str) -> list[datetime]:
    """Every bucket start in `[since, until)`, the first one truncated to its day/hour."""
    start = since.astimezone(UTC).replace(minute=0, second=0, microsecond=0)
    if by == "day":
        start = start.replace(hour=0)
    step, starts = timedelta(seconds=SECONDS[by]), []
    while start < until:
        starts.append(start)
        start += step
    return starts


def plot_report(
    path: str,
    usage: Sequence[Row],
    latency: Sequence[Row],
    by: str,
    since: datetime,
    until: datetime,
) -> None:
    """Write a PNG with three panels sharing the time axis: completion tokens/s and jobs,
    p50/p95 TTFT and total time per model, list and compute cost side by side."""
    try:
        from matplotlib import dates
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise SystemExit("--plot needs matplotlib: pip install 'inferq[report]'") from exc

    starts = buckets(since, until, by)
    step = timedelta(seconds=SECONDS[by])
    tokens: dict[datetime, int] = defaultdict(int)
    jobs: dict[datetime, int] = defaultdict(int)
    costs: dict[str, dict[datetime, Decimal]] = {n: defaultdict(Decimal) for n, *_ in COST_SERIES}
    for r in usage:
        at = as_instant(r[by])
        tokens[at] += r["completion_tokens"] or 0
        jobs[at] += r["jobs"]
        for name, series in costs.items():
            series[at] += r[name] or Decimal(0)

    fig = Figure(figsize=(11, 10), layout="constrained")
    FigureCanvasAgg(fig)
    top, middle, bottom = fig.subplots(3, 1, sharex=True)
    centres = [dates.date2num(s + step / 2) for s in starts]
    width = 0.8 * SECONDS[by] / SECONDS["day"]  # in days, matplotlib's date unit

    count_axis = top.twinx()
    count_axis.bar(centres, [jobs[s] for s in starts], width, color="0.8", label="jobs ended")
    count_axis.set_ylabel("jobs")
    top.set_zorder(count_axis.get_zorder() + 1)
    top.patch.set_visible(False)
    top.plot(centres, [tokens[s] / SECONDS[by] for s in starts], "o-", label="completion tok/s")
    top.set_ylabel(f"completion tokens/s (mean over the {by})")
    top.set_title("throughput")
    _legend(top, count_axis)

    by_model: dict[str | None, dict[datetime, Row]] = defaultdict(dict)
    for r in latency:
        by_model[r["model"]][as_instant(r[by])] = r
    for i, (model, rows) in enumerate(sorted(by_model.items(), key=lambda kv: str(kv[0]))):
        for j, (column, label, style) in enumerate(LATENCY_SERIES):
            name = f"{model} {label}" if len(by_model) > 1 else label
            y = [_value(rows.get(s), column) for s in starts]  # NaN: a gap in the line
            middle.plot(
                centres, y, style, marker="o", color=f"C{(2 * i + j // 2) % 10}", label=name
            )
    middle.set_ylabel("seconds (done jobs)")
    middle.set_title("latency percentiles")
    if by_model:
        middle.legend(fontsize="small", ncols=2)

    for name, label, offset in COST_SERIES:
        values = [float(costs[name][s]) for s in starts]
        bottom.bar([c + offset * width for c in centres], values, width / 2, label=label)
    bottom.set_ylabel(f"cost per {by}")
    bottom.set_title("cost")
    bottom.legend(fontsize="small")

    locator = dates.AutoDateLocator()
    bottom.xaxis.set_major_locator(locator)
    bottom.xaxis.set_major_formatter(dates.ConciseDateFormatter(locator, tz=UTC))
    fig.suptitle(f"inferq, {since:%Y-%m-%d %H:%M} to {until:%Y-%m-%d %H:%M} UTC, by {by}")
    fig.savefig(path, dpi=100)


def _value(row: Row | None, column: str) -> float:
    """A figure to draw, NaN where there is none."""
    value = None if row is None else row[column]
    return float("nan") if value is None else float(value)


def _legend(*axes: Any) -> None:
    """One legend on the first axes for the artists of all of them."""
    handles, labels = [], []
    for axis in axes:
        h, lab = axis.get_legend_handles_labels()
        handles += h
        labels += lab
    axes[0].legend(handles, labels, fontsize="small", loc="upper left")
