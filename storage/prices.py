"""Prices per model and compute rates per worker or device class: versioned rows, and the
cost of a job at the versions in force when it ended. Money is `Decimal`, never float."""

from __future__ import annotations

import bisect
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from decimal import ROUND_HALF_EVEN, Decimal
from typing import Any

import sqlalchemy as sa

from storage.models import compute_rates_table, prices_table
from storage.records import EndedJob, as_utc, utcnow

P, C = prices_table, compute_rates_table
PLACES = Decimal("1e-10")  # the money columns' scale
MILLION = Decimal(1_000_000)
SECONDS_PER_HOUR = Decimal(3600)


def money(value: Decimal) -> Decimal:
    """`value` rounded to the stored scale (banker's rounding)."""
    return value.quantize(PLACES, rounding=ROUND_HALF_EVEN)


@dataclass(frozen=True, slots=True)
class Price:
    id: int
    model: str
    effective_from: datetime
    prompt_per_mtok: Decimal
    cached_prompt_per_mtok: Decimal
    completion_per_mtok: Decimal
    currency: str = "USD"


@dataclass(frozen=True, slots=True)
class Rate:
    id: int
    target: str  # a worker name or a device class
    effective_from: datetime
    per_hour: Decimal
    currency: str = "USD"


def list_cost(price: Price, prompt: int, cached: int, completion: int) -> Decimal:
    """Tokens at list price: uncached prompt, cached prompt and completion tokens."""
    per_million = (
        (prompt - cached) * price.prompt_per_mtok
        + cached * price.cached_prompt_per_mtok
        + completion * price.completion_per_mtok
    )
    return money(per_million / MILLION)


def cache_savings(price: Price, cached: int) -> Decimal:
    """What the cached prompt tokens would have cost at the uncached prompt price, less
    what they cost as cached tokens."""
    return money(cached * (price.prompt_per_mtok - price.cached_prompt_per_mtok) / MILLION)


def compute_cost(rate: Rate, compute_s: float) -> Decimal:
    """Engine seconds at the hourly rate (seconds taken to the microsecond first)."""
    return money(Decimal(f"{compute_s:.6f}") * rate.per_hour / SECONDS_PER_HOUR)


def _in_force(versions: list[Any], at: datetime) -> Any | None:
    """The latest version effective at `at` (versions sorted by effective_from)."""
    i = bisect.bisect_right([v.effective_from for v in versions], at)
    return versions[i - 1] if i else None


# Built once (the result sink bills every commit), the lists bound at execution.
_PRICES = (
    sa.select(P)
    .where(P.c.model.in_(sa.bindparam("models", expanding=True)))
    .order_by(P.c.effective_from)
)
_RATES = (
    sa.select(C)
    .where(C.c.target.in_(sa.bindparam("targets", expanding=True)))
    .order_by(C.c.effective_from)
)


@dataclass
class Billing:
    """The price and rate versions of some models and targets, loaded in one transaction."""

    prices: dict[str, list[Price]] = field(default_factory=dict)
    rates: dict[str, list[Rate]] = field(default_factory=dict)

    @classmethod
    def load(cls, conn: sa.Connection, models: Iterable[str], targets: Iterable[str]) -> Billing:
        billing = cls()
        for row in conn.execute(_PRICES, {"models": list(models)}).mappings():
            billing.prices.setdefault(row["model"], []).append(_price(row))
        for row in conn.execute(_RATES, {"targets": list(targets)}).mappings():
            billing.rates.setdefault(row["target"], []).append(_rate(row))
        return billing

    def bill(self, usage: EndedJob) -> dict[str, Any]:
        """Price and rate ids and the three money figures (None where no price or rate)."""
        at = as_utc(usage.finished_at)
        price = _in_force(self.prices.get(usage.model, []), at) if usage.with_result else None
        rate = _in_force(self.rates.get(usage.worker, []), at) or _in_force(
            self.rates.get(usage.device, []), at
        )
        tokens = (usage.prompt_tokens, usage.cached_prompt_tokens, usage.completion_tokens)
        return {
            "price_id": price and price.id,
            "rate_id": rate and rate.id,
            "list_cost": price and list_cost(price, *tokens),
            "cache_savings": price and cache_savings(price, usage.cached_prompt_tokens),
            "compute_cost": rate and compute_cost(rate, usage.compute_s),
        }


def _price(row: Any) -> Price:
    return Price(
        row["id"],
        row["model"],
        as_utc(row["effective_from"]),
        Decimal(row["prompt_per_mtok"]),
        Decimal(row["cached_prompt_per_mtok"]),
        Decimal(row["completion_per_mtok"]),
        row["currency"],
    )


def _rate(row: Any) -> Rate:
    return Rate(
        row["id"],
        row["target"],
        as_utc(row["effective_from"]),
        Decimal(row["per_hour"]),
        row["currency"],
    )


def _add_version(engine: sa.Engine, table: sa.Table, row: dict[str, Any]) -> int:
    """Insert one version row; its id."""
    with engine.begin() as conn:
        return int(conn.execute(sa.insert(table).values(row).returning(table.c.id)).scalar_one())


def set_price(
    engine: sa.Engine,
    model: str,
    prompt: Decimal,
    cached_prompt: Decimal,
    completion: Decimal,
    effective_from: datetime | None = None,
    currency: str = "USD",
) -> int:
    """Add a price version for `model` (per million tokens); returns its id."""
    row = {
        "model": model,
        "effective_from": as_utc(effective_from or utcnow()),
        "prompt_per_mtok": prompt,
        "cached_prompt_per_mtok": cached_prompt,
        "completion_per_mtok": completion,
        "currency": currency,
    }
    return _add_version(engine, P, row)


def set_rate(
    engine: sa.Engine,
    target: str,
    per_hour: Decimal,
    effective_from: datetime | None = None,
    currency: str = "USD",
) -> int:
    """Add a compute rate version for a worker name or device class; returns its id."""
    row = {
        "target": target,
        "effective_from": as_utc(effective_from or utcnow()),
        "per_hour": per_hour,
        "currency": currency,
    }
    return _add_version(engine, C, row)


def list_prices(engine: sa.Engine) -> tuple[list[Price], list[Rate]]:
    """Every price and rate version, oldest first."""
    with engine.connect() as conn:
        prices = [
            _price(r) for r in conn.execute(sa.select(P).order_by(P.c.model, P.c.id)).mappings()
        ]
        rates = [
            _rate(r) for r in conn.execute(sa.select(C).order_by(C.c.target, C.c.id)).mappings()
        ]
    return prices, rates
