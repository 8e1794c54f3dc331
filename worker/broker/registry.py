"""The live-worker registry in Redis, for prefix-affinity routing.

Each worker writes `{seen, models}` under its name in one hash per queue every second (`seen`
is Redis `TIME`: one clock for every worker, whatever its host's clock says);
its load is read fresh from Redis (the tags it holds, less a take it is still routing, and the
messages waiting for it).
A worker silent for `dead_after_s` is dead: any live worker moves the messages waiting in its
affinity queue back to the shared queue and pushes back the messages it had taken but not
acknowledged (the `held` set its takes recorded, through the `Unacked` store), so none waits
on it; the entry is removed once it has been dead for a grace period with nothing left to
move.
"""

from __future__ import annotations

import json
from collections.abc import Iterable

import redis

from api_client.wire import PRIORITY_STEPS
from worker.broker import scripts
from worker.broker.affinity import Peer
from worker.broker.layout import (
    affinity_queue,
    aging_key,
    held_key,
    queue_key,
    redis_now,
    unrouted_key,
)
from worker.broker.unacked import Unacked

GRACE_S = 10.0  # a dead entry is kept (and drained) this long: late forwards still move on


class Registry:
    """One worker's view: beat, list live peers, reap dead ones, retire itself. A dead
    worker's taken messages go back through `unacked` (this worker's hand on them)."""

    def __init__(
        self,
        unacked: Unacked,
        me: str,
        models: Iterable[str],
        dead_after_s: float,
    ) -> None:
        self.unacked, self.me = unacked, me
        self.client: redis.Redis = unacked.client
        self.queue = unacked.queue
        self.models, self.dead_after_s = sorted(models), dead_after_s
        self.key = f"inferq:workers:{self.queue}"
        self._drain = self.client.register_script(scripts.DRAIN)
        self._loads = self.client.register_script(scripts.LOADS)

    def lists(self, worker: str) -> list[str]:
        """A worker's affinity lists (one per priority step)."""
        return [queue_key(affinity_queue(self.queue, worker), p) for p in PRIORITY_STEPS]

    def beat(self) -> None:
        entry = {"seen": redis_now(self.client), "models": self.models}
        self.client.hset(self.key, self.me, json.dumps(entry))

    def _entries(self) -> dict[str, dict]:
        out = {}
        for name, raw in self.client.hgetall(self.key).items():
            try:
                out[name.decode()] = entry = json.loads(raw)
                float(entry["seen"])
            except (ValueError, UnicodeDecodeError, KeyError, TypeError):
                self.client.hdel(self.key, name)
        return out

    def peers(self) -> tuple[dict[str, Peer], list[tuple[str, float]]]:
        """Live peers with their load, read fresh (the messages they have taken, kept and not
        acknowledged, plus those waiting in their affinity queue: a take still being routed is
        not load yet), and the dead entries with when they were last seen."""
        now, live = redis_now(self.client), {}
        entries = self._entries()
        alive = [n for n, e in entries.items() if now - float(e["seen"]) <= self.dead_after_s]
        keys = []
        for name in alive:
            keys += [held_key(self.queue, name), unrouted_key(self.queue, name), *self.lists(name)]
        loads = self._loads(keys=keys, args=[len(PRIORITY_STEPS)]) if alive else []
        for name, load in zip(alive, loads, strict=True):
            live[name] = Peer(name, int(load), frozenset(entries[name].get("models") or ()))
        dead = [(n, float(e["seen"])) for n, e in entries.items() if n not in live]
        return live, dead

    def reap(self, dead: list[tuple[str, float]]) -> int:
        """Give a dead worker's waiting and taken messages back to the shared queue; how many
        moved. Several live workers may reap at once: every move is atomic."""
        moved, now = 0, redis_now(self.client)
        for name, seen in dead:
            moved_here = self.drain(name)
            held = held_key(self.queue, name)
            for tag in self.client.smembers(held):  # unless taken again by a live worker
                moved_here += self.unacked.push_back(tag, held)
            self.client.delete(held, unrouted_key(self.queue, name))
            if moved_here == 0 and now - seen > self.dead_after_s + GRACE_S:
                self.client.hdel(self.key, name)
            moved += moved_here
        return moved

    def drain(self, worker: str) -> int:
        """Move what waits in `worker`'s affinity queue to the shared queue, in order."""
        shared = [queue_key(self.queue, p) for p in PRIORITY_STEPS]
        moved = int(self._drain(keys=[*self.lists(worker), *shared]))
        self.client.hdel(aging_key(self.queue), *self.lists(worker))  # empty: nothing waits
        return moved

    def retire(self) -> None:
        """A clean stop: look dead at once (no new forwards) and hand back the own queue."""
        # dead now; reaped through the grace period
        gone = redis_now(self.client) - self.dead_after_s - 1
        self.client.hset(self.key, self.me, json.dumps({"seen": gone, "models": []}))
        self.drain(self.me)
