"""QA-SparsePEFT on a Wanda-sparse tiny Llama: trained through the platform, merged into one packed
INT4 model; the packed model is checked against a dequantization written here from the format's
description (numpy nibbles, not the code under test)."""

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open

from workers.merge import merge_adapter
from workers.methods import get_method, load
from workers.models import load_model, load_tokenizer
from workers.stages import build_artifact, evaluate_artifact, launch_training

from helpers import adapter_spec, mean, spec_for

GROUP = 16
TARGETS = ["q_proj", "v_proj", "down_proj"]
TEXTS = ["good great lovely movie", "bad awful dull plot", "the cast was fun and warm", "a cold grim story"]


@pytest.fixture(scope="module")
def qa(sparse_base, toy_data, tmp_path_factory, ray_session):
    tmp = tmp_path_factory.mktemp("qa")
    spec = spec_for(sparse_base, toy_data, tmp, epochs=2, lr=3e-2)
    spec = spec.model_copy(update={"adapter": adapter_spec(
        {"method": "qa-sparsepeft", "r": 4, "alpha": 8, "target_modules": TARGETS, "group_size": GROUP})})
    out = launch_training(spec, run_name="qa")
    folder = build_artifact(spec, out.checkpoint, tmp / "adapter")
    from workers.artifact import verify

    merged_dir = tmp / "int4"
    report = merge_adapter(folder, verify(folder), merged_dir)
    return {"spec": spec, "out": out, "folder": folder, "merged": merged_dir, "report": report}


def _independent_dequant(folder):
    """The format, read by hand: low nibble = even input column, high nibble = odd;
    w = scale[group] * (q - zero[group])."""
    cfg = json.loads((folder / "config.json").read_text())["adapterflow_quantization"]
    g = cfg["group_size"]
    weights = {}
    with safe_open(str(folder / "model.safetensors"), framework="np") as fh:
        keys = set(fh.keys())
        for layer in cfg["layers"]:
            packed = fh.get_tensor(f"{layer}.qweight")
            scales = fh.get_tensor(f"{layer}.scales").astype(np.float64)
            zeros = fh.get_tensor(f"{layer}.zeros").astype(np.float64)
            q = np.empty((packed.shape[0], packed.shape[1] * 2), dtype=np.float64)
            q[:, 0::2] = packed % 16
            q[:, 1::2] = packed // 16
            cols = np.arange(q.shape[1]) // g
            weights[f"{layer}.weight"] = scales[:, cols] * (q - zeros[:, cols])
        others = {k: fh.get_tensor(k) for k in keys
                  if not k.endswith((".qweight", ".scales", ".zeros"))}
    return cfg, weights, others


def test_training_through_fake_quantization_lowers_the_loss(qa):
    losses = [h["loss"] for h in qa["out"].history]
    assert mean(losses[-6:]) < mean(losses[:6]) - 0.05, losses
    lora = 2 * sum(4 * (i + o) for i, o in ((32, 32), (32, 16), (64, 32)))
    assert qa["out"].metrics["trainable_params"] == lora + 64  # LoRA A, B on 2 layers + the score head


def test_packed_int4_model_equals_an_independent_dequantization(qa, sparse_base):
    from transformers import AutoModelForSequenceClassification

    from workers.int4 import load_int4_model

    cfg, weights, others = _independent_dequant(qa["merged"])
    assert len(cfg["layers"]) == 2 * 7  # every Linear of both blocks
    # the reference model: the same architecture, weights set from the hand-decoded tensors
    ref = AutoModelForSequenceClassification.from_pretrained(sparse_base, num_labels=2)
    state = {k: torch.from_numpy(np.asarray(v)) for k, v in others.items()}
    state.update({k: torch.from_numpy(v).float() for k, v in weights.items()})
    missing, unexpected = ref.load_state_dict(state, strict=False)
    assert not unexpected and all("rotary" in m for m in missing), (missing, unexpected)
    ref.config.pad_token_id = 3
    ours = load_int4_model(qa["merged"])
    ours.config.pad_token_id = 3
    tok = load_tokenizer(qa["spec"].model)
    enc = tok(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        a, b = ours(**enc).logits, ref(**enc).logits
    assert torch.allclose(a, b, atol=1e-5), (a, b)
    # ... and equal to the fake-quantized adapter the evaluation ran (merged == unmerged)
    spec = qa["spec"]
    unmerged = load(load_model(spec.model, tok), qa["folder"], "qa-sparsepeft").eval()
    with torch.no_grad():
        assert torch.allclose(unmerged(**enc).logits, a, atol=1e-5)
        plain = load_model(spec.model, tok).eval()(**enc).logits
    assert (plain - a).abs().max() > 1e-3  # quantization + adapter change the outputs


def test_int4_model_keeps_the_base_zero_pattern_and_the_grid(qa, sparse_base):
    from safetensors.torch import load_file

    base = load_file(str(sparse_base / "model.safetensors"))
    cfg, weights, _ = _independent_dequant(qa["merged"])
    adapted = 0
    for name, w in weights.items():
        b = base[name].numpy()
        assert np.all(w[b == 0] == 0), name  # every Wanda zero stays exactly zero: no new non-zero
        # (rounding may also send a few tiny weights to the zero level: more zeros, never fewer)
        adapted += name.rsplit(".", 2)[-2] in TARGETS
    assert adapted == 2 * len(TARGETS)
    assert qa["report"]["nonzeros_added"] <= 0  # none added (rounding removed a few)
    # check-sparsity reads the packed model: a zero is a code equal to its zero point
    from workers.merge import sparsity_of

    rep = sparsity_of(qa["merged"])
    for name, w in weights.items():
        assert rep["layers"][name]["zeros"] == int((w == 0).sum()), name
    assert rep["layers"][name]["sparsity"] >= 0.5
    # every weight sits on its group's 16-level grid
    with safe_open(str(qa["merged"] / "model.safetensors"), framework="np") as fh:
        layer = cfg["layers"][0]
        scales, zeros = fh.get_tensor(f"{layer}.scales"), fh.get_tensor(f"{layer}.zeros")
    w = weights[f"{layer}.weight"]
    levels = w / np.repeat(scales, GROUP, axis=1) + np.repeat(zeros, GROUP, axis=1)
    assert np.allclose(levels, np.round(levels), atol=1e-4) and levels.min() >= -1e-4 and levels.max() <= 15 + 1e-4


def test_qa_layer_forward_is_the_formula(qa):
    """y = x · W_q^T with W_q = s·(clamp(round((W + s_lora·B·A ⊙ M)/s + z), 0, 15) - z), written out here."""
    spec = qa["spec"]
    tok = load_tokenizer(spec.model)
    model = load(load_model(spec.model, tok), qa["folder"], "qa-sparsepeft").eval()
    layer = model.base_model.model.model.layers[1].self_attn.q_proj
    base = layer.get_base_layer()
    w = base.weight.detach()
    a, b = layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach()
    merged = w + (8 / 4) * (b @ a) * (w != 0)
    s = base.qa_scales.repeat_interleave(GROUP, 1)
    z = base.qa_zeros.repeat_interleave(GROUP, 1)
    wq = s * (torch.clamp(torch.round(merged / s + z), 0, 15) - z)
    x = torch.randn(3, w.shape[1])
    with torch.no_grad():
        assert torch.allclose(layer(x), x @ wq.T, atol=1e-6)
    # the straight-through estimator: gradients reach A and B as if there were no rounding
    layer.train()
    layer.lora_A["default"].weight.requires_grad_(True)
    layer(x).sum().backward()
    assert layer.lora_A["default"].weight.grad.abs().sum() > 0


def test_evaluation_and_bad_input(qa):
    report = evaluate_artifact(qa["spec"], qa["folder"])
    assert report["n"] == 64 and 0 <= report["accuracy"] <= 1
    cls = get_method("qa-sparsepeft").spec_class
    with pytest.raises(Exception, match="dropout"):
        cls.model_validate({"method": "qa-sparsepeft", "dropout": 0.1})
    with pytest.raises(Exception, match="even"):
        cls.model_validate({"method": "qa-sparsepeft", "group_size": 7})
    from workers.methods.qa_sparsepeft.layers import prepare_base

    tok = load_tokenizer(qa["spec"].model)
    with pytest.raises(ValueError, match="not a multiple of group_size 24"):
        prepare_base(load_model(qa["spec"].model, tok), 24)
