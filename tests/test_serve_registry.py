"""The live adapter registry of a real Serve app: admin routes (their own key, allow-listed roots),
loads and unloads that act app-wide (2 replicas, and a replica that restarts), a per-replica LRU
bounded by count, and a registry alias moved under load without a dropped request."""

import asyncio
import os
import threading
import time

import httpx
import pytest
from conftest import ADMIN_KEY_ENV, API_KEY_ENV
from test_serve_batching import TEXTS, perturbed_copy

pytestmark = pytest.mark.slow

ADMIN = {"Authorization": f"Bearer {os.environ[ADMIN_KEY_ENV]}"}


def probs(url, adapter, texts=TEXTS[:4], headers=None):
    r = httpx.post(f"{url}/v1/classify", json={"adapter": adapter, "inputs": list(texts)}, headers=headers, timeout=60)
    assert r.status_code == 200, r.text
    return [x["probabilities"]["positive"] for x in r.json()["results"]]


@pytest.fixture(scope="module")
def variants(trained_adapters, tmp_path_factory):
    """The trained LoRA classifier and two clearly different copies, under one allow-listed root."""
    root = tmp_path_factory.mktemp("adapter-root")
    lora = trained_adapters("lora")
    folders = {"a": perturbed_copy(lora["folder"], root / "a", "adapter_model.safetensors", scale=1.0),
               "b": perturbed_copy(lora["folder"], root / "b", "adapter_model.safetensors", scale=-1.5),
               "c": perturbed_copy(lora["folder"], root / "c", "adapter_model.safetensors", scale=3.0)}
    return {"root": root, "folders": folders, "base": lora["spec"].model.model_dump(mode="json"), "lora": lora}


@pytest.fixture(scope="module")
def expected(variants):
    """Each variant's probabilities from an engine in this process (a reference for the served ones)."""
    from serve.deploy import build_engine

    engine = build_engine({k: str(v) for k, v in variants["folders"].items()}, variants["base"])
    out = {k: [x["probabilities"]["positive"] for x in engine.classify(k, TEXTS[:4])] for k in variants["folders"]}
    assert abs(out["a"][0] - out["b"][0]) > 1e-3 and abs(out["a"][0] - out["c"][0]) > 1e-3
    return out


def test_admin_routes_need_the_admin_key_and_an_allowed_root(variants, expected, serve_port, ray_session, tmp_path):
    from serve.deploy import deploy, shutdown

    folders = variants["folders"]
    url = deploy({"a": str(folders["a"])}, port=serve_port, name="reg-admin", route_prefix="/ra", num_cpus=0.25,
                 base=variants["base"], admin_key_env=ADMIN_KEY_ENV, api_key_env=API_KEY_ENV,
                 adapter_roots=[str(variants["root"])], registry_sync_s=0.5)
    off = deploy({"a": str(folders["a"])}, port=serve_port, name="reg-off", route_prefix="/ro", num_cpus=0.25,
                 base=variants["base"])
    client = {"Authorization": f"Bearer {os.environ[API_KEY_ENV]}"}
    try:
        r = httpx.get(f"{off}/v1/adapters", headers=ADMIN, timeout=30)
        assert r.status_code == 403 and r.json()["error"]["type"] == "forbidden", r.text
        assert httpx.get(f"{url}/v1/adapters", timeout=30).status_code == 401
        assert httpx.get(f"{url}/v1/adapters", headers=client, timeout=30).status_code == 401  # not the client key
        body = {"name": "b", "ref": str(folders["b"])}
        assert httpx.post(f"{url}/v1/adapters", json=body, headers=client, timeout=60).status_code == 401
        outside = perturbed_copy(folders["a"], tmp_path / "elsewhere", "adapter_model.safetensors")
        for ref in (str(outside), f"{variants['root']}/../{tmp_path.name}/elsewhere", "/etc"):
            r = httpx.post(f"{url}/v1/adapters", json={"name": "x", "ref": ref}, headers=ADMIN, timeout=60)
            assert r.status_code == 403 and "serve.adapter_roots" in r.json()["error"]["message"], r.text
        r = httpx.post(f"{url}/v1/adapters", json={"name": "../x", "ref": str(folders["b"])}, headers=ADMIN, timeout=60)
        assert r.status_code == 422
        r = httpx.post(f"{url}/v1/adapters", json={"name": "x", "ref": str(variants["root"] / "nope")}, headers=ADMIN,
                       timeout=60)
        assert r.status_code == 404

        r = httpx.post(f"{url}/v1/adapters", json=body, headers=ADMIN, timeout=60)
        assert r.status_code == 201 and r.json() == {"name": "b", "ref": str(folders["b"]), "resident": True,
                                                     "method": "lora"}, r.text
        assert probs(url, "b", headers=client) == pytest.approx(expected["b"], abs=1e-5)
        listed = httpx.get(f"{url}/v1/adapters", headers=ADMIN, timeout=30).json()["data"]
        assert [(e["name"], e["resident"]) for e in listed] == [("a", True), ("b", True)]
        assert {m["id"] for m in httpx.get(f"{url}/v1/models", headers=client).json()["data"]} == {"a", "b"}

        r = httpx.delete(f"{url}/v1/adapters/b", headers=ADMIN, timeout=60)
        assert r.status_code == 200 and r.json() == {"name": "b", "deleted": True}
        r = httpx.post(f"{url}/v1/classify", json={"adapter": "b", "inputs": ["x"]}, headers=client, timeout=60)
        assert r.status_code == 404 and r.json()["error"]["type"] == "adapter_not_found"
        assert httpx.delete(f"{url}/v1/adapters/b", headers=ADMIN, timeout=60).status_code == 404
        assert probs(url, "a", headers=client) == pytest.approx(expected["a"], abs=1e-5)  # the others go on
    finally:
        shutdown("reg-admin")
        shutdown("reg-off")


def answered_by(url, adapter, texts=TEXTS[:4]):
    """(positive probabilities, the id of the model replica that computed them)."""
    r = httpx.post(f"{url}/v1/classify", json={"adapter": adapter, "inputs": list(texts)}, timeout=60)
    assert r.status_code == 200, r.text
    return [x["probabilities"]["positive"] for x in r.json()["results"]], r.headers["x-adapterflow-replica"]


def settled(url, adapters, rounds=12, wait_s=60):
    """adapter -> the one replica that answered its last `rounds` requests, once routing has settled
    (the router learns what a replica holds a moment after the replica loads it)."""
    deadline = time.monotonic() + wait_s
    while True:
        seen = {a: {answered_by(url, a)[1] for _ in range(rounds)} for a in adapters}
        if all(len(s) == 1 for s in seen.values()) or time.monotonic() > deadline:
            return {a: next(iter(s)) if len(s) == 1 else s for a, s in seen.items()}
        time.sleep(0.5)


def test_requests_go_to_the_replica_that_holds_their_adapter(variants, expected, serve_port, ray_session):
    """2 replicas that each hold one adapter (max_adapters 1) serving 2 adapters: after one miss, each
    adapter's requests are answered by the replica holding it, with no further loads. Routed at random,
    alternating requests would load and evict on almost every request."""
    from serve.deploy import deploy, shutdown

    folders = {k: str(variants["folders"][k]) for k in ("a", "b")}
    url = deploy(folders, port=serve_port, name="reg-route", route_prefix="/rr", num_cpus=0.25, num_replicas=2,
                 base=variants["base"], max_adapters=1)
    try:
        assert answered_by(url, "b")[0] == pytest.approx(expected["b"], abs=1e-5)  # one replica loads b
        where = settled(url, ["a", "b"])
        assert isinstance(where["a"], str) and isinstance(where["b"], str) and where["a"] != where["b"], where
        for name in ["a", "b"] * 10:
            probs, replica = answered_by(url, name)
            assert probs == pytest.approx(expected[name], abs=1e-5)
            assert replica == where[name], (name, replica, where)
    finally:
        shutdown("reg-route")


def test_a_load_reaches_every_replica_and_survives_a_restart(variants, expected, serve_port, ray_session):
    """An adapter loaded at run time is the application's: when the replica holding it dies, the other
    one (and the replacement) serve it from the registry."""
    import ray
    from ray import serve

    from serve.deploy import deploy, model_deployment_name, shutdown

    folders = variants["folders"]
    url = deploy({"a": str(folders["a"])}, port=serve_port, name="reg-two", route_prefix="/r2", num_cpus=0.25,
                 num_replicas=2, base=variants["base"], admin_key_env=ADMIN_KEY_ENV,
                 adapter_roots=[str(variants["root"])], registry_sync_s=0.5)
    try:
        r = httpx.post(f"{url}/v1/adapters", json={"name": "c", "ref": str(folders["c"])}, headers=ADMIN, timeout=60)
        assert r.status_code == 201, r.text
        time.sleep(3)  # the router learns that the replica which checked c holds it
        holder = settled(url, ["c"])["c"]
        holder = holder if isinstance(holder, str) else sorted(holder)[0]  # (both, if both were asked meanwhile)
        deployment = model_deployment_name("lora")
        assert serve.status().applications["reg-two"].deployments[deployment].status == "HEALTHY"
        victim = next(a for a in ray.util.list_named_actors(all_namespaces=True)
                      if "reg-two" in a["name"] and deployment in a["name"] and a["name"].endswith(holder))
        ray.kill(ray.get_actor(victim["name"], namespace=victim["namespace"]), no_restart=True)
        answered, ok, deadline = set(), 0, time.monotonic() + 120
        while time.monotonic() < deadline and ok < 5:
            try:
                probs, replica = answered_by(url, "c")
            except (AssertionError, httpx.HTTPError):  # while the router learns that the replica is gone
                time.sleep(0.5)
                continue
            assert probs == pytest.approx(expected["c"], abs=1e-5)
            answered.add(replica)
            ok += 1
        assert ok == 5 and holder not in answered, (holder, answered)
    finally:
        shutdown("reg-two")


def test_a_replica_holds_at_most_max_adapters_and_reloads_on_demand(variants, expected, serve_port, ray_session):
    from serve.deploy import deploy, shutdown

    folders = {k: str(v) for k, v in variants["folders"].items()}
    url = deploy(folders, port=serve_port, name="reg-lru", route_prefix="/rl", num_cpus=0.25, base=variants["base"],
                 max_adapters=2)
    try:
        assert len(httpx.get(f"{url}/healthz?replicas=true").json()["adapters"]) == 2
        for name in ["a", "b", "c", "a", "c", "b", "a"]:
            assert probs(url, name) == pytest.approx(expected[name], abs=1e-5)
            assert len(httpx.get(f"{url}/healthz?replicas=true").json()["adapters"]) <= 2
        stats = httpx.get(f"{url}/v1/stats").json()
        assert stats["cache_misses"] >= 4 and stats["evictions"] >= 4 and stats["cache_hits"] >= 1, stats
    finally:
        shutdown("reg-lru")


def test_moving_an_alias_under_load_drops_no_request(variants, expected, serve_port, ray_session, tmp_path):
    """Clients keep asking `champ` (models:/...@champion) while the alias moves from v1 to v2: every
    answer is 200 and is v1's or v2's, v2's from some point on."""
    import mlflow

    from pipelines import tracking
    from serve.deploy import deploy, shutdown

    from helpers import spec_for

    lora = variants["lora"]
    spec = spec_for(lora["spec"].model.name, tmp_path, tmp_path)
    uri = tracking.setup(spec)
    regs = []
    for folder, acc in ((variants["folders"]["a"], 0.9), (variants["folders"]["b"], 0.1)):
        run_id = tracking.start_run(spec, {})
        regs.append(tracking.log_and_register(run_id, folder, spec, {"accuracy": acc}))
        tracking.end_run(run_id)
    assert regs[0].moved and not regs[1].moved  # v2 is worse: @champion stays on v1
    ref = f"models:/{regs[0].name}@champion"
    url = deploy({"champ": ref}, port=serve_port, name="reg-alias", route_prefix="/rc", num_cpus=0.25,
                 base=variants["base"], tracking_uri=uri, alias_refresh_s=1.0, registry_sync_s=0.5)
    answers, stop = [], threading.Event()

    async def load():
        async with httpx.AsyncClient(timeout=60) as client:
            async def one():
                while not stop.is_set():
                    r = await client.post(f"{url}/v1/classify", json={"adapter": "champ", "inputs": TEXTS[:4]})
                    answers.append((time.monotonic(), r.status_code, r.json()))
            await asyncio.gather(*(one() for _ in range(8)))

    worker = threading.Thread(target=lambda: asyncio.run(load()))
    try:
        worker.start()
        time.sleep(3)
        moved = time.monotonic()
        mlflow.MlflowClient(tracking_uri=uri).set_registered_model_alias(regs[0].name, "champion", regs[1].version)
        time.sleep(8)
    finally:
        stop.set()
        worker.join(60)
        shutdown("reg-alias")
        mlflow.set_tracking_uri(None)
    assert len(answers) > 50 and all(status == 200 for _, status, _ in answers), \
        [a for a in answers if a[1] != 200][:3]
    kinds = []
    for _, _, body in answers:
        got = [x["probabilities"]["positive"] for x in body["results"]]
        kind = next(k for k in ("a", "b") if got == pytest.approx(expected[k], abs=1e-5))
        kinds.append(kind)
    assert kinds[0] == "a" and kinds[-1] == "b", kinds
    first_b = kinds.index("b")
    assert all(k == "b" for k in kinds[first_b:]), "answers went back to the old version"
    assert answers[first_b][0] > moved
