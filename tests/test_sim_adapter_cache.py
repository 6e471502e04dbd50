"""The adapter-cache simulation's logic (benchmarks/cache_model.py, run by benchmarks/sim_adapter_cache.py),
on fixed costs: no model, no Ray; a few seconds. The LRU against an exact stack-distance computation, Zipf sampling against
its formula, affinity routing, load counting, determinism."""

import json
import random
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import cache_model as sim
import sim_adapter_cache

COSTS = sim.Costs(load_verify_s=0.001, load_engine_s=0.02, step_s={1: 0.01, 8: 0.02, 32: 0.05})


def exact_lru_hits(trace, capacity):
    """An access hits an LRU of `capacity` exactly when fewer than `capacity` distinct other keys were
    accessed since the key's previous access (its stack distance)."""
    out = []
    for i, key in enumerate(trace):
        prev = max((j for j in range(i) if trace[j] == key), default=None)
        out.append(prev is not None and len(set(trace[prev + 1:i]) - {key}) < capacity)
    return out


def quiet(**kw):
    """A configuration where no two requests overlap: arrivals far apart against the costs."""
    base = dict(adapters=50, replicas=4, cache=5, requests=400, load=1e-5, warmup=0.0, zipf_s=0.9, seed=3, prewarm=0)
    return sim.Config(**{**base, **kw})


@pytest.mark.parametrize("capacity", [1, 3, 8])
def test_lru_hit_rate_matches_the_exact_computation(capacity):
    rng = random.Random(capacity)
    trace = [rng.choice("abcdefghijkl") for _ in range(300)]
    assert sim.lru_hits(trace, capacity) == exact_lru_hits(trace, capacity)


def test_lru_never_evicts_a_pinned_adapter():
    cache = sim.LRU(2)
    cache.add("a")
    cache.add("b")
    cache.pin("a")
    assert cache.add("c") == ["b"]
    cache.pin("c", 2)
    assert cache.add("d") == []  # every other one pinned: over the bound
    assert cache.order() == ["a", "c", "d"]
    cache.unpin("a")
    assert cache.add("e") == ["a", "d"]  # back within the bound at the next load; "c" still pinned
    assert cache.order() == ["c", "e"]


def test_zipf_sampling_follows_the_formula():
    n, s, draws = 20, 1.1, 200_000
    p = sim.zipf_probabilities(n, s)
    h = sum(k ** -s for k in range(1, n + 1))
    assert np.allclose(p, [k ** -s / h for k in range(1, n + 1)])
    counts = np.bincount(sim.zipf_sample(np.random.default_rng(0), n, s, draws), minlength=n)
    assert counts.sum() == draws and len(counts) == n
    sd = np.sqrt(draws * p * (1 - p))
    assert np.all(np.abs(counts - draws * p) < 5 * sd)


def test_rendezvous_order_is_a_permutation_and_spreads_adapters():
    order = sim.rendezvous_order(4000, 16)
    assert (np.sort(order, axis=1) == np.arange(16)).all()
    firsts = np.bincount(order[:, 0], minlength=16)
    assert firsts.min() > 4000 / 16 * 0.75 and firsts.max() < 4000 / 16 * 1.25
    # a replica removed moves only the adapters whose first choice it was
    fewer = sim.rendezvous_order(4000, 17)[:, 0]
    moved = fewer != order[:, 0]
    assert (fewer[moved] == 16).all()


def test_unloaded_affinity_sends_each_adapter_to_its_rendezvous_replica():
    run = sim.Simulation(quiet(routing="affinity", record_routes=True), COSTS).run()
    assert (run.routes == run.order[run.adapter_of, 0]).all()
    random_run = sim.Simulation(quiet(routing="random", record_routes=True), COSTS).run()
    assert len(set(random_run.routes.tolist())) == 4


@pytest.mark.parametrize("routing", sim.ROUTINGS)
def test_loads_are_the_misses_of_each_replicas_own_trace(routing):
    """Without overlap, each replica's cache is a plain LRU of the requests routed to it: hits and
    loads are exactly the LRU's on that replica's sub-trace."""
    run = sim.Simulation(quiet(routing=routing, record_routes=True), COSTS).run()
    hits = np.zeros(run.cfg.requests, dtype=bool)
    for r in range(run.cfg.replicas):
        idx = np.flatnonzero(run.routes == r)
        hits[idx] = sim.lru_hits(run.adapter_of[idx].tolist(), run.cfg.cache)
    assert (run.hit == hits).all()
    assert len(run.loads_by) == int((~hits).sum())
    assert sorted(run.loads_by) == np.flatnonzero(~hits).tolist()
    figures = run.figures()
    assert figures["loads_per_request"] == round((~hits).mean(), 4)
    # alone, a hit waits the batcher's wait and one step; a miss its load before them
    latency = run.done - run.arrivals
    alone = np.diff(run.arrivals, prepend=-1.0) > 1.0  # the request before it was answered long ago
    assert alone.mean() > 0.95
    assert np.allclose(latency[hits & alone], run.cfg.batch_wait_s + COSTS.step(1))
    assert np.allclose(latency[~hits & alone], COSTS.load_s + run.cfg.batch_wait_s + COSTS.step(1))


def test_concurrent_requests_for_a_missing_adapter_share_one_load():
    cfg = sim.Config(routing="affinity", adapters=1, replicas=1, cache=1, requests=50, load=5.0, warmup=0.0, prewarm=0)
    run = sim.Simulation(cfg, COSTS).run()
    assert len(run.loads_by) == 1 and run.loads_by == [0]
    assert not np.isnan(run.done).any()


def test_batches_hold_at_most_max_batch_and_every_request_is_answered():
    cfg = sim.Config(routing="random", adapters=100, replicas=2, cache=8, requests=3000, load=0.9, seed=1)
    run = sim.Simulation(cfg, COSTS).run()
    assert not np.isnan(run.done).any()
    assert all(r.outstanding == 0 and not r.cache.pins and not r.waiting for r in run.replicas)
    assert max(r.largest for r in run.replicas) == cfg.max_batch  # full batches under this load, never more
    for r in run.replicas:  # over the bound only while every other adapter was pinned: the next load restores it
        r.cache.add("new")
        assert len(r.cache) == cfg.cache


def test_the_same_seed_gives_the_same_figures_and_another_seed_others():
    cfg = dict(adapters=2000, replicas=8, cache=16, requests=4000, load=0.3, zipf_s=1.0)
    for routing in sim.ROUTINGS:
        a = sim.simulate(sim.Config(routing=routing, seed=5, **cfg), COSTS)
        assert a == sim.simulate(sim.Config(routing=routing, seed=5, **cfg), COSTS)
        assert a != sim.simulate(sim.Config(routing=routing, seed=6, **cfg), COSTS)


def test_light_load_hit_rates_agree_with_ches_approximation():
    cfg = dict(adapters=2000, replicas=8, cache=32, requests=20_000, load=0.01, zipf_s=0.9, seed=2)
    che = sim.che_figures(sim.Config(**cfg))
    for routing in ("random", "affinity"):
        got = sim.simulate(sim.Config(routing=routing, **cfg), COSTS)["hit_rate"]
        assert abs(got - che[f"che_hit_rate_{routing}"]) < 0.03, (routing, got, che)


def test_costs_interpolate_the_measured_steps_and_read_a_results_row(tmp_path):
    assert COSTS.step(1) == 0.01 and COSTS.step(8) == 0.02 and COSTS.step(32) == 0.05
    assert COSTS.step(20) == pytest.approx(0.02 + 0.03 * 12 / 24)
    assert COSTS.step(64) == pytest.approx(0.05 + 0.03 / 24 * 32)
    f = tmp_path / "rows.jsonl"
    f.write_text('{"figure": "P8 cell"}\n' + json.dumps(COSTS.row()) + "\n")
    again = sim.read_costs(f)
    assert (again.load_s, again.step_s) == (pytest.approx(COSTS.load_s), COSTS.step_s)
    g = tmp_path / "gpu.json"
    g.write_text('{"load_s": 0.1, "step_s": {"1": 0.01, "32": 0.03}, "source": "an A100"}')
    gpu = sim.read_costs(g)
    assert gpu.load_engine_s == 0.1 and gpu.load_verify_s == 0.0 and "an A100" in gpu.source


def test_a_sweep_gives_one_row_per_cell_and_the_p8_ratio(tmp_path):
    rows = []
    out = sim_adapter_cache.sweep(COSTS, [1.0], [4], [0.05], ["affinity", "random", "serve"], 600, 0, rows.append)
    cells = [r for r in rows if r["figure"] == "P8 cell"]
    assert [r["routing"] for r in cells] == ["affinity", "random", "serve"]
    (p8,) = out
    assert p8["affinity_over_random_loads"] == round(cells[0]["loads_per_request"] / cells[1]["loads_per_request"], 3)
    assert p8["met"] == (p8["affinity_over_random_loads"] <= 0.5)
    f = tmp_path / "rows.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in [COSTS.row(), *rows]))
    table = sim_adapter_cache.table(f).splitlines()
    assert len(table) == 3 and table[2].startswith("| 0.05 | 1.0 | 4 |")
