"""A method from outside the package, through the one door: a spec naming `plugins: [toy_gain]`
(tests/plugins/toy_gain, a scalar gain on one projection) validates, trains on 2 Ray Train workers
with DeepSpeed, saves, loads with checksums, evaluates, and answers HTTP from a real Serve replica.
No project file names it."""

import json
import subprocess

import httpx
import pytest
import torch

from pipelines.spec import parse_spec
from workers.errors import PluginError, SpecError

from helpers import ROOT

pytestmark = pytest.mark.slow


def gain_spec(tiny_llama, toy_data, tmp_path, **adapter):
    return {
        "name": "toy-gain", "workspace": str(tmp_path / "ws"), "plugins": ["toy_gain"],
        "model": {"name": str(tiny_llama), "task": "seq-cls", "id2label": {0: "negative", 1: "positive"}},
        "data": {"path": str(toy_data), "max_length": 32},
        "adapter": {"method": "toy-gain", "target": "v_proj", "init": 1.0, **adapter},
        "train": {"num_workers": 2, "zero_stage": 2, "global_batch_size": 16, "lr": 5e-2, "max_steps": 16,
                  "checkpoint_every": 8, "log_every": 4, "seed": 11},
    }


def test_the_plugin_validates_only_when_named(tiny_llama, toy_data, tmp_path):
    spec = parse_spec(gain_spec(tiny_llama, toy_data, tmp_path))
    assert spec.adapter.method == "toy-gain" and type(spec.adapter).__name__ == "GainSpec"
    with pytest.raises(SpecError, match=r"adapter.target: expected a string, got 3"):
        parse_spec(gain_spec(tiny_llama, toy_data, tmp_path, target=3))
    with pytest.raises(PluginError, match="cannot import 'no_such_plugin'"):
        parse_spec({**gain_spec(tiny_llama, toy_data, tmp_path), "plugins": ["no_such_plugin"]})


def test_no_project_file_names_the_plugin():
    hits = subprocess.run(["git", "grep", "-l", "-e", "toy.gain", "--", "workers", "pipelines", "serve", "tune"],
                          capture_output=True, text=True, cwd=ROOT)
    assert hits.stdout == "", hits.stdout


def test_trains_on_two_workers_and_serves(tiny_llama, toy_data, tmp_path, ray_session, serve_port):
    from serve.deploy import deploy, shutdown
    from workers.artifact import verify
    from workers.stages import build_artifact, check_inputs, evaluate_artifact, launch_training

    spec = parse_spec(gain_spec(tiny_llama, toy_data, tmp_path))
    check_inputs(spec)
    out = launch_training(spec, run_name="toy-gain")
    assert out.metrics["step"] == 16
    assert out.metrics["trainable_params"] == 2 + 32 * 2  # one gain per v_proj layer + the score head
    folder = build_artifact(spec, out.checkpoint, tmp_path / "adapter")
    manifest = verify(folder)  # sha256 of every file
    assert manifest["method"] == "toy-gain" and manifest["plugins"] == ["toy_gain"]
    from safetensors.torch import load_file

    gains = load_file(str(folder / "gain.safetensors"))["gains"]
    assert gains.shape == (2,) and not torch.allclose(gains, torch.ones(2)), "the gains should have trained"
    report = evaluate_artifact(spec, folder)
    assert report["n"] == 64 and 0 <= report["accuracy"] <= 1

    (folder / "gain_config.json").write_text(json.dumps({"target": "q_proj", "task": "seq-cls"}))
    from workers.errors import AdapterIntegrityError

    with pytest.raises(AdapterIntegrityError, match="fails its checksum"):
        verify(folder)
    folder = build_artifact(spec, out.checkpoint, tmp_path / "adapter")  # rebuilt from the checkpoint

    url = deploy({"gain": str(folder)}, port=serve_port, name="toy-gain", route_prefix="/gain", num_cpus=0.5,
                 base=spec.model.model_dump(mode="json"))
    try:
        r = httpx.post(f"{url}/v1/classify", json={"adapter": "gain", "inputs": ["good great movie"]}, timeout=120)
        assert r.status_code == 200, r.text
        probs = r.json()["results"][0]["probabilities"]
        assert set(probs) == {"negative", "positive"} and sum(probs.values()) == pytest.approx(1, abs=1e-5)
        models = httpx.get(f"{url}/v1/models", timeout=30).json()["data"]
        assert [(m["id"], m["method"]) for m in models] == [("gain", "toy-gain")]
    finally:
        shutdown("toy-gain")
