"""The training loop in Ray Train local mode (in-process, one rank): learning and exact resume."""

import json

import pytest
import torch
from safetensors.torch import load_file

from workers.stages import build_artifact, evaluate_artifact, latest_local_checkpoint, launch_training

from helpers import adapter_spec, mean, need_shared, spec_for


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
    # random batches: under length_grouped a step's loss also follows the lengths its batch holds
    spec.data.batching = "random"
    out = launch_training(spec, run_name="lm")
    losses = [h["loss"] for h in out.history]
    assert mean(losses[-4:]) < mean(losses[:4]) * 0.8, losses
    report = evaluate_artifact(spec, build_artifact(spec, out.checkpoint, tmp_path / "adapter"))
    assert report["perplexity"] == pytest.approx(torch.tensor(report["eval_loss"]).exp().item(), rel=1e-6)


@pytest.mark.parametrize("case", ["tiny-llama-seq-cls", "stories260k-causal-lm"])
def test_interrupted_run_resumes_at_the_next_step_with_identical_results(case, tiny_llama, toy_data, toy_instruct,
                                                                          tmp_path, ray_session, monkeypatch):
    if case == "tiny-llama-seq-cls":
        spec = spec_for(tiny_llama, toy_data, tmp_path, max_steps=10, epochs=1)
    else:
        spec = spec_for(need_shared("models", "stories260K"), toy_instruct, tmp_path, task="causal-lm",
                        max_steps=10, epochs=2, global_batch_size=8)
    full = launch_training(spec, run_name="full")

    # the process fails right after the step-8 checkpoint is written (the test patches Ray's report)
    import ray.train

    real = ray.train.report

    def failing(metrics, *args, **kwargs):
        if metrics.get("step") == 8:
            raise RuntimeError("injected fault after step 8")
        return real(metrics, *args, **kwargs)

    monkeypatch.setattr(ray.train, "report", failing)
    with pytest.raises(Exception, match="injected fault after step 8"):
        launch_training(spec, run_name="crash")
    monkeypatch.setattr(ray.train, "report", real)
    ckpt = latest_local_checkpoint(spec, "crash")
    assert ckpt is not None and ckpt.name == "checkpoint_0000008"
    resumed = launch_training(spec, run_name="resume", resume_from=str(ckpt))
    assert resumed.metrics["resumed_from_step"] == 8

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
    from workers.errors import SpecError
    from workers.methods import attach, get_method
    from workers.train_loop import param_groups

    train = TrainSpec(lr=3e-2, head_lr=1e-3)
    cases = {
        "lora": {"method": "lora", "r": 4, "target_modules": ["q_proj", "v_proj"]},
        "sparta": {"method": "sparta", "sparsity": 0.9},
    }
    for name, adapter in cases.items():
        model = attach(AutoModelForSequenceClassification.from_pretrained(tiny_llama, num_labels=2),
                       adapter_spec(adapter), "seq-cls")
        body, head = param_groups(model, train, get_method(name))
        assert (body["lr"], head["lr"]) == (3e-2, 1e-3)
        names = {id(p): n for n, p in model.named_parameters()}
        head_names = sorted(names[id(p)] for p in head["params"])
        assert len(head_names) == 1 and "score" in head_names[0], head_names
        assert sum(p.numel() for p in head["params"]) == 32 * 2  # the score weight: hidden x labels
        assert len(body["params"]) > 0 and all("score" not in names[id(p)] for p in body["params"])
    one = param_groups(model, TrainSpec(lr=3e-2), get_method("sparta"))
    assert len(one) == 1 and one[0]["lr"] == 3e-2
    lm = attach(AutoModelForCausalLM.from_pretrained(tiny_llama),
                adapter_spec(cases["lora"]), "causal-lm")
    with pytest.raises(SpecError, match="no trainable task head"):
        param_groups(lm, train, get_method("lora"))


def test_the_loop_runs_in_a_plain_process_with_a_callback(tiny_llama, toy_data, tmp_path, ray_session):
    """The training loop with a plain session (no Ray Train: reports go to a callback) trains exactly
    what it trains under Ray Train: same losses, same saved adapter, bit for bit."""
    from workers.session import LocalSession
    from workers.train_loop import FINAL_ADAPTER_DIR, run_training

    spec = spec_for(tiny_llama, toy_data, tmp_path, max_steps=6, checkpoint_every=3)
    under_ray = launch_training(spec, run_name="under-ray")

    seen = []
    session = LocalSession(on_report=lambda m, d: seen.append((m["step"], sorted(p.name for p in d.iterdir()))))
    config = {"spec": spec.model_dump(mode="json"), "checkpoint_root": str(tmp_path / "plain")}
    run_training(config, session)
    assert [s for s, _ in seen] == [3, 6]
    assert FINAL_ADAPTER_DIR in seen[-1][1] and FINAL_ADAPTER_DIR not in seen[0][1]
    final = sorted((tmp_path / "plain").glob("checkpoint_*"))[-1]
    plain = json.loads((final / "history.json").read_text())
    assert [h["loss"] for h in plain] == [h["loss"] for h in under_ray.history]
    a = load_file(str(final / FINAL_ADAPTER_DIR / "adapter_model.safetensors"))
    b = load_file(str(under_ray.checkpoint / FINAL_ADAPTER_DIR / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # resuming from the step-3 checkpoint in a plain process lands on the same adapter
    again = LocalSession(resume_from=str(sorted((tmp_path / "plain").glob("checkpoint_*"))[0]))
    run_training({**config, "checkpoint_root": str(tmp_path / "resumed")}, again)
    assert again.reports[-1]["resumed_from_step"] == 3
    last = sorted((tmp_path / "resumed").glob("checkpoint_*"))[-1]
    c = load_file(str(last / FINAL_ADAPTER_DIR / "adapter_model.safetensors"))
    assert all(torch.allclose(a[k], c[k], atol=1e-6) for k in a)
