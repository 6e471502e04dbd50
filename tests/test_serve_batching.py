"""Dynamic batching on a real replica: concurrent classify requests share forwards, and every answer
equals the same request served alone (probabilities to 1e-5). Adapters of a method that declares
`shares_forward` (LoRA) share one forward across adapters; others (IA3) are grouped per adapter, and
no request is ever answered by another adapter."""

import asyncio
import json
import shutil

import httpx
import pytest
import torch
from safetensors.torch import load_file, save_file

from workers.artifact import MANIFEST, write_manifest

from helpers import METHOD_TEXTS

pytestmark = pytest.mark.slow

TEXTS = METHOD_TEXTS + ["good movie", "the plot was dull", "warm and lovely", "a grim cast", "fun fun fun",
                        "bad bad bad", "really great story", "the film was poor and cold"]


def perturbed_copy(folder, dst, weights_file, scale=-1.5):
    """Another real adapter: the trained one with every float weight scaled, with its own manifest."""
    shutil.copytree(folder, dst)
    tensors = {k: v * scale if v.is_floating_point() else v for k, v in load_file(str(dst / weights_file)).items()}
    save_file(tensors, str(dst / weights_file), metadata={"format": "pt"})
    manifest = json.loads((dst / MANIFEST).read_text())
    (dst / MANIFEST).unlink()
    keep = {k: manifest[k] for k in ("adapter", "input_template", "max_length") if k in manifest}
    write_manifest(dst, method=manifest["method"], model=manifest["model"],
                   base_sha256=manifest["base_model"]["sha256"], extra=keep)
    return dst


@pytest.fixture(scope="module")
def server(trained_adapters, serve_port, ray_session, tmp_path_factory):
    from serve.deploy import deploy, shutdown

    tmp = tmp_path_factory.mktemp("batching")
    lora, ia3 = trained_adapters("lora"), trained_adapters("ia3")
    base = lora["spec"].model.model_dump(mode="json")
    lora_b = perturbed_copy(lora["folder"], tmp / "lora-b", "adapter_model.safetensors")
    ia3_b = perturbed_copy(ia3["folder"], tmp / "ia3-b", "adapter_model.safetensors", scale=1.7)
    url = deploy({"l1": str(lora["folder"]), "l2": str(lora_b)}, port=serve_port, name="lora-batch",
                 route_prefix="/lb", num_cpus=0.25, base=base, max_batch_size=16, batch_wait_timeout_s=0.05)
    deploy({"i1": str(ia3["folder"]), "i2": str(ia3_b)}, port=serve_port, name="ia3-batch", route_prefix="/ib",
           num_cpus=0.25, base=base, max_batch_size=16, batch_wait_timeout_s=0.05)
    root = url.rsplit("/lb", 1)[0]
    yield root
    shutdown("lora-batch")
    shutdown("ia3-batch")


def _requests(a, b):
    return [{"adapter": (a, b)[i % 2], "inputs": [TEXTS[i % len(TEXTS)]]} for i in range(32)]


async def _concurrently(url, bodies):
    async with httpx.AsyncClient(timeout=120) as client:
        return await asyncio.gather(*(client.post(url, json=b) for b in bodies))


@pytest.mark.parametrize("prefix,a,b", [("lb", "l1", "l2"), ("ib", "i1", "i2")])
def test_batched_answers_equal_answers_alone(server, prefix, a, b):
    url = f"{server}/{prefix}/v1/classify"
    bodies = _requests(a, b)
    alone = [httpx.post(url, json=body, timeout=60).json()["results"] for body in bodies]
    stats0 = httpx.get(f"{server}/{prefix}/v1/stats", timeout=30).json()
    responses = asyncio.run(_concurrently(url, bodies))
    stats1 = httpx.get(f"{server}/{prefix}/v1/stats", timeout=30).json()
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses if r.status_code != 200]
    for body, r, ref in zip(bodies, responses, alone):
        got = r.json()
        assert got["adapter"] == body["adapter"]
        for g, w in zip(got["results"], ref):
            assert g["label"] == w["label"]
            assert g["probabilities"] == pytest.approx(w["probabilities"], abs=1e-5)
    # the two adapters really differ on these inputs, so a mix-up would show
    one = [x[0]["probabilities"]["positive"] for x in alone[0::2]]
    two = [x[0]["probabilities"]["positive"] for x in alone[1::2]]
    assert max(abs(p - q) for p, q in zip(one, two)) > 1e-3
    forwards = stats1["forwards"] - stats0["forwards"]
    assert forwards < len(bodies), stats1  # concurrent requests shared forwards
    if prefix == "lb":  # LoRA declares shares_forward: one forward can hold both adapters
        assert stats1["mixed_forwards"] > stats0["mixed_forwards"], stats1
    else:  # IA3 does not: never a mixed forward
        assert stats1["mixed_forwards"] == 0, stats1


def test_a_bad_request_in_a_batch_fails_alone(server):
    url = f"{server}/lb/v1/classify"
    bodies = _requests("l1", "l2")[:8] + [{"adapter": "nope", "inputs": ["x"]}, {"adapter": "l1", "inputs": [{"a": 1}]}]
    responses = asyncio.run(_concurrently(url, bodies))
    assert [r.status_code for r in responses] == [200] * 8 + [404, 400]


def test_probabilities_match_the_library_directly(server, trained_adapters):
    """The served numbers are the model's: PEFT with the adapter loaded the plain way."""
    from peft import PeftModel

    from workers.models import load_model, load_tokenizer

    spec = trained_adapters("lora")["spec"]
    tok = load_tokenizer(spec.model)
    model = PeftModel.from_pretrained(load_model(spec.model, tok), str(trained_adapters("lora")["folder"])).eval()
    enc = tok(TEXTS[:4], padding=True, return_tensors="pt")
    with torch.no_grad():
        ref = torch.softmax(model(**enc).logits, -1)[:, 1].tolist()
    got = httpx.post(f"{server}/lb/v1/classify", json={"adapter": "l1", "inputs": TEXTS[:4]}, timeout=60).json()
    assert [r["probabilities"]["positive"] for r in got["results"]] == pytest.approx(ref, abs=1e-5)


def test_metrics_are_exported(server, metrics_url):
    """Ours (batch sizes, forwards mixed or not, requests in flight, adapters resident, load latency)
    beside Serve's built-in ones, on Ray's metrics endpoint."""
    import re
    import time

    asyncio.run(_concurrently(f"{server}/lb/v1/classify", _requests("l1", "l2")))
    wanted = ["ray_adapterflow_batch_rows_bucket", "ray_adapterflow_batch_requests_bucket",
              "ray_adapterflow_forwards_total", "ray_adapterflow_requests_in_flight",
              "ray_adapterflow_adapters_resident", "ray_adapterflow_adapter_load_seconds_bucket", "ray_serve_"]
    deadline, text = time.monotonic() + 90, ""
    while time.monotonic() < deadline:
        text = httpx.get(metrics_url, timeout=10).text
        ours = [line for line in text.splitlines() if 'app="lora-batch"' in line]
        if all(w in text for w in wanted) and any("adapters_resident" in x for x in ours) and \
                any('mixed="true"' in x for x in ours):
            break
        time.sleep(3)
    missing = [w for w in wanted if w not in text]
    assert not missing, missing
    resident = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                if line.startswith("ray_adapterflow_adapters_resident{") and 'app="lora-batch"' in line]
    assert resident == [2.0], [line for line in text.splitlines() if "adapters_resident" in line]
    mixed = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
             if re.match(r"ray_adapterflow_forwards_total\{.*app=\"lora-batch\".*mixed=\"true\"", line)]
    assert mixed and mixed[0] > 0, mixed


# every classifier family; the weights file a second adapter is derived from (None: one adapter per replica)
FAMILIES = {"pvera": "adapter_model.safetensors", "sparta": "sparse_deltas.safetensors",
            "nls": "adapter_model.safetensors", "sparsepeft": "adapter_model.safetensors", "qa-sparsepeft": None}


@pytest.mark.parametrize("method", sorted(FAMILIES))
def test_every_family_batched_equals_alone(method, trained_adapters, serve_port, ray_session, tmp_path):
    """Concurrent mixed requests on a replica of each family: each answer equals the same request alone."""
    from serve.deploy import deploy, shutdown
    from workers.methods import get_method

    trained = trained_adapters(method)
    adapters = {"x1": str(trained["folder"])}
    if FAMILIES[method]:
        adapters["x2"] = str(perturbed_copy(trained["folder"], tmp_path / "x2", FAMILIES[method], scale=1.7))
    name = f"fam-{method}"
    url = deploy(adapters, port=serve_port, name=name, route_prefix=f"/{name}", num_cpus=0.25, max_batch_size=16,
                 batch_wait_timeout_s=0.05, base=trained["spec"].model.model_dump(mode="json"))
    try:
        bodies = _requests("x1", "x2" if len(adapters) > 1 else "x1")[:16]
        alone = [httpx.post(f"{url}/v1/classify", json=b, timeout=60).json()["results"] for b in bodies]
        batched = asyncio.run(_concurrently(f"{url}/v1/classify", bodies))
        for r, ref in zip(batched, alone):
            assert r.status_code == 200, r.text
            for g, w in zip(r.json()["results"], ref):
                assert g["probabilities"] == pytest.approx(w["probabilities"], abs=1e-5)
        stats = httpx.get(f"{url}/v1/stats", timeout=30).json()
        assert stats["forwards"] < 2 * len(bodies), stats  # the concurrent round shared forwards
        if len(adapters) > 1:
            one = [x[0]["probabilities"] for x in alone[0::2]]
            two = [x[0]["probabilities"] for x in alone[1::2]]
            assert any(abs(a[k] - b[k]) > 1e-4 for a, b in zip(one, two) for k in a), "the two adapters should differ"
            assert (stats["mixed_forwards"] > 0) == get_method(method).shares_forward, stats
    finally:
        shutdown(name)
