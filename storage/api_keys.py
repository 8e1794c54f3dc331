"""Gateway API keys: issue, look up, revoke, list. A key is 32 random bytes (URL-safe
base64 behind `iq-`); only its SHA-256 is stored, so the table leaks no key, and a key is
looked up by its hash alone (a key this long needs no slow hash)."""

from __future__ import annotations

import hashlib
import re
import secrets
import uuid
from dataclasses import dataclass
from datetime import datetime

import sqlalchemy as sa

from storage.db import db_now, make_engine
from storage.gateway_models import api_keys_table, tenant_quotas_table

K, Q = api_keys_table, tenant_quotas_table
KEY_PREFIX = "iq-"
SHOWN_CHARS = 10  # of a key, kept to tell keys apart (`inferq keys list`)
TENANT_PATTERN = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")  # the wire's tenant rule


@dataclass(frozen=True, slots=True)
class TenantKey:
    """What a valid key stands for."""

    id: uuid.UUID
    tenant: str
    rate_limit_rpm: int | None
    tokens_per_minute: int | None = None  # the tenant's token quota (all its keys)
    tokens_per_day: int | None = None


@dataclass(frozen=True, slots=True)
class KeyRow:
    id: uuid.UUID
    tenant: str
    prefix: str
    rate_limit_rpm: int | None
    created_at: datetime
    revoked_at: datetime | None


def key_hash(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8", "replace")).hexdigest()


def _check_tenant(tenant: str) -> None:
    if not TENANT_PATTERN.fullmatch(tenant):
        raise ValueError("tenant: 1 to 128 of A-Z a-z 0-9 _ . : -")


class ApiKeys:
    """The `api_keys` table of one database."""

    def __init__(self, url_or_engine: str | sa.Engine) -> None:
        self.engine = (
            make_engine(url_or_engine) if isinstance(url_or_engine, str) else url_or_engine
        )

    def create(self, tenant: str, rate_limit_rpm: int | None = None) -> tuple[uuid.UUID, str]:
        """A new key for `tenant`: its row id and the key (shown once, never stored)."""
        _check_tenant(tenant)
        if rate_limit_rpm is not None and rate_limit_rpm < 1:
            raise ValueError("rate limit: at least 1 request a minute")
        key = KEY_PREFIX + secrets.token_urlsafe(32)
        row_id = uuid.uuid4()
        with self.engine.begin() as conn:
            conn.execute(
                sa.insert(K).values(
                    id=row_id,
                    tenant=tenant,
                    key_hash=key_hash(key),
                    prefix=key[:SHOWN_CHARS],
                    rate_limit_rpm=rate_limit_rpm,
                )
            )
        return row_id, key

    def lookup(self, key: str) -> TenantKey | None:
        """The tenant a key acts as; None: unknown or revoked."""
        if not key.startswith(KEY_PREFIX):
            return None
        query = (
            sa.select(
                K.c.id, K.c.tenant, K.c.rate_limit_rpm, Q.c.tokens_per_minute, Q.c.tokens_per_day
            )
            .select_from(K.outerjoin(Q, Q.c.tenant == K.c.tenant))
            .where(K.c.key_hash == key_hash(key), K.c.revoked_at.is_(None))
        )
        with self.engine.connect() as conn:
            row = conn.execute(query).first()
        return TenantKey(*row) if row else None

    def set_quota(
        self, tenant: str, tokens_per_minute: int | None, tokens_per_day: int | None
    ) -> None:
        """The tenant's token quota from now on (None: no limit on that window)."""
        _check_tenant(tenant)
        if any(n is not None and n < 1 for n in (tokens_per_minute, tokens_per_day)):
            raise ValueError("token quota: at least 1 token")
        with self.engine.begin() as conn:
            conn.execute(sa.delete(Q).where(Q.c.tenant == tenant))
            if tokens_per_minute is not None or tokens_per_day is not None:
                conn.execute(
                    sa.insert(Q).values(
                        tenant=tenant,
                        tokens_per_minute=tokens_per_minute,
                        tokens_per_day=tokens_per_day,
                    )
                )

    def quota(self, tenant: str) -> tuple[int | None, int | None]:
        """The tenant's (tokens a minute, tokens a day); None: no limit."""
        query = sa.select(Q.c.tokens_per_minute, Q.c.tokens_per_day).where(Q.c.tenant == tenant)
        with self.engine.connect() as conn:
            row = conn.execute(query).first()
        return (row[0], row[1]) if row else (None, None)

    def revoke(self, key_id: uuid.UUID) -> bool:
        """Revoke one key by its id; False: no such key, or already revoked."""
        with self.engine.begin() as conn:
            done = conn.execute(
                sa.update(K)
                .where(K.c.id == key_id, K.c.revoked_at.is_(None))
                .values(revoked_at=db_now(conn))
                .returning(K.c.id)
            ).first()
        return done is not None

    def rows(self, tenant: str | None = None) -> list[KeyRow]:
        query = sa.select(
            K.c.id, K.c.tenant, K.c.prefix, K.c.rate_limit_rpm, K.c.created_at, K.c.revoked_at
        ).order_by(K.c.tenant, K.c.created_at)
        if tenant is not None:
            query = query.where(K.c.tenant == tenant)
        with self.engine.connect() as conn:
            return [KeyRow(*row) for row in conn.execute(query)]
