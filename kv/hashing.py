"""Deterministic, chained block hashes for the prefix cache (no Python ``hash()``)."""

from __future__ import annotations

import hashlib
import hmac
import struct
from collections.abc import Sequence

BlockHash = bytes  # 16-byte blake2b digest

_PERSON = b"inferq-kv-v1"


def _field(h: hashlib.blake2b, data: bytes) -> None:
    """Feed one length-prefixed field, so adjacent fields cannot collide by concatenation."""
    h.update(struct.pack("<Q", len(data)))
    h.update(data)


def hash_block(
    parent: BlockHash | None, tokens: Sequence[int], model_id: str, salt: str
) -> BlockHash:
    """Hash one block of tokens, chained on its parent block's hash."""
    h = hashlib.blake2b(digest_size=16, person=_PERSON)
    _field(h, b"\x00" if parent is None else b"\x01" + parent)
    _field(h, model_id.encode("utf-8"))
    _field(h, salt.encode("utf-8"))
    _field(h, struct.pack(f"<{len(tokens)}q", *tokens))
    return h.digest()


def block_hashes(
    token_ids: Sequence[int], block_size: int, model_id: str, salt: str
) -> list[BlockHash]:
    """Chained hashes of the full blocks of ``token_ids`` (a trailing partial block is skipped)."""
    return extend_block_hashes([], token_ids, block_size, model_id, salt)


def extend_block_hashes(
    hashes: list[BlockHash], token_ids: Sequence[int], block_size: int, model_id: str, salt: str
) -> list[BlockHash]:
    """Append to ``hashes`` (the chained hashes of the leading full blocks of ``token_ids``)
    those of the full blocks not hashed yet; returns ``hashes``. Only new blocks are hashed, so
    a sequence that keeps its list hashes each block once however often it is probed."""
    if block_size <= 0:
        raise ValueError("block_size must be positive")
    for start in range(len(hashes) * block_size, len(token_ids) - block_size + 1, block_size):
        parent = hashes[-1] if hashes else None
        hashes.append(hash_block(parent, token_ids[start : start + block_size], model_id, salt))
    return hashes


def tenant_salt(tenant: str, secret: str) -> str:
    """Per-tenant cache salt, HMAC-SHA256(secret, tenant) hex; derived server-side only."""
    return hmac.new(secret.encode("utf-8"), tenant.encode("utf-8"), hashlib.sha256).hexdigest()
