"""`inferq report` and `inferq prices` on PostgreSQL and SQLite: every format parses, the
figure is a PNG, prices go in and come out as exact decimals."""

from __future__ import annotations

import csv
import io
import json
import uuid
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path

import pytest
from report_data import DAY, Dataset, build

from inferq.cli import main

Run = Callable[..., tuple[int, str, str]]


@pytest.fixture
def inferq(
    db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> Run:
    """Run `inferq ARGS` on the test database: (exit code, stdout, stderr)."""
    monkeypatch.setenv("INFERQ_DATABASE_URL", db_url)
    monkeypatch.setenv("INFERQ_HOME", str(tmp_path / "home"))

    def run(*argv: str) -> tuple[int, str, str]:
        code = main(list(argv))
        out, err = capsys.readouterr()
        return code, out, err

    return run


@pytest.fixture
def ds(db_url: str) -> Dataset:
    return build(db_url)


def _window(ds: Dataset) -> list[str]:
    return ["--since", ds.base.date().isoformat(), "--until", (ds.base + 2 * DAY).isoformat()]


def test_usage_as_json_csv_and_table(inferq: Run, ds: Dataset) -> None:
    code, out, _ = inferq("report", "--tenant", ds.a, "--format", "json", *_window(ds))
    assert code == 0
    rows = json.loads(out)
    assert [(r["day"], r["model"], r["jobs"]) for r in rows] == [
        (ds.base.date().isoformat(), ds.x, 10),
        (ds.base.date().isoformat(), ds.y, 2),
    ]
    assert Decimal(rows[0]["list_cost"]) == Decimal("0.306") and rows[1]["list_cost"] is None
    assert Decimal(rows[0]["compute_cost"]) == Decimal("0.072")

    code, out, _ = inferq("report", "usage", "--model", ds.x, "--format", "csv", *_window(ds))
    assert code == 0
    table = list(csv.DictReader(io.StringIO(out)))
    assert [(r["tenant"], r["jobs"], r["done"]) for r in table] == [
        (ds.a, "10", "6"),
        (ds.b, "13", "11"),
    ]
    assert Decimal(table[1]["list_cost"]) == Decimal("0.561")

    code, out, _ = inferq("report", "--tenant", ds.a, *_window(ds))
    assert code == 0
    assert "0.3060" in out and "0.0720" in out  # money: 4 to 6 decimals
    assert "\N{EN DASH}" in out and "total" in out  # no price: a dash; a footer of sums
    assert "60,000" in out and "80,000" in out  # prompt tokens, per row and in total


def test_latency_engine_failures_and_jobs(inferq: Run, ds: Dataset) -> None:
    code, out, _ = inferq("report", "latency", "--model", ds.x, "--format", "csv", *_window(ds))
    assert code == 0
    rows = list(csv.DictReader(io.StringIO(out)))
    assert [r["jobs"] for r in rows] == ["6", "11"]
    assert float(rows[0]["ttft_s_p95"]) == pytest.approx(0.88)
    assert float(rows[1]["total_s_p99"]) == pytest.approx(21.8)

    code, out, _ = inferq(
        "report", "engine", "--worker", ds.w1, "--by", "day", "--format", "json", *_window(ds)
    )
    assert code == 0
    (day,) = json.loads(out)
    assert (day["busy_share"], day["prefix_hit_rate"]) == (0.375, 0.5)

    code, out, _ = inferq("report", "failures", "--format", "json", *_window(ds))
    assert code == 0
    failures = [(r["kind"], r["reason"], r["count"]) for r in json.loads(out)]
    assert ("failed", "CUDA OOM", 2) in failures and ("dead_letter", "not json", 1) in failures

    code, out, _ = inferq(
        "report", "jobs", "--tenant", ds.b, "--status", "failed", "--format", "json", *_window(ds)
    )
    assert code == 0
    jobs = json.loads(out)
    assert [j["error"] for j in jobs] == ["x" * 100, "boom"]
    assert uuid.UUID(jobs[0]["job_id"]) and Decimal(jobs[0]["compute_cost"]) == Decimal("0.004")

    for kind in ("latency", "engine", "failures", "jobs"):  # every table renders
        code, out, _ = inferq("report", kind, *_window(ds))
        assert code == 0 and out.strip(), kind


def test_plot_writes_a_png(inferq: Run, ds: Dataset, tmp_path: Path) -> None:
    for by in ("day", "hour"):
        figure = tmp_path / f"report-{by}.png"
        code, _, err = inferq("report", "--by", by, "--plot", str(figure), *_window(ds))
        assert code == 0, err
        assert figure.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
        assert figure.stat().st_size > 10_000


def test_sql_and_refused_filters(inferq: Run, ds: Dataset) -> None:
    code, out, _ = inferq("report", "usage", "--sql", "--tenant", ds.a, *_window(ds))
    assert code == 0
    assert out.startswith("SELECT") and "job_metrics.finished_at >=" in out and ds.a in out
    code, _, err = inferq("report", "latency", "--tenant", ds.a)
    assert code == 2 and "--tenant does not apply" in err
    code, _, err = inferq("report", "--since", "2026-01-02", "--until", "2026-01-01")
    assert code == 2 and "before" in err
    with pytest.raises(SystemExit):
        inferq("report", "--since", "yesterday")


def test_prices_set_rate_and_list(inferq: Run) -> None:
    model, worker = f"m-{uuid.uuid4().hex[:8]}", f"w-{uuid.uuid4().hex[:8]}"
    code, out, _ = inferq(
        "prices",
        "set",
        model,
        "--prompt",
        "0.15",
        "--cached",
        "0.075",
        "--completion",
        "0.6",
        "--from",
        "2026-01-01T00:00:00Z",
    )
    assert code == 0 and model in out
    code, out, _ = inferq("prices", "rate", worker, "--per-hour", "2.5")
    assert code == 0 and "2.5 USD per hour" in out
    code, out, _ = inferq("prices", "list", "--format", "json")
    assert code == 0
    rows = {r["target"]: r for r in json.loads(out)}
    price, rate = rows[model], rows[worker]
    assert price["kind"] == "price" and price["effective_from"].startswith("2026-01-01T00:00")
    per_mtok = ("prompt_per_mtok", "cached_prompt_per_mtok", "completion_per_mtok")
    assert [Decimal(price[k]) for k in per_mtok] == [Decimal(v) for v in ("0.15", "0.075", "0.6")]
    assert rate["kind"] == "rate" and Decimal(rate["per_hour"]) == Decimal("2.5")
    code, out, _ = inferq("prices", "list")
    assert code == 0 and model in out

    # the same version twice is refused by the database, reported on one line
    code, _, err = inferq(
        "prices",
        "set",
        model,
        "--prompt",
        "1",
        "--cached",
        "1",
        "--completion",
        "1",
        "--from",
        "2026-01-01",
    )
    assert code == 1 and err.startswith("error: ")
    for bad in ("-1", "abc", "NaN", "0.00000000001"):
        with pytest.raises(SystemExit):
            inferq("prices", "rate", worker, "--per-hour", bad)
