"""The model behind `benchmarks/sim_adapter_cache.py` (P8): a discrete-event simulation of replicas
that each hold an LRU of adapters, batch requests and pay an adapter load on a miss, under a Zipf
request mix, with the routing policies compared there. Pure Python and NumPy; costs come in as a
`Costs` (measured by the benchmark's first phase, or read from a file). Tests:
`tests/test_sim_adapter_cache.py`."""

from __future__ import annotations

import heapq
import json
import math
import random
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROUTINGS = ("affinity", "random", "pow2", "serve", "affinity-next")


@dataclass
class Costs:
    """What one replica's work costs, in seconds: an adapter load's unlocked part (resolve and verify,
    beside the forwards) and engine part (PEFT load and eviction, forwards wait), and a batched step
    by batch size (linear between measured sizes, extended past the last two)."""

    load_verify_s: float
    load_engine_s: float
    step_s: dict[int, float]
    source: str = "given"
    detail: dict = field(default_factory=dict)

    def __post_init__(self):
        self.step_s = {int(k): float(v) for k, v in sorted(self.step_s.items(), key=lambda kv: int(kv[0]))}
        self._sizes = list(self.step_s)
        self._times = [self.step_s[b] for b in self._sizes]

    @property
    def load_s(self) -> float:
        return self.load_verify_s + self.load_engine_s

    def step(self, b: int) -> float:
        sizes, times = self._sizes, self._times
        if len(sizes) == 1:
            return times[0] * b / sizes[0]
        if b <= sizes[0]:
            return times[0]
        for i in range(1, len(sizes)):
            if b <= sizes[i]:
                lo, hi = sizes[i - 1], sizes[i]
                return times[i - 1] + (times[i] - times[i - 1]) * (b - lo) / (hi - lo)
        slope = (times[-1] - times[-2]) / (sizes[-1] - sizes[-2])
        return times[-1] + slope * (b - sizes[-1])

    def row(self) -> dict:
        return {"figure": "costs", "source": self.source, "load_verify_s": round(self.load_verify_s, 5),
                "load_engine_s": round(self.load_engine_s, 5), "load_s": round(self.load_s, 5),
                "step_s": {str(b): round(t, 5) for b, t in self.step_s.items()}, **self.detail}


def read_costs(path: Path) -> Costs:
    """A costs object from a JSON file, or the `"figure": "costs"` row of a results file."""
    text = Path(path).read_text()
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        data = None
    if not isinstance(data, dict) or "step_s" not in data:
        rows = [json.loads(line) for line in text.splitlines() if line.strip()]
        data = next((r for r in rows if r.get("figure") == "costs"), None)
        if data is None:
            raise SystemExit(f"{path}: no costs (a JSON object with load_verify_s, load_engine_s, step_s, "
                             "or a results file with a 'costs' row)")
    if "load_verify_s" not in data:  # a single load figure: all of it on the engine
        data = {**data, "load_verify_s": 0.0, "load_engine_s": data["load_s"]}
    detail = {k: v for k, v in data.items()
              if k not in ("figure", "source", "load_verify_s", "load_engine_s", "load_s", "step_s")}
    return Costs(float(data["load_verify_s"]), float(data["load_engine_s"]), data["step_s"],
                 source=f"file {path} (was: {data.get('source', 'given')})", detail=detail)


def zipf_probabilities(n: int, s: float) -> np.ndarray:
    """p(k) = k^-s / H(n, s) for the adapter of popularity rank k = 1..n (index k - 1)."""
    w = np.arange(1, n + 1, dtype=float) ** -s
    return w / w.sum()


def zipf_sample(rng: np.random.Generator, n: int, s: float, size: int) -> np.ndarray:
    """`size` adapter indices (0 = the most popular) drawn from Zipf(s) over n adapters."""
    cdf = np.cumsum(zipf_probabilities(n, s))
    cdf[-1] = 1.0
    return np.searchsorted(cdf, rng.random(size), side="right")


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a well-spread 64-bit hash of each integer."""
    x = x.astype(np.uint64)
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
    return x


def rendezvous_order(n_adapters: int, n_replicas: int, salt: int = 0) -> np.ndarray:
    """[adapter, rank] -> replica: each adapter's replicas by falling hash weight (rendezvous / HRW
    hashing: adding or removing a replica moves only the adapters whose first choice it was)."""
    a = np.arange(n_adapters, dtype=np.uint64)[:, None]
    r = np.arange(n_replicas, dtype=np.uint64)[None, :]
    weights = _mix64(_mix64(a + np.uint64(salt << 32)) ^ (r * np.uint64(0x9E3779B97F4A7C15)))
    return np.argsort(-weights.astype(np.float64), axis=1, kind="stable")


class LRU:
    """An LRU of adapter names with pins (a pinned adapter is never evicted; with every other one
    pinned the cache goes over its bound until a later load finds room), as `serve.cache.AdapterCache`.
    The least recent unpinned name comes from a heap of (last use, name) with stale entries skipped."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.items: dict = {}  # name -> its last use (a counter)
        self.pins: dict = {}  # name -> requests holding it
        self._heap: list = []
        self._clock = 0

    def __contains__(self, key) -> bool:
        return key in self.items

    def __len__(self) -> int:
        return len(self.items)

    def _use(self, key) -> None:
        self._clock += 1
        self.items[key] = self._clock
        if key not in self.pins:
            heapq.heappush(self._heap, (self._clock, key))

    def touch(self, key) -> bool:
        """A request for `key`: True (a hit, now the most recent) or False (not resident)."""
        if key in self.items:
            self._use(key)
            return True
        return False

    def pin(self, key, n: int = 1) -> None:
        self.pins[key] = self.pins.get(key, 0) + n

    def unpin(self, key) -> None:
        left = self.pins[key] - 1
        if left:
            self.pins[key] = left
            return
        del self.pins[key]
        if key in self.items:
            heapq.heappush(self._heap, (self.items[key], key))

    def add(self, key) -> list:
        """`key` loaded: the evicted keys (least recent first, never a pinned one nor `key`)."""
        self._use(key)
        evicted, mine = [], None
        while len(self.items) > self.capacity:
            victim = None
            while self._heap:
                used, k = heapq.heappop(self._heap)
                if self.items.get(k) != used or k in self.pins:
                    continue  # stale: used since, evicted, or pinned (pushed again when unpinned)
                if k == key:
                    mine = (used, k)
                    continue
                victim = k
                break
            if victim is None:
                break
            del self.items[victim]
            evicted.append(victim)
        if mine is not None:
            heapq.heappush(self._heap, mine)
        return evicted

    def order(self) -> list:
        """The resident names, least recently used first."""
        return sorted(self.items, key=self.items.get)


def lru_hits(trace, capacity: int) -> list[bool]:
    """Hit (True) or miss per access of `trace` through `LRU` (a miss loads at once)."""
    cache, out = LRU(capacity), []
    for key in trace:
        hit = cache.touch(key)
        if not hit:
            cache.add(key)
        out.append(hit)
    return out


@dataclass
class Config:
    routing: str = "affinity"
    zipf_s: float = 1.0
    cache: int = 64
    adapters: int = 10_000
    replicas: int = 16
    load: float = 0.5  # offered rate / (replicas x max_batch / step(max_batch))
    requests: int = 40_000
    warmup: float = 0.25  # the first quarter of the requests fills the caches and is not reported
    max_batch: int = 32
    batch_wait_s: float = 0.005
    max_ongoing: int = 64  # Ray Serve's per-replica cap the project sets (serve.max_ongoing_requests)
    bound: float = 1.25  # affinity: the preferred replica takes a request below bound x the mean outstanding
    seed: int = 0
    prewarm: int | None = None  # requests routed, untimed, to fill the caches first (None: 30 x replicas x cache)
    record_routes: bool = False


class Replica:
    __slots__ = ("idx", "cache", "waiting", "verify_q", "verifying", "engine_q", "batch_q", "busy",
                 "window_open", "outstanding", "busy_s", "verify_s", "largest")

    def __init__(self, idx: int, capacity: int):
        self.idx = idx
        self.cache = LRU(capacity)
        self.waiting: dict = {}  # adapter -> requests waiting for its load
        self.verify_q: deque = deque()
        self.verifying = False
        self.engine_q: deque = deque()  # adapters whose engine part of the load waits for the engine
        self.batch_q: deque = deque()
        self.busy = False
        self.window_open: float | None = None  # when the batcher took its first request
        self.outstanding = 0
        self.busy_s = 0.0
        self.verify_s = 0.0
        self.largest = 0  # the largest batch run


class Simulation:
    """One run of the model for one (routing, s, C) at one load (see the module's docstring)."""

    def __init__(self, cfg: Config, costs: Costs):
        if cfg.routing not in ROUTINGS:
            raise ValueError(f"routing {cfg.routing!r}: one of {', '.join(ROUTINGS)}")
        self.cfg, self.costs = cfg, costs
        rng = np.random.default_rng(cfg.seed)
        self.rate = cfg.load * cfg.replicas * cfg.max_batch / costs.step(cfg.max_batch)
        self.arrivals = np.cumsum(rng.exponential(1.0 / self.rate, cfg.requests))
        # the popularity ranks land on adapter ids by a seeded permutation: ids carry no popularity
        self.perm = rng.permutation(cfg.adapters)
        self.adapter_of = self.perm[zipf_sample(rng, cfg.adapters, cfg.zipf_s, cfg.requests)]
        self.order = rendezvous_order(cfg.adapters, cfg.replicas) if cfg.routing.startswith("affinity") else None
        self.rand = random.Random(cfg.seed * 1_000_003 + 17)
        self.replicas = [Replica(i, cfg.cache) for i in range(cfg.replicas)]
        self.heap: list = []
        self.seq = 0
        self.now = 0.0
        self.total_outstanding = 0
        self.hit = np.zeros(cfg.requests, dtype=bool)
        self.done = np.full(cfg.requests, np.nan)
        self.loads_by: list[int] = []  # per load: the request that caused it
        self.routes = np.full(cfg.requests, -1, dtype=np.int32) if cfg.record_routes else None

    # ---------------------------------------------------------------- routing
    def route(self, adapter: int) -> Replica:
        cfg, reps, rand = self.cfg, self.replicas, self.rand
        if cfg.routing == "random":
            return reps[rand.randrange(cfg.replicas)]
        if cfg.routing == "pow2":
            return self._two(reps)
        if cfg.routing.startswith("affinity"):
            order = self.order[adapter]
            limit = max(cfg.max_batch, math.ceil(cfg.bound * (self.total_outstanding + 1) / cfg.replicas))
            if cfg.routing == "affinity-next":  # the adapter's next replica in rendezvous order under the bound
                return next((reps[r] for r in order if reps[r].outstanding < limit), reps[order[0]])
            first = reps[order[0]]
            if first.outstanding < limit:
                return first
            best = min(order, key=lambda r: reps[r].outstanding)  # min keeps the first in rendezvous order
            return reps[best]
        # "serve": Ray Serve's router with the adapter as the multiplexed model id
        holders = [r for r in reps if adapter in r.cache]
        if holders:
            r = self._two(holders)
            if r.outstanding < cfg.max_ongoing:
                return r
        fewest = min(len(r.cache) for r in reps)
        r = self._two([r for r in reps if len(r.cache) == fewest])
        if r.outstanding < cfg.max_ongoing:
            return r
        return self._two(reps)

    def _two(self, candidates: list) -> Replica:
        if len(candidates) == 1:
            return candidates[0]
        a, b = self.rand.sample(candidates, 2)
        return b if b.outstanding < a.outstanding else a

    # ---------------------------------------------------------------- events
    def _at(self, t: float, fn, *args) -> None:
        self.seq += 1
        heapq.heappush(self.heap, (t, self.seq, fn, args))

    def prewarm(self) -> None:
        """Fill the caches as light traffic would: requests of another seeded draw of the same mix,
        each routed by the policy with nothing outstanding and loaded at once, untimed and uncounted
        (a cache of C over a replica's share of 625 adapters takes far more than the timed run's
        warm-up to fill)."""
        cfg = self.cfg
        n = min(200_000, 30 * cfg.replicas * cfg.cache) if cfg.prewarm is None else cfg.prewarm
        if n <= 0:
            return
        rng = np.random.default_rng([cfg.seed, 1])
        for a in self.perm[zipf_sample(rng, cfg.adapters, cfg.zipf_s, n)].tolist():
            cache = self.route(a).cache
            if not cache.touch(a):
                cache.add(a)

    def run(self) -> Simulation:
        self.prewarm()
        for i, t in enumerate(self.arrivals):
            self._at(float(t), self._arrive, i)
        while self.heap:
            self.now, _, fn, args = heapq.heappop(self.heap)
            fn(*args)
        return self

    def _arrive(self, i: int) -> None:
        a = int(self.adapter_of[i])
        r = self.route(a)
        if self.routes is not None:
            self.routes[i] = r.idx
        r.outstanding += 1
        self.total_outstanding += 1
        if r.cache.touch(a):
            self.hit[i] = True
            r.cache.pin(a)
            self._to_batcher(r, i)
        elif a in r.waiting:
            r.waiting[a].append(i)
        else:
            r.waiting[a] = [i]
            self.loads_by.append(i)
            r.verify_q.append(a)
            self._verify(r)

    def _verify(self, r: Replica) -> None:
        if r.verifying or not r.verify_q:
            return
        r.verifying = True
        a = r.verify_q.popleft()
        r.verify_s += self.costs.load_verify_s
        self._at(self.now + self.costs.load_verify_s, self._verified, r, a)

    def _verified(self, r: Replica, a: int) -> None:
        r.verifying = False
        r.engine_q.append(a)
        self._verify(r)
        self._engine(r)

    def _loaded(self, r: Replica, a: int) -> None:
        r.busy = False
        waiters = r.waiting.pop(a)
        r.cache.pin(a, len(waiters))  # before it can be evicted
        r.cache.add(a)
        for i in waiters:
            self._to_batcher(r, i)
        self._engine(r)

    def _to_batcher(self, r: Replica, i: int) -> None:
        r.batch_q.append(i)
        if r.window_open is None:
            r.window_open = self.now
            self._at(self.now + self.cfg.batch_wait_s, self._engine, r)
        elif len(r.batch_q) >= self.cfg.max_batch:
            self._engine(r)

    def _engine(self, r: Replica) -> None:
        """The engine is free: an adapter load's engine part first, else a batch when it is full or
        its wait is over."""
        if r.busy:
            return
        if r.engine_q:
            r.busy = True
            a = r.engine_q.popleft()
            r.busy_s += self.costs.load_engine_s
            self._at(self.now + self.costs.load_engine_s, self._loaded, r, a)
            return
        cfg = self.cfg
        if not r.batch_q or (len(r.batch_q) < cfg.max_batch and self.now < r.window_open + cfg.batch_wait_s - 1e-12):
            return
        batch = [r.batch_q.popleft() for _ in range(min(cfg.max_batch, len(r.batch_q)))]
        r.busy = True
        r.largest = max(r.largest, len(batch))
        step = self.costs.step(len(batch))
        r.busy_s += step
        self._at(self.now + step, self._stepped, r, batch)

    def _stepped(self, r: Replica, batch: list) -> None:
        r.busy = False
        for i in batch:
            self.done[i] = self.now
            r.cache.unpin(int(self.adapter_of[i]))
        r.outstanding -= len(batch)
        self.total_outstanding -= len(batch)
        if r.batch_q:  # the batcher takes the next request at once and waits for more
            r.window_open = self.now
            self._at(self.now + self.cfg.batch_wait_s, self._engine, r)
        else:
            r.window_open = None
        self._engine(r)

    # ---------------------------------------------------------------- figures
    def figures(self) -> dict:
        cfg = self.cfg
        first = int(cfg.warmup * cfg.requests)
        t0, t1 = float(self.arrivals[first]), float(self.arrivals[-1])
        window = max(t1 - t0, 1e-9)
        lat = (self.done - self.arrivals)[first:]
        loads = sum(1 for i in self.loads_by if i >= first)
        end = float(np.nanmax(self.done))
        busy = max(r.busy_s for r in self.replicas) / end
        return {"routing": cfg.routing, "zipf_s": cfg.zipf_s, "cache": cfg.cache, "load": cfg.load,
                "hit_rate": round(float(self.hit[first:].mean()), 4),
                "p50_s": round(float(np.percentile(lat, 50)), 4), "p99_s": round(float(np.percentile(lat, 99)), 4),
                "loads_per_s": round(loads / window, 2), "loads_per_request": round(loads / (cfg.requests - first), 4),
                "requests_per_s": round(self.rate, 1), "busiest_engine_utilisation": round(busy, 3),
                "drain_s": round(end - t1, 3), "saturated": self._saturated(end - t1),
                "replicas": cfg.replicas, "adapters": cfg.adapters, "requests": cfg.requests, "seed": cfg.seed,
                "prewarm": min(200_000, 30 * cfg.replicas * cfg.cache) if cfg.prewarm is None else cfg.prewarm}


    def _saturated(self, drain_s: float) -> bool:
        """Offered load over capacity: the backlog left when the arrivals stop takes more than ten
        service quanta (a load, the batcher's wait and a full step) to clear."""
        cfg, costs = self.cfg, self.costs
        return bool(drain_s > 10 * (costs.load_s + cfg.batch_wait_s + costs.step(cfg.max_batch)))


def simulate(cfg: Config, costs: Costs) -> dict:
    return Simulation(cfg, costs).run().figures()


def che_hit_rate(probabilities: np.ndarray, capacity: int) -> float:
    """Che's approximation of an LRU's hit rate under independent requests with these
    probabilities: the characteristic time T solves sum(1 - exp(-p T)) = C; hit = sum p (1 - exp(-p T))."""
    p = probabilities[probabilities > 0]
    if capacity >= len(p):
        return 1.0
    lo, hi = 0.0, 1.0
    while np.sum(1 - np.exp(-p * hi)) < capacity:
        hi *= 2
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if np.sum(1 - np.exp(-p * mid)) < capacity else (lo, mid)
    return float(np.sum(p * (1 - np.exp(-p * hi))))


def che_figures(cfg: Config) -> dict:
    """Che's LRU hit rates for random routing (every replica sees the whole mix) and for pure
    affinity (each replica sees its rendezvous share of the adapters), without queueing."""
    p = zipf_probabilities(cfg.adapters, cfg.zipf_s)
    perm = np.random.default_rng(cfg.seed).permutation(cfg.adapters)  # as Simulation draws it
    by_id = np.empty_like(p)
    by_id[perm] = p
    home = rendezvous_order(cfg.adapters, cfg.replicas)[:, 0]
    shares = [by_id[home == r] for r in range(cfg.replicas)]
    affinity = sum(q.sum() * che_hit_rate(q / q.sum(), cfg.cache) for q in shares if q.sum() > 0)
    return {"che_hit_rate_random": round(che_hit_rate(p, cfg.cache), 4), "che_hit_rate_affinity": round(float(affinity), 4)}
