"""A replica's adapter LRU (serve/cache.py) bounded by bytes, on a real engine: the tiny Llama with a
trained aLoRA under several names (equal bytes) and a trained rank-16 LoRA bigger than the whole
budget. The names come from the application's real registry actor (a name the cache does not know
is read from it); hits, misses and evictions are counted, also into Ray's metrics endpoint."""

import asyncio
import time

import httpx
import pytest

PROMPT = "say the word good"


@pytest.fixture(scope="module")
def folders(trained_adapters, tiny_llama, toy_instruct, tmp_path_factory, ray_session):
    """The aLoRA test case, and a causal-LM LoRA of rank 16 on every projection (2 steps)."""
    from workers.stages import build_artifact, launch_training

    from helpers import adapter_spec, spec_for

    tmp = tmp_path_factory.mktemp("big-lora")
    spec = spec_for(tiny_llama, toy_instruct, tmp, task="causal-lm", max_steps=2)
    spec = spec.model_copy(update={"adapter": adapter_spec(
        {"method": "lora", "r": 16, "alpha": 16,
         "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"]})})
    big = build_artifact(spec, launch_training(spec, run_name="big-lora").checkpoint, tmp / "adapter")
    small = trained_adapters("alora")
    return {"small": small["folder"], "big": big, "base": small["spec"].model.model_dump(mode="json")}


@pytest.fixture
def replica(folders, request):
    """An engine holding `a` (as a replica starts), a cache of it holding at most 2.5 small adapters'
    bytes, and the app's registry naming a..d (the small aLoRA) and `big`."""
    from serve.cache import AdapterCache, weight_bytes
    from serve.deploy import build_engine
    from serve.metrics import ReplicaMetrics
    from serve.registry import drop, registry

    app = f"cache-{request.node.name[:40]}"
    small, big = str(folders["small"]), str(folders["big"])
    entries = {**{n: small for n in "abcd"}, "big": big}
    size = weight_bytes(folders["small"])
    budget = size * 5 // 2
    assert weight_bytes(folders["big"]) > budget  # bigger than all the budget, and other adapters fit
    engine = build_engine({"a": small}, folders["base"])
    cache = AdapterCache(engine, registry(app, entries), {"a": small}, max_bytes=budget,
                         metrics=ReplicaMetrics(app))
    cache.adopt("a", small, folders["small"])
    yield {"app": app, "engine": engine, "cache": cache, "size": size}
    drop(app)


def held(cache):
    """The resident names, least recently used first; the engine serves exactly those."""
    assert sorted(cache.engine.adapters) == sorted(cache.resident)
    assert cache.bytes <= cache.max_bytes, (cache.bytes, cache.max_bytes)
    return list(cache.resident)


async def request(cache, name):
    async with cache.use(name):
        return await asyncio.to_thread(cache.engine.complete, name, PROMPT, max_tokens=3, ignore_eos=True)


def exported(metrics_url, app, want, deadline_s=60):
    """The cache event counters of `app` on Ray's metrics endpoint, once they reach `want`."""
    deadline, got = time.monotonic() + deadline_s, {}
    while time.monotonic() < deadline:
        got = {}
        for line in httpx.get(metrics_url, timeout=10).text.splitlines():
            if line.startswith("ray_adapterflow_adapter_cache_total{") and f'app="{app}"' in line:
                got[line.split('event="', 1)[1].split('"', 1)[0]] = float(line.rsplit(" ", 1)[1])
        if got == want:
            break
        time.sleep(1)
    return got


def test_past_the_byte_budget_the_least_recently_used_unpinned_adapter_goes(replica, metrics_url):
    cache, engine, size = replica["cache"], replica["engine"], replica["size"]
    assert cache.bytes == size and set(cache.refs) == {"a"}

    async def scenario():
        want = await request(cache, "a")
        assert held(cache) == ["a"]
        assert await request(cache, "b") == want  # not known here: read from the registry, loaded
        assert "big" in cache.refs and held(cache) == ["a", "b"] and cache.bytes == 2 * size
        await request(cache, "a")
        assert held(cache) == ["b", "a"]
        await request(cache, "c")  # a third does not fit: b, the least recently used, goes
        assert held(cache) == ["a", "c"]
        async with cache.use("a"):  # a request holds a ...
            await request(cache, "c")
            assert held(cache) == ["a", "c"]  # ... and a is now the least recently used
            await request(cache, "d")  # so c goes, not the pinned a
            assert held(cache) == ["a", "d"]
            assert (await asyncio.to_thread(engine.complete, "a", PROMPT, max_tokens=3, ignore_eos=True)) == want
        await request(cache, "b")  # an evicted adapter loads again on demand
        assert held(cache) == ["d", "b"]

    asyncio.run(scenario())
    counts = {"cache_hits": 4, "cache_misses": 4, "evictions": 3, "reloads": 0}
    assert cache.counts == counts
    assert exported(metrics_url, replica["app"], {k: v for k, v in counts.items() if v}) == \
        {k: float(v) for k, v in counts.items() if v}


def test_an_adapter_bigger_than_the_whole_budget_is_refused(replica):
    from workers.errors import RequestTooLargeError

    cache = replica["cache"]

    async def scenario():
        await request(cache, "b")
        assert held(cache) == ["a", "b"]
        with pytest.raises(RequestTooLargeError, match="serve.max_adapter_bytes") as refused:
            await request(cache, "big")
        assert "'big'" in str(refused.value)
        with pytest.raises(RequestTooLargeError):  # the admin route's load too
            await cache.load("big", cache.refs["big"])
        assert held(cache) == ["a", "b"]  # nothing was evicted for it
        assert "big" not in cache.pins or cache.pins["big"] == 0
        await request(cache, "c")  # and the cache goes on
        assert held(cache) == ["b", "c"]

    asyncio.run(scenario())
    assert cache.counts["evictions"] == 1
