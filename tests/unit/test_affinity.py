"""Prefix-affinity routing: stable owners per key, few moves when a worker leaves, bounded
load for hot prefixes, and routing keys from the leading token blocks."""

from __future__ import annotations

import random
from collections import Counter

from worker.broker import Peer, Router, prefix_key

MODEL = "m"


def _router(names: list[str], loads: dict[str, int] | None = None, factor: float = 1.2) -> Router:
    router = Router(factor)
    loads = loads or {}
    router.refresh({n: Peer(n, loads.get(n, 0), frozenset({MODEL})) for n in names})
    return router


def _key(i: int) -> bytes:
    return i.to_bytes(16, "big")


def test_a_key_keeps_its_owner_and_keys_spread_over_workers() -> None:
    names = [f"w{i}" for i in range(4)]
    owners = {}
    for i in range(400):
        router = _router(names)  # equal loads: only the ranking decides
        owners[i] = router.owner(_key(i), MODEL)
        assert _router(names).owner(_key(i), MODEL) == owners[i]
    spread = Counter(owners.values())
    assert set(spread) == set(names) and min(spread.values()) > 60


def test_a_worker_leaving_moves_only_its_own_keys() -> None:
    names = [f"w{i}" for i in range(4)]
    before = {i: _router(names).owner(_key(i), MODEL) for i in range(400)}
    after = {i: _router(names[:3]).owner(_key(i), MODEL) for i in range(400)}
    moved = [i for i in before if before[i] != after[i]]
    assert moved and all(before[i] == "w3" for i in moved)


def test_a_hot_prefix_is_replicated_and_load_stays_bounded() -> None:
    names = [f"w{i}" for i in range(4)]
    router = _router(names)
    hot, others = _key(0), [_key(i) for i in range(1, 4)]
    rng = random.Random(0)
    jobs = [hot if i % 2 == 0 else rng.choice(others) for i in range(256)]
    placed = Counter(router.owner(k, MODEL) for k in jobs)
    assert max(placed.values()) / min(placed.values()) <= 1.5
    hot_owners = Counter(router.owner(hot, MODEL) for _ in range(20))
    assert len(hot_owners) >= 2  # the hot key spills over: replicated, not pinned


def test_a_busy_owner_sheds_to_the_next_worker_in_its_ranking() -> None:
    names = ["a", "b", "c"]
    first = _router(names).owner(_key(7), MODEL)
    busy = _router(names, {first: 50}).owner(_key(7), MODEL)
    assert busy != first


def test_only_workers_serving_the_model_are_chosen() -> None:
    router = Router()
    router.refresh({"a": Peer("a", 0, frozenset({"x"})), "b": Peer("b", 0, frozenset({"y"}))})
    assert {router.owner(_key(i), "y") for i in range(20)} == {"b"}
    assert router.owner(_key(1), "z") is None


def test_prefix_keys_follow_the_leading_blocks_and_the_tenant() -> None:
    system = list(range(1000, 1000 + 200))
    a = prefix_key("t", MODEL, [*system, 1, 2, 3])
    b = prefix_key("t", MODEL, [*system, 9, 9, 9, 9, 9])
    assert a == b  # the same 8 leading blocks (128 tokens) of a shared system prompt
    assert prefix_key("u", MODEL, [*system, 1]) != a  # tenants never share a key
    assert prefix_key("t", MODEL, list(range(15))) is None  # no full block
    assert prefix_key("t", MODEL, list(range(40))) != prefix_key("t", MODEL, list(range(41, 81)))
