"""Every registered method, trained first and then checked (fresh adapters prove nothing):
trainable-parameter count against the method's formula, merged == unmerged outputs, save -> load
round trip, loss goes down."""

import pytest
import torch

from pipelines.train import build_artifact, launch_training
from test_train_local import mean, spec_for
from workers.methods import load
from workers.models import load_model, load_tokenizer

# the tiny Llama of helpers.make_tiny_llama: hidden 32, intermediate 64, 4 heads, 2 KV heads (head dim 8)
HIDDEN, INTER, KV = 32, 64, 16
LAYERS, LABELS = 2, 2
SHAPES = {"q_proj": (HIDDEN, HIDDEN), "k_proj": (HIDDEN, KV), "v_proj": (HIDDEN, KV), "o_proj": (HIDDEN, HIDDEN),
          "down_proj": (INTER, HIDDEN)}  # (in, out)
HEAD = HIDDEN * LABELS  # LlamaForSequenceClassification.score has no bias

METHODS = {
    "lora": ({"method": "lora", "r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"]},
             lambda: LAYERS * sum(4 * (SHAPES[m][0] + SHAPES[m][1]) for m in ("q_proj", "v_proj", "down_proj"))),
    "ia3": ({"method": "ia3", "target_modules": ["k_proj", "v_proj", "down_proj"], "feedforward_modules": ["down_proj"]},
            lambda: LAYERS * (SHAPES["k_proj"][1] + SHAPES["v_proj"][1] + SHAPES["down_proj"][0])),
    "sparsepeft": ({"method": "sparsepeft", "r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"]},
                   lambda: LAYERS * sum(4 * (SHAPES[m][0] + SHAPES[m][1]) for m in ("q_proj", "v_proj", "down_proj"))),
    "pvera": ({"method": "pvera", "r": 8, "target_modules": ["q_proj", "v_proj"]},
              lambda: LAYERS * sum(2 * 8 + SHAPES[m][1] for m in ("q_proj", "v_proj"))),
    # SpaRTA draws each weight of v/o (the non-frozen pool) with p = ((1-s)·N - head) / pool
    "sparta": ({"method": "sparta", "sparsity": 0.9, "seed": 5}, None),
}
SPARTA_POOL = LAYERS * sum(SHAPES[m][0] * SHAPES[m][1] for m in ("v_proj", "o_proj"))


@pytest.fixture(scope="module", params=sorted(METHODS))
def trained(request, tiny_llama, toy_data, tmp_path_factory, ray_session):
    name = request.param
    adapter, formula = METHODS[name]
    tmp = tmp_path_factory.mktemp(name)
    spec = spec_for(tiny_llama, toy_data, tmp, epochs=2, lr=3e-2)
    spec = spec.model_copy(update={"adapter": _spec_of(adapter)})
    out = launch_training(spec, run_name=f"method-{name}")
    folder = build_artifact(spec, out.checkpoint, tmp / "adapter")
    return {"name": name, "spec": spec, "out": out, "folder": folder, "formula": formula}


def _spec_of(adapter: dict):
    from workers.methods import REGISTRY

    return REGISTRY[adapter["method"]][0].model_validate(adapter)


def _logits(model, tok, texts):
    enc = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        return model(**enc).logits


TEXTS = ["good great lovely movie", "bad awful dull plot", "the cast was fun and warm", "a cold grim story"]


def test_trainable_parameters_match_the_formula(trained):
    metrics = trained["out"].metrics
    if trained["name"] != "sparta":
        assert metrics["trainable_params"] == trained["formula"]() + HEAD
        return
    import math

    target = (1 - 0.9) * metrics["total_params"]  # the head counts in SpaRTA's budget
    p = (target - HEAD) / SPARTA_POOL
    assert 0 < p < 1
    assert abs(metrics["trainable_params"] - target) < 4 * math.sqrt(SPARTA_POOL * p * (1 - p))


def test_training_lowers_the_loss(trained):
    losses = [h["loss"] for h in trained["out"].history]
    assert mean(losses[-6:]) < mean(losses[:6]) - 0.05, losses


def test_merged_equals_unmerged_and_round_trip_is_exact(trained, tmp_path):
    spec = trained["spec"]
    tok = load_tokenizer(spec.model)
    peft_model = load(load_model(spec.model, tok), trained["folder"], spec.adapter.method).eval()
    unmerged = _logits(peft_model, tok, TEXTS)
    base = _logits(load_model(spec.model, tok).eval(), tok, TEXTS)
    assert (unmerged - base).abs().max() > 1e-3, "the trained adapter should change the outputs"

    peft_model.save_pretrained(str(tmp_path / "again"), safe_serialization=True)
    reloaded = load(load_model(spec.model, tok), tmp_path / "again", spec.adapter.method).eval()
    assert torch.equal(_logits(reloaded, tok, TEXTS), unmerged)

    merged = peft_model.merge_and_unload().eval()
    assert torch.allclose(_logits(merged, tok, TEXTS), unmerged, atol=1e-5)


def test_pvera_monte_carlo_mean_and_interval(trained):
    from workers.montecarlo import mc_outputs

    if trained["name"] != "pvera":
        pytest.skip("Monte-Carlo outputs are a PVeRA feature")
    spec = trained["spec"]
    tok = load_tokenizer(spec.model)
    model = load(load_model(spec.model, tok), trained["folder"], "pvera").eval()
    batch = dict(tok(TEXTS, padding=True, return_tensors="pt"))
    with torch.no_grad():
        mean_only = torch.softmax(model(**batch).logits, -1)
    a = mc_outputs(model, batch, samples=64, seed=3, task="seq-cls")
    b = mc_outputs(model, batch, samples=64, seed=3, task="seq-cls")
    assert torch.equal(a["mean"], b["mean"])  # seeded
    assert (a["std"] > 0).all() and (a["low"] < a["mean"]).all() and (a["mean"] < a["high"]).all()
    assert torch.allclose(a["mean"].sum(-1), torch.ones(len(TEXTS)), atol=1e-5)
    # reference: the same draws written out here, z = mu + eps*sigma through PEFT's layers, averaged
    torch.manual_seed(3)
    from workers.montecarlo import sampling

    with torch.no_grad(), sampling(model):
        ref = torch.stack([torch.softmax(model(**batch).logits, -1) for _ in range(64)]).mean(0)
    assert torch.allclose(a["mean"], ref, atol=1e-6)
    # sampling is switched off again afterwards: outputs are the mean-only ones
    with torch.no_grad():
        assert torch.equal(torch.softmax(model(**batch).logits, -1), mean_only)
    # the Monte-Carlo mean lands near the mean-only output, not on it
    assert (a["mean"] - mean_only).abs().max() < 0.2


def test_pvera_samples_in_evaluation_and_serving(trained):
    """`adapter.samples: N` adds Monte-Carlo means and intervals to the evaluation report, and the
    engine a replica runs returns them per input; other methods refuse samples."""
    from pipelines.train import evaluate_artifact
    from workers.artifact import verify
    from workers.inference import Engine, WrongTaskError
    from workers.montecarlo import mc_outputs

    spec = trained["spec"]
    manifest = verify(trained["folder"])
    engine = Engine(manifest["model"])
    engine.add_adapter("a", trained["folder"], manifest)
    if trained["name"] != "pvera":
        with pytest.raises(WrongTaskError, match="need a PVeRA adapter"):
            engine.classify("a", TEXTS, samples=8)
        return
    with_mc = spec.model_copy(update={"adapter": spec.adapter.model_copy(update={"samples": 16})})
    report = evaluate_artifact(with_mc, trained["folder"])
    mc = report["monte_carlo"]
    assert mc["samples"] == 16 and len(mc["per_example"]) == report["n"] == 64
    for ex in mc["per_example"]:
        assert sum(ex["mean"]) == pytest.approx(1.0, abs=1e-5)
        assert all(lo <= m <= hi for lo, m, hi in zip(ex["low"], ex["mean"], ex["high"]))
    # the report's accuracy is the argmax of the Monte-Carlo means against the labels
    from workers.data import load_train_eval

    _, evals = load_train_eval(spec.data, spec.train.seed)
    labels = [int(r["label"]) for r in evals]
    picked = [max(range(2), key=ex["mean"].__getitem__) for ex in mc["per_example"]]
    assert mc["accuracy"] == pytest.approx(sum(p == y for p, y in zip(picked, labels)) / 64)
    assert 0 < mc["mean_interval_width"] < 0.5

    out = engine.classify("a", TEXTS, samples=32, seed=5)
    again = engine.classify("a", TEXTS, samples=32, seed=5)
    assert out == again  # seeded
    enc = dict(engine.tokenizer(TEXTS, padding=True, truncation=True, max_length=manifest["max_length"],
                                return_tensors="pt"))
    ref = mc_outputs(engine.model, enc, 32, 5, "seq-cls", adapter_name="a")
    for j, item in enumerate(out):
        m = item["monte_carlo"]
        assert m["samples"] == 32
        assert [m["mean"][k] for k in ("negative", "positive")] == pytest.approx(ref["mean"][j].tolist(), abs=1e-6)
        assert all(m["low"][k] <= m["mean"][k] <= m["high"][k] for k in m["mean"])
    assert "monte_carlo" not in engine.classify("a", TEXTS)[0]  # the manifest's samples: 0
    with pytest.raises(WrongTaskError, match="at least 2"):
        engine.classify("a", TEXTS, samples=1)
    # PEFT holds one adapter type per model: a LoRA adapter is refused on this PVeRA replica, clearly
    from workers.errors import AdapterIntegrityError

    with pytest.raises(AdapterIntegrityError, match="cannot share a replica"):
        engine.add_adapter("l", trained["folder"], {**manifest, "method": "lora"})


def test_pvera_samples_on_a_causal_lm(tmp_path):
    """Per-token log-probabilities of the targets: the Monte-Carlo mean equals the average over the
    same seeded draws written out here; the interval holds it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from helpers import need_shared
    from workers.data import collate
    from workers.methods import attach
    from workers.montecarlo import mc_report, sampling

    path = need_shared("models", "stories260K")
    tok = AutoTokenizer.from_pretrained(path)
    tok.pad_token = tok.unk_token
    torch.manual_seed(0)
    model = attach(AutoModelForCausalLM.from_pretrained(path), _spec_of({"method": "pvera", "r": 16}), "causal-lm")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-2)
    enc = tok(["once upon a time there was a cat", "lily saw a big dog"], return_tensors="pt", padding=True)
    for _ in range(5):
        out = model(**enc, labels=enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100))
        out.loss.backward()
        opt.step()
        opt.zero_grad()
    from workers.data import Example

    ids = enc["input_ids"][0].tolist()
    ex = [Example(input_ids=ids, labels=[-100] * 3 + ids[3:])]  # the first three tokens are the prompt
    rep = mc_report(model, tok, ex, "causal-lm", samples=8, seed=7)
    got = rep["per_example"][0]
    assert len(got["mean"]) == len(ids) - 3
    batch = collate(ex, tok.pad_token_id)
    batch.pop("labels")
    torch.manual_seed(7)
    draws = []
    with torch.no_grad(), sampling(model):
        for _ in range(8):
            logp = torch.log_softmax(model(**batch).logits.float(), -1)[0, :-1]
            draws.append(logp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])][2:])
    assert got["mean"] == pytest.approx(torch.stack(draws).mean(0).tolist(), abs=1e-5)
    assert all(lo <= m <= hi for lo, m, hi in zip(got["low"], got["mean"], got["high"]))
    assert rep["eval_loss"] == pytest.approx(-sum(got["mean"]) / len(got["mean"]), rel=1e-6)
