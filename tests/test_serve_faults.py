"""Bad adapters at a live Serve app: tampered, pickled, made for another base, or a registered one
edited in the artifact store after registration. Each is refused with 409 in the one error shape,
the registry does not take it, and the replica stays healthy and keeps serving the others exactly."""

import json
import os
import pickle
import shutil

import httpx
import pytest
from conftest import ADMIN_KEY_ENV
from test_serve_batching import TEXTS

from workers.artifact import MANIFEST

from helpers import need_shared, spec_for

pytestmark = pytest.mark.slow

ADMIN = {"Authorization": f"Bearer {os.environ[ADMIN_KEY_ENV]}"}


def _probs(url, adapter):
    r = httpx.post(f"{url}/v1/classify", json={"adapter": adapter, "inputs": TEXTS[:4]}, timeout=60)
    return r.status_code, r.json()


@pytest.fixture(scope="module")
def bad(trained_adapters, tmp_path_factory):
    """The trained LoRA classifier and three broken copies of it under one allow-listed root."""
    from safetensors.torch import load_file, save_file

    from workers.artifact import write_manifest
    from workers.config import ModelSpec
    from workers.models import base_fingerprint

    root = tmp_path_factory.mktemp("fault-root")
    good = trained_adapters("lora")["folder"]
    tampered = shutil.copytree(good, root / "tampered")  # weights changed after the manifest was written
    w = tampered / "adapter_model.safetensors"
    save_file({k: v * 2 for k, v in load_file(str(w)).items()}, str(w), metadata={"format": "pt"})
    pickled = shutil.copytree(good, root / "pickled")  # a pickle beside the weights, listed in the manifest
    (pickled / "extra_state.pt").write_bytes(pickle.dumps({"step": 1}))
    manifest = json.loads((pickled / MANIFEST).read_text())
    (pickled / MANIFEST).unlink()
    keep = {k: manifest[k] for k in ("adapter", "input_template", "max_length")}
    write_manifest(pickled, method="lora", model=manifest["model"], base_sha256=manifest["base_model"]["sha256"],
                   extra=keep)
    other = shutil.copytree(good, root / "other-base")  # made for stories260K, not for this base
    (other / MANIFEST).unlink()
    stories = ModelSpec(name=str(need_shared("models", "stories260K")), task="seq-cls")
    write_manifest(other, method="lora", model=manifest["model"], base_sha256=base_fingerprint(stories), extra=keep)
    return {"root": root, "good": good, "tampered": tampered, "pickled": pickled, "other": other,
            "spec": trained_adapters("lora")["spec"]}


def test_bad_adapters_are_refused_and_the_replica_keeps_serving(bad, serve_port, ray_session, tmp_path):
    import mlflow

    from pipelines import tracking
    from serve.deploy import deploy, shutdown

    spec = spec_for(bad["spec"].model.name, tmp_path, tmp_path)
    uri = tracking.setup(spec)
    run_id = tracking.start_run(spec, {})
    reg = tracking.log_and_register(run_id, bad["good"], spec, {"accuracy": 0.9})
    tracking.end_run(run_id)
    ref = f"models:/{reg.name}@champion"
    url = deploy({"good": str(bad["good"]), "registered": ref}, port=serve_port, name="faults", route_prefix="/fa",
                 num_cpus=0.25, base=bad["spec"].model.model_dump(mode="json"), tracking_uri=uri, max_adapters=1,
                 admin_key_env=ADMIN_KEY_ENV, adapter_roots=[str(bad["root"])])
    try:
        status, ok = _probs(url, "good")
        assert status == 200, ok
        for name, why in (("tampered", "sha256"), ("pickled", "pickle"), ("other", "base")):
            r = httpx.post(f"{url}/v1/adapters", json={"name": name, "ref": str(bad[name])}, headers=ADMIN, timeout=60)
            assert r.status_code == 409, r.text
            err = r.json()["error"]
            assert err["type"] == "adapter_integrity" and err["code"] == 409 and why in err["message"].lower(), err
            assert set(err) == {"type", "message", "param", "code"}
            assert _probs(url, "good") == (200, ok)  # the replica goes on, answering exactly as before
        listed = {e["name"] for e in httpx.get(f"{url}/v1/adapters", headers=ADMIN, timeout=30).json()["data"]}
        assert listed == {"good", "registered"}  # none of the bad ones was registered

        # the registered adapter's manifest edited in the artifact store after registration (the driver
        # checked it at deployment; the replica loads it on demand, max_adapters 1)
        store = spec.workspace_path() / "mlartifacts"
        edited = [m for m in store.rglob(MANIFEST)]
        assert edited, "no artifact in the store"
        for m in edited:
            data = json.loads(m.read_text())
            data["input_template"] = "{sentence} (edited)"
            m.write_text(json.dumps(data))
        status, body = _probs(url, "registered")
        assert status == 409 and body["error"]["type"] == "adapter_integrity", body
        assert "changed after registration" in body["error"]["message"]
        assert _probs(url, "good") == (200, ok)
        assert httpx.get(f"{url}/healthz", timeout=30).status_code == 200
    finally:
        shutdown("faults")
        mlflow.set_tracking_uri(None)
