"""PVeRA's Monte-Carlo outputs (trained adapter first): means and 95 % intervals over sampled
forwards in the library, the evaluation report and the inference engine a replica runs."""

import pytest
import torch

from workers.methods import get_method, load
from workers.methods.base import AdapterMethod
from workers.methods.pvera import sampling
from workers.models import load_model, load_tokenizer

from helpers import METHOD_TEXTS as TEXTS
from helpers import adapter_spec, need_shared

PVERA: AdapterMethod = get_method("pvera")


@pytest.fixture(scope="module")
def pvera(trained_adapters):
    return trained_adapters("pvera")


def test_pvera_monte_carlo_mean_and_interval(pvera):
    from workers.montecarlo import mc_outputs

    trained = pvera
    spec = trained["spec"]
    tok = load_tokenizer(spec.model)
    model = load(load_model(spec.model, tok), trained["folder"], "pvera").eval()
    batch = dict(tok(TEXTS, padding=True, return_tensors="pt"))
    with torch.no_grad():
        mean_only = torch.softmax(model(**batch).logits, -1)
    a = mc_outputs(model, batch, samples=64, seed=3, task="seq-cls", method=PVERA)
    b = mc_outputs(model, batch, samples=64, seed=3, task="seq-cls", method=PVERA)
    assert torch.equal(a["mean"], b["mean"])  # seeded
    assert (a["std"] > 0).all() and (a["low"] < a["mean"]).all() and (a["mean"] < a["high"]).all()
    assert torch.allclose(a["mean"].sum(-1), torch.ones(len(TEXTS)), atol=1e-5)
    # reference: the same draws written out here, z = mu + eps*sigma through PEFT's layers, averaged
    torch.manual_seed(3)
    with torch.no_grad(), sampling(model):
        ref = torch.stack([torch.softmax(model(**batch).logits, -1) for _ in range(64)]).mean(0)
    assert torch.allclose(a["mean"], ref, atol=1e-6)
    # sampling is switched off again afterwards: outputs are the mean-only ones
    with torch.no_grad():
        assert torch.equal(torch.softmax(model(**batch).logits, -1), mean_only)
    # the Monte-Carlo mean lands near the mean-only output, not on it
    assert (a["mean"] - mean_only).abs().max() < 0.2


def test_pvera_samples_in_evaluation_and_serving(pvera):
    """`adapter.samples: N` adds Monte-Carlo means and intervals to the evaluation report, and the
    engine a replica runs returns them per input."""
    from workers.artifact import verify
    from workers.inference import Engine, WrongTaskError
    from workers.montecarlo import mc_outputs
    from workers.stages import evaluate_artifact

    trained = pvera
    spec = trained["spec"]
    manifest = verify(trained["folder"])
    engine = Engine(manifest["model"])
    engine.add_adapter("a", trained["folder"], manifest)
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
    ref = mc_outputs(engine.model, enc, 32, 5, "seq-cls", PVERA, adapter_name="a")
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

    from workers.data import collate
    from workers.methods import attach
    from workers.montecarlo import mc_report

    path = need_shared("models", "stories260K")
    tok = AutoTokenizer.from_pretrained(path)
    tok.pad_token = tok.unk_token
    torch.manual_seed(0)
    model = attach(AutoModelForCausalLM.from_pretrained(path), adapter_spec({"method": "pvera", "r": 16}), "causal-lm")
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
    rep = mc_report(model, tok, ex, "causal-lm", samples=8, seed=7, method=PVERA)
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
