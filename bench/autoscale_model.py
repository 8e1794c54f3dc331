"""The discrete-event model behind bench/autoscale_sim.py: jobs on one shared Redis queue,
worker pods that take them, and the autoscaler that sizes the pod count.

Worker: `slots` jobs run at once (INFERQ_MAX_NUM_SEQS), each for a lognormal service time
whose mean makes a full worker finish `mu` jobs/s; it also holds up to `room` more (its
waiting room: taken from Redis, invisible to KEDA, started as slots free). A pod is billed
from its creation; it takes jobs once ready (`start_s` later). Told to stop, it takes nothing
more, runs what it holds for `drain_s`, then puts the rest back at the front of the queue.

Autoscaler (KEDA's ScaledObject = an HPA that KEDA feeds): every `sync_s` (the HPA's 15 s)
the metric is the queue length (what the redis scaler's LLEN sum sees); desired =
ceil(metric / target) unless within the 10 % tolerance; scale-up at most max(current x
(1 + up_percent/100), current + up_pods) per step after `up_window_s` of stabilization;
scale-down to the highest desired of the last `down_window_s`, at most `down_pods` per
`down_period_s`; clamped to [max(min, 1), max]. With `min_replicas` 0, KEDA itself moves 0 -> 1
when something waits at a poll (`poll_s`) and 1 -> 0 after `cooldown_s` with nothing waiting.
The Deployment removes starting pods first, then the most recently ready.
"""

from __future__ import annotations

import heapq
import math
import random
from collections import deque
from dataclasses import dataclass, field

TOLERANCE = 0.1  # the HPA's default --horizontal-pod-autoscaler-tolerance


@dataclass(frozen=True)
class Policy:
    min_replicas: int
    max_replicas: int
    target: float  # waiting jobs per pod
    held_target: float | None = None  # a second metric: jobs held (running + waiting room) per pod
    poll_s: float = 30.0
    cooldown_s: float = 300.0
    sync_s: float = 15.0
    up_window_s: float = 0.0
    up_percent: float = 100.0
    up_pods: int = 4
    down_window_s: float = 300.0
    down_pods: int = 1
    down_period_s: float = 60.0


@dataclass(frozen=True)
class WorkerSpec:
    mu: float  # jobs/s of a full worker
    slots: int
    room: int
    start_s: float
    drain_s: float
    cv: float = 0.6  # service time coefficient of variation


@dataclass
class Pod:
    created: float
    ready_at: float
    running: dict[int, float] = field(default_factory=dict)  # job -> its arrival time
    waiting: deque = field(default_factory=deque)  # (job, arrival)
    stopping_at: float | None = None
    gone_at: float | None = None

    @property
    def held(self) -> int:
        return len(self.running) + len(self.waiting)


@dataclass
class Result:
    waits: list[float]
    pod_seconds: float
    horizon_s: float
    restarted: int
    timeline: list[tuple[float, int, int, int]]  # (t, pods, ready pods, queue length)
    unfinished: int

    def pct(self, q: float) -> float:
        xs = sorted(self.waits)
        return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


class Sim:
    def __init__(self, spec: WorkerSpec, policy: Policy | None, fixed: int = 0, seed: int = 0):
        self.spec, self.policy = spec, policy
        self.rng = random.Random(seed)
        mean = spec.slots / spec.mu
        self.sigma = math.sqrt(math.log(1 + spec.cv**2))
        self.mu_log = math.log(mean) - self.sigma**2 / 2
        self.queue: deque = deque()  # (job, arrival)
        self.pods: list[Pod] = []
        self.events: list = []
        self.seq = 0
        self.waits: dict[int, float] = {}  # job -> arrival to its (last) start
        self.restarted = 0
        self.history: deque = deque()  # (t, desired) for the scale-down window
        self.last_down = -1e18
        self.last_active = 0.0
        self.timeline: list[tuple[float, int, int, int]] = []
        for _ in range(fixed or (policy.min_replicas if policy else 0)):
            self.pods.append(Pod(0.0, 0.0))

    # -- events ------------------------------------------------------------------------------

    def _push(self, t: float, kind: str, *data: object) -> None:
        self.seq += 1
        heapq.heappush(self.events, (t, self.seq, kind, data))

    def run(self, arrivals: list[float], horizon_s: float) -> Result:
        if self.policy:
            self._push(0.0, "sync")
            if self.policy.min_replicas == 0:
                self._push(0.0, "poll")
        self._push(0.0, "sample")
        i, n = 0, len(arrivals)
        while True:
            t_next = self.events[0][0] if self.events else math.inf
            if i < n and arrivals[i] <= t_next:
                t = arrivals[i]
                self.queue.append((i, t))
                i += 1
                self._dispatch(t)
                continue
            t, _, kind, data = heapq.heappop(self.events)
            getattr(self, "_on_" + kind)(t, *data)
            if t > horizon_s and i >= n and not self.queue and not any(p.held for p in self._up()):
                break
        end = max(horizon_s, t)
        billed = sum((p.gone_at if p.gone_at is not None else end) - p.created for p in self.pods)
        unfinished = len(self.queue) + sum(p.held for p in self.pods if p.gone_at is None)
        waits = list(self.waits.values())
        return Result(waits, billed, end, self.restarted, self.timeline, unfinished)

    def _up(self) -> list[Pod]:
        return [p for p in self.pods if p.gone_at is None]

    def _on_sample(self, t: float) -> None:
        up = self._up()
        ready = sum(1 for p in up if p.ready_at <= t and p.stopping_at is None)
        self.timeline.append((t, len(up), ready, len(self.queue)))
        self._push(t + 30.0, "sample")

    def _on_ready(self, t: float, pod: Pod) -> None:
        if pod.gone_at is None and pod.stopping_at is None:
            self._pull(pod, t)

    def _on_done(self, t: float, pod: Pod, job: int) -> None:
        if pod.running.pop(job, None) is None:
            return  # handed back at the end of a drain: it runs elsewhere
        if pod.waiting and (pod.stopping_at is None or t < pod.stopping_at + self.spec.drain_s):
            self._start(pod, *pod.waiting.popleft(), t)
        if pod.stopping_at is None:
            self._pull(pod, t)
        elif not pod.held:
            pod.gone_at = t

    def _on_drained(self, t: float, pod: Pod) -> None:
        if pod.gone_at is not None:
            return
        back = sorted(list(pod.running.items()) + list(pod.waiting), key=lambda x: x[1])
        self.restarted += len(pod.running)
        pod.running.clear()
        pod.waiting.clear()
        self.queue.extendleft(reversed(back))
        pod.gone_at = t
        self._dispatch(t)

    # -- jobs ----------------------------------------------------------------------------------

    def _start(self, pod: Pod, job: int, arrival: float, t: float) -> None:
        pod.running[job] = arrival
        self.waits[job] = t - arrival  # a job run again counts its whole wait
        self._push(t + self.rng.lognormvariate(self.mu_log, self.sigma), "done", pod, job)

    def _pull(self, pod: Pod, t: float) -> None:
        cap = self.spec.slots + self.spec.room
        while self.queue and pod.held < cap:
            job, arrival = self.queue.popleft()
            if len(pod.running) < self.spec.slots:
                self._start(pod, job, arrival, t)
            else:
                pod.waiting.append((job, arrival))

    def _dispatch(self, t: float) -> None:
        """Whoever has room takes from the queue (the least loaded first)."""
        if not self.queue:
            return
        ready = [
            p for p in self.pods if p.gone_at is None and p.stopping_at is None and p.ready_at <= t
        ]
        for pod in sorted(ready, key=lambda p: p.held):
            self._pull(pod, t)
            if not self.queue:
                return

    # -- the autoscaler ------------------------------------------------------------------------

    def _scale_to(self, t: float, n: int) -> None:
        live = [p for p in self.pods if p.gone_at is None and p.stopping_at is None]
        for _ in range(n - len(live)):
            pod = Pod(t, t + self.spec.start_s)
            self.pods.append(pod)
            self._push(pod.ready_at, "ready", pod)
        starting = [p for p in live if p.ready_at > t]  # removed first, then the newest
        ready = sorted((p for p in live if p.ready_at <= t), key=lambda p: -p.ready_at)
        for pod in (starting + ready)[: max(0, len(live) - n)]:
            pod.stopping_at = t
            if pod.held:
                self._push(t + self.spec.drain_s, "drained", pod)
            else:
                pod.gone_at = t

    def _on_sync(self, t: float) -> None:
        p = self.policy
        assert p is not None
        self._push(t + p.sync_s, "sync")
        current = sum(1 for x in self.pods if x.gone_at is None and x.stopping_at is None)
        if current == 0:
            return  # KEDA's poll wakes it
        wishes = [self._wish(len(self.queue), p.target, current)]
        if p.held_target:  # the HPA variant's second metric; the HPA follows the larger wish
            held = sum(x.held for x in self.pods if x.gone_at is None)
            wishes.append(self._wish(held, p.held_target, current))
        desired = max(wishes)
        desired = min(max(desired, max(p.min_replicas, 1)), p.max_replicas)
        self.history.append((t, desired))
        while self.history and self.history[0][0] < t - p.down_window_s:
            self.history.popleft()
        if desired > current:
            up_hist = [d for s, d in self.history if s >= t - p.up_window_s]
            desired = min(up_hist) if p.up_window_s else desired
            limit = max(math.ceil(current * (1 + p.up_percent / 100)), current + p.up_pods)
            self._scale_to(t, min(desired, limit, p.max_replicas))
        elif desired < current:
            keep = max(d for _, d in self.history)
            if keep < current and t - self.last_down >= p.down_period_s:
                self._scale_to(t, max(keep, current - p.down_pods))
                self.last_down = t

    @staticmethod
    def _wish(metric: float, target: float, current: int) -> int:
        """The HPA's replica count for an AverageValue metric (total / target per pod)."""
        ratio = metric / (target * current)
        return current if abs(ratio - 1) <= TOLERANCE else math.ceil(metric / target)

    def _on_poll(self, t: float) -> None:
        p = self.policy
        assert p is not None
        self._push(t + p.poll_s, "poll")
        live = [x for x in self.pods if x.gone_at is None and x.stopping_at is None]
        busy = bool(self.queue)  # KEDA's activity: the lists only, not what pods hold
        if busy:
            self.last_active = t
        if not live and self.queue:
            self._scale_to(t, 1)
        elif live and not busy and t - self.last_active >= p.cooldown_s:
            self._scale_to(t, 0)


def bursty(
    hours: float,
    base: float,
    bursts_per_h: float,
    burst_jobs: tuple[int, int],
    burst_s: float,
    seed: int,
) -> list[float]:
    """Poisson arrivals at `base` jobs/s, plus bursts (Poisson in time) of a uniform number
    of jobs in `burst_jobs`, spread evenly at random over `burst_s`."""
    rng, horizon = random.Random(seed), hours * 3600
    times = _poisson(rng, lambda _t: base, base, horizon)
    t = rng.expovariate(bursts_per_h / 3600)
    while t < horizon:
        n = rng.randint(*burst_jobs)
        times += [t + rng.uniform(0, burst_s) for _ in range(n)]
        t += rng.expovariate(bursts_per_h / 3600)
    return sorted(x for x in times if x < horizon)


def diurnal(hours: float, mean: float, swing: float, seed: int) -> list[float]:
    """A non-homogeneous Poisson process: rate mean x (1 - swing x cos(2 pi t / 24 h)),
    lowest at midnight, highest at noon."""
    rng = random.Random(seed)

    def rate(t: float) -> float:
        return mean * (1 - swing * math.cos(2 * math.pi * t / 86400))

    return _poisson(rng, rate, mean * (1 + swing), hours * 3600)


def _poisson(rng: random.Random, rate, peak: float, horizon: float) -> list[float]:
    """Thinning (Lewis-Shedler): candidates at the peak rate, kept with rate(t)/peak."""
    out, t = [], 0.0
    while True:
        t += rng.expovariate(peak)
        if t >= horizon:
            return out
        if rng.random() * peak <= rate(t):
            out.append(t)
