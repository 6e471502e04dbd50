"""The training loop in Ray Train local mode (in-process, one rank): learning and exact resume."""

import json

import pytest
import torch
from safetensors.torch import load_file

from helpers import need_shared
from pipelines.spec import parse_spec
from pipelines.train import build_artifact, evaluate_artifact, latest_local_checkpoint, launch_training


def spec_for(model, data, tmp, task="seq-cls", **train):
    d = {
        "name": "local-test", "workspace": str(tmp / "ws"),
        "model": {"name": str(model), "task": task},
        "data": {"path": str(data), "max_length": 32},
        "adapter": {"method": "lora", "r": 4, "alpha": 8, "dropout": 0.1,
                    "target_modules": ["q_proj", "v_proj"]},
        "train": {"num_workers": 0, "global_batch_size": 16, "lr": 5e-3, "epochs": 1,
                  "checkpoint_every": 4, "log_every": 2, "seed": 3, **train},
    }
    if task == "seq-cls":
        d["model"]["id2label"] = {0: "negative", 1: "positive"}
    else:
        d["data"].update(input_template="{instruction}", target_template="{output}")
        d["model"]["prompt_format"] = "### instruction: {prompt} response:"
    return parse_spec(d)


def mean(xs):
    return sum(xs) / len(xs)


def test_seq_cls_loss_decreases_on_tiny_llama(tiny_llama, toy_data, tmp_path, ray_session):
    spec = spec_for(tiny_llama, toy_data, tmp_path, epochs=3, lr=1e-2)
    out = launch_training(spec, run_name="learn")
    losses = [h["loss"] for h in out.history]
    assert [h["step"] for h in out.history] == list(range(1, 49))
    assert mean(losses[-8:]) < mean(losses[:8]) - 0.1, losses
    assert out.metrics["trainable_params"] > 0 and out.metrics["resumed_from_step"] == -1
    adapter = build_artifact(spec, out.checkpoint, tmp_path / "adapter")
    report = evaluate_artifact(spec, adapter)
    assert report["n"] == 64 and report["accuracy"] > 0.75, report


def test_causal_lm_loss_decreases_on_stories260k(toy_instruct, tmp_path, ray_session):
    model = need_shared("models", "stories260K")
    spec = spec_for(model, toy_instruct, tmp_path, task="causal-lm", epochs=2, lr=1e-2)
    out = launch_training(spec, run_name="lm")
    losses = [h["loss"] for h in out.history]
    assert mean(losses[-4:]) < mean(losses[:4]) * 0.8, losses
    report = evaluate_artifact(spec, build_artifact(spec, out.checkpoint, tmp_path / "adapter"))
    assert report["perplexity"] == pytest.approx(torch.tensor(report["eval_loss"]).exp().item(), rel=1e-6)


@pytest.mark.parametrize("case", ["tiny-llama-seq-cls", "stories260k-causal-lm"])
def test_interrupted_run_resumes_at_the_next_step_with_identical_results(case, tiny_llama, toy_data, toy_instruct,
                                                                          tmp_path, ray_session):
    if case == "tiny-llama-seq-cls":
        spec = spec_for(tiny_llama, toy_data, tmp_path, max_steps=10, epochs=1)
    else:
        spec = spec_for(need_shared("models", "stories260K"), toy_instruct, tmp_path, task="causal-lm",
                        max_steps=10, epochs=2, global_batch_size=8)
    full = launch_training(spec, run_name="full")

    fault = {"step": 6, "rank": 0, "mode": "raise", "marker": str(tmp_path / "fault-marker")}
    with pytest.raises(Exception, match="injected fault after step 6"):
        launch_training(spec, run_name="crash", fault=fault)
    ckpt = latest_local_checkpoint(spec, "crash")
    assert ckpt is not None and ckpt.name == "checkpoint_0000004"
    resumed = launch_training(spec, run_name="resume", resume_from=str(ckpt), fault=fault)
    assert resumed.metrics["resumed_from_step"] == 4

    assert [h["step"] for h in resumed.history] == list(range(1, 11))
    for a, b in zip(full.history, resumed.history):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5), (a, b)
        assert a["lr"] == pytest.approx(b["lr"], abs=1e-12)
    wa = load_file(str(full.checkpoint / "adapter" / "adapter_model.safetensors"))
    wb = load_file(str(resumed.checkpoint / "adapter" / "adapter_model.safetensors"))
    assert wa.keys() == wb.keys() and len(wa) > 0
    for k in wa:
        assert torch.allclose(wa[k], wb[k], atol=1e-5), k
    # the adapter really trained: LoRA B starts at zero
    assert any(k.endswith("lora_B.weight") and wa[k].abs().max() > 1e-4 for k in wa)
    assert json.loads((resumed.checkpoint / "history.json").read_text()) == resumed.history


def test_head_lr_puts_the_task_head_in_its_own_group(tiny_llama, tmp_path):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from workers.config import TrainSpec
    from workers.methods import REGISTRY, attach
    from workers.train_loop import param_groups

    train = TrainSpec(lr=3e-2, head_lr=1e-3)
    cases = {
        "lora": {"method": "lora", "r": 4, "target_modules": ["q_proj", "v_proj"]},
        "sparta": {"method": "sparta", "sparsity": 0.9},
    }
    for name, adapter in cases.items():
        model = attach(AutoModelForSequenceClassification.from_pretrained(tiny_llama, num_labels=2),
                       REGISTRY[name][0].model_validate(adapter), "seq-cls")
        body, head = param_groups(model, train)
        assert (body["lr"], head["lr"]) == (3e-2, 1e-3)
        names = {id(p): n for n, p in model.named_parameters()}
        head_names = sorted(names[id(p)] for p in head["params"])
        assert len(head_names) == 1 and "score" in head_names[0], head_names
        assert sum(p.numel() for p in head["params"]) == 32 * 2  # the score weight: hidden x labels
        assert len(body["params"]) > 0 and all("score" not in names[id(p)] for p in body["params"])
    one = param_groups(model, TrainSpec(lr=3e-2))
    assert len(one) == 1 and one[0]["lr"] == 3e-2
    lm = attach(AutoModelForCausalLM.from_pretrained(tiny_llama),
                REGISTRY["lora"][0].model_validate(cases["lora"]), "causal-lm")
    with pytest.raises(ValueError, match="no trainable task head"):
        param_groups(lm, train)
