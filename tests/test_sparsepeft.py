"""SparsePEFT on a Wanda-sparse base: the update is masked by the base's non-zeros, so merging adds
no non-zero (plain LoRA on the same base does), and the forward equals the formula written here."""

import json

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file

from workers.methods import load
from workers.models import load_model, load_tokenizer
from workers.stages import build_artifact, launch_training

from helpers import spec_for

TARGETS = ["q_proj", "v_proj", "down_proj"]


@pytest.fixture(scope="module")
def trained(sparse_base, toy_data, tmp_path_factory, ray_session):
    from helpers import adapter_spec

    out = {}
    for method in ("sparsepeft", "lora"):
        tmp = tmp_path_factory.mktemp(method)
        spec = spec_for(sparse_base, toy_data, tmp, epochs=2, lr=3e-2)
        spec = spec.model_copy(update={"adapter": adapter_spec(
            {"method": method, "r": 4, "alpha": 8, "target_modules": TARGETS})})
        res = launch_training(spec, run_name=method)
        out[method] = (spec, build_artifact(spec, res.checkpoint, tmp / "adapter"))
    return out


def merged_and_base(spec, folder):
    tok = load_tokenizer(spec.model)
    base = load_model(spec.model, tok)
    model = load(load_model(spec.model, tok), folder, spec.adapter.method).eval()
    return tok, base, model


def block_linears(model):
    return {n: m.weight.detach().clone() for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and ".layers." in n and n.rsplit(".", 1)[-1] in TARGETS}


def test_merge_keeps_the_exact_zero_pattern_and_plain_lora_does_not(trained):
    spec, folder = trained["sparsepeft"]
    tok, base, model = merged_and_base(spec, folder)
    enc = tok(["good great movie", "a dull cold plot"], padding=True, return_tensors="pt")
    with torch.no_grad():
        unmerged = model(**enc).logits
        merged_model = model.merge_and_unload()
        merged = merged_model(**enc).logits
    assert torch.allclose(merged, unmerged, atol=1e-5)
    before, after = block_linears(base), block_linears(merged_model)
    assert before.keys() == after.keys() and len(before) == 6
    changed = 0
    for n in before:
        assert torch.equal(after[n] == 0, before[n] == 0), n  # not one new non-zero
        changed += int((after[n] != before[n]).sum())
    assert changed > 0, "the adapter trained, so non-zero weights moved"
    report = json.loads((folder / "adapterflow.json").read_text())
    assert report["method"] == "sparsepeft"

    lspec, lfolder = trained["lora"]
    _, lbase, lmodel = merged_and_base(lspec, lfolder)
    new_nonzeros = sum(int(((w != 0) & (lbase_w == 0)).sum()) for w, lbase_w in
                       zip(block_linears(lmodel.merge_and_unload()).values(), block_linears(lbase).values()))
    assert new_nonzeros > 1000  # plain LoRA fills the pruned weights back in


def test_forward_equals_the_masked_formula(trained):
    spec, folder = trained["sparsepeft"]
    _, base, model = merged_and_base(spec, folder)
    weights = load_file(str(folder / "adapter_model.safetensors"))
    name = "model.layers.1.self_attn.q_proj"
    a = next(v for k, v in weights.items() if k.endswith(f"{name}.lora_A.weight"))
    b = next(v for k, v in weights.items() if k.endswith(f"{name}.lora_B.weight"))
    w = dict(base.named_modules())[name].weight.detach()
    scaling = spec.adapter.alpha / spec.adapter.r
    x = torch.randn(3, w.shape[1])
    expected = x @ (w + (scaling * b @ a) * (w != 0)).T
    layer = dict(model.named_modules())[f"base_model.model.{name}"]
    with torch.no_grad():
        got = layer(x)
    assert torch.allclose(got, expected, atol=1e-5)
    assert (b.abs().max() > 1e-4) and not torch.allclose(got, x @ (w + scaling * b @ a).T, atol=1e-4)


def test_the_serving_engine_applies_the_mask(trained):
    from workers.artifact import verify
    from workers.inference import Engine

    spec, folder = trained["sparsepeft"]
    tok, _, model = merged_and_base(spec, folder)
    engine = Engine(spec.model)
    engine.add_adapter("sp", folder, verify(folder))
    texts = ["good great movie", "a dull cold plot"]
    served = engine.classify("sp", texts)
    with torch.no_grad():
        probs = torch.softmax(model(**tok(texts, padding=True, return_tensors="pt")).logits, -1)
    for row, p in zip(served, probs):
        assert row["probabilities"]["positive"] == pytest.approx(p[1].item(), abs=1e-5)
    lspec, lfolder = trained["lora"]
    with pytest.raises(Exception, match="cannot share a replica"):
        engine.add_adapter("plain", lfolder, verify(lfolder))


def test_merge_and_check_sparsity_commands(trained, sparse_base, tmp_path):
    from typer.testing import CliRunner

    from pipelines.cli import app
    from workers.merge import sparsity_of

    runner = CliRunner()
    spec, folder = trained["sparsepeft"]
    r = runner.invoke(app, ["merge", str(folder), "--base", spec.model.name, "-o", str(tmp_path / "sp")],
                      catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "sp" / "merge_report.json").read_text())["nonzeros_added"] == 0
    lspec, lfolder = trained["lora"]
    r = runner.invoke(app, ["merge", str(lfolder), "--base", lspec.model.name, "-o", str(tmp_path / "lora")],
                      catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "lora" / "merge_report.json").read_text())["nonzeros_added"] > 1000
    base, sp, lo = sparsity_of(sparse_base), sparsity_of(tmp_path / "sp"), sparsity_of(tmp_path / "lora")
    assert sp["total"]["zeros"] >= base["total"]["zeros"] - 64  # only the new seq-cls head differs
    assert lo["total"]["zeros"] < sp["total"]["zeros"]
    r = runner.invoke(app, ["check-sparsity", str(tmp_path / "sp")], catch_exceptions=False)
    assert r.exit_code == 0 and f"{sp['total']['sparsity']:.4f}" in r.output


def test_unmergeable_adapters_are_refused():
    from workers.errors import AdapterIntegrityError
    from workers.merge import check_mergeable

    with pytest.raises(AdapterIntegrityError, match="alora adapter cannot be merged"):
        check_mergeable({"method": "alora"})
    with pytest.raises(AdapterIntegrityError, match="samples at inference"):
        check_mergeable({"method": "pvera", "adapter": {"sample_at_inference": True}})
    check_mergeable({"method": "pvera", "adapter": {"sample_at_inference": False}})
