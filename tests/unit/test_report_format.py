"""The report helpers that need no database: percentiles, money and time parsing, cells."""

from __future__ import annotations

import argparse
import uuid
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal

import pytest

from inferq.report_cli import cell, money, parse_money, parse_when, plain, window
from inferq.report_plot import buckets
from storage.reports import percentile_cont


def test_percentile_cont_interpolates_between_closest_ranks() -> None:
    assert percentile_cont([], 0.5) is None
    assert percentile_cont([7.0], 0.99) == 7.0
    five = [1.0, 2.0, 3.0, 4.0, 10.0]  # position q * 4
    assert percentile_cont(five, 0.5) == 3.0
    assert percentile_cont(five, 0.95) == pytest.approx(4 + 0.8 * 6)
    assert percentile_cont(five, 0.99) == pytest.approx(4 + 0.96 * 6)
    eleven = [float(v) for v in range(1, 12)]  # position q * 10
    assert [percentile_cont(eleven, q) for q in (0.5, 0.95, 0.99)] == pytest.approx(
        [6.0, 10.5, 10.9]
    )
    assert percentile_cont([0.4, 1.0], 0.5) == pytest.approx(0.7)


def test_money_shows_four_to_six_decimals() -> None:
    assert money(Decimal("0.3060000000")) == "0.3060"
    assert money(Decimal("0.0012500000")) == "0.00125"
    assert money(Decimal("1.2345678")) == "1.234568"
    assert money(Decimal(2)) == "2.0000"
    assert money(Decimal("1234.5")) == "1234.5000"


def test_cells_and_plain_values() -> None:
    assert cell(None) == "\N{EN DASH}"
    assert cell(12_000) == "12,000" and cell(0.375) == "0.375"
    assert cell(datetime(2026, 1, 2, 3, tzinfo=UTC)) == "2026-01-02 03:00:00"
    assert cell(date(2026, 1, 2)) == "2026-01-02"
    ident = uuid.uuid4()
    assert plain(ident) == str(ident) and plain(Decimal("0.1")) == "0.1"
    assert plain(date(2026, 1, 2)) == "2026-01-02"
    with pytest.raises(TypeError):
        plain(object())


def test_parse_when_and_money() -> None:
    assert parse_when("2026-01-02") == datetime(2026, 1, 2, tzinfo=UTC)
    assert parse_when("2026-01-02T03:00:00+02:00") == datetime(2026, 1, 2, 1, tzinfo=UTC)
    assert parse_when("2026-01-02T03:00Z") == datetime(2026, 1, 2, 3, tzinfo=UTC)
    assert parse_money("0.15") == Decimal("0.15") and parse_money("0") == 0
    for bad in ("x", "-1", "Infinity", "NaN", "1e-11"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_money(bad)
    with pytest.raises(argparse.ArgumentTypeError):
        parse_when("yesterday")


def test_default_window_is_the_last_seven_days_with_today() -> None:
    since, until = window(None, None)
    assert until - since == timedelta(days=7)
    assert until.hour == 0 and since < datetime.now(UTC) < until
    given = datetime(2026, 1, 8, tzinfo=UTC)
    assert window(None, given) == (given - timedelta(days=7), given)


def test_plot_buckets_cover_the_window() -> None:
    since = datetime(2026, 1, 1, 5, 30, tzinfo=UTC)
    days = buckets(since, datetime(2026, 1, 3, tzinfo=UTC), "day")
    assert days == [datetime(2026, 1, 1, tzinfo=UTC), datetime(2026, 1, 2, tzinfo=UTC)]
    assert len(buckets(since, datetime(2026, 1, 1, 8, tzinfo=UTC), "hour")) == 3
