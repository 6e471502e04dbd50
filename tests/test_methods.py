"""The common test of every registered method (the list comes from the registry), trained first:
fresh adapters prove nothing. Trainable parameters against the method's formula, falling loss,
an exact save -> load round trip, merged == unmerged where the method declares it mergeable, its
pre-checks, and per-row outputs of a shared forward where it declares `shares_forward`."""

import math

import pytest
import torch

from workers.errors import AdapterIntegrityError, SpecError, WrongTaskError
from workers.methods import get_method, load, methods
from workers.models import load_model, load_tokenizer, meta_model

from helpers import HEAD, METHOD_CASES, SPARTA_POOL, mean

METHODS = sorted(methods())


def test_every_registered_method_has_a_test_case():
    assert set(METHOD_CASES) == set(METHODS), "add the new method's case to tests/helpers.py METHOD_CASES"


@pytest.fixture(scope="module", params=METHODS)
def trained(request, trained_adapters):
    return trained_adapters(request.param)


def _logits(model, tok, texts, **kwargs):
    enc = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        return model(**enc, **kwargs).logits


def _loaded(trained, name="default"):
    spec = trained["spec"]
    tok = load_tokenizer(spec.model)
    return tok, load(load_model(spec.model, tok), trained["folder"], spec.adapter.method, adapter_name=name).eval()


def test_trainable_parameters_match_the_formula(trained):
    metrics = trained["out"].metrics
    want = trained["case"]["trainable"]
    if want is not None:
        assert metrics["trainable_params"] == want
        return
    target = (1 - 0.9) * metrics["total_params"]  # SpaRTA: the head counts in its budget
    p = (target - HEAD) / SPARTA_POOL
    assert 0 < p < 1
    assert abs(metrics["trainable_params"] - target) < 4 * math.sqrt(SPARTA_POOL * p * (1 - p))


def test_training_lowers_the_loss(trained):
    losses = [h["loss"] for h in trained["out"].history]
    assert mean(losses[-6:]) < mean(losses[:6]) - 0.05, losses


def test_round_trip_is_exact_and_the_adapter_changes_outputs(trained, tmp_path):
    spec = trained["spec"]
    method = get_method(spec.adapter.method)
    tok, model = _loaded(trained)
    texts = trained["texts"]
    adapted = _logits(model, tok, texts)
    base = _logits(load_model(spec.model, tok).eval(), tok, texts)
    assert (adapted - base).abs().max() > 1e-3, "the trained adapter should change the outputs"
    method.save(model, tmp_path / "again", spec.adapter)
    reloaded = load(load_model(spec.model, tok), tmp_path / "again", spec.adapter.method).eval()
    assert torch.equal(_logits(reloaded, tok, texts), adapted)


def test_merge_where_declared(trained):
    from workers.artifact import verify
    from workers.merge import check_mergeable

    spec = trained["spec"]
    method = get_method(spec.adapter.method)
    manifest = verify(trained["folder"])
    if not method.mergeable(spec.adapter):
        with pytest.raises(AdapterIntegrityError, match="cannot be merged"):
            check_mergeable(manifest)
        return
    check_mergeable(manifest)
    tok, model = _loaded(trained)
    unmerged = _logits(model, tok, trained["texts"])
    merged = model.merge_and_unload().eval()
    assert torch.allclose(_logits(merged, tok, trained["texts"]), unmerged, atol=1e-5)


def test_prechecks(trained):
    """The spec passes the method's shape checks on a weightless model; a task it does not declare
    is refused by name."""
    spec = trained["spec"]
    method = get_method(spec.adapter.method)
    method.precheck(meta_model(spec.model), spec.adapter, spec.model.task)
    for task in ("seq-cls", "causal-lm"):
        if task in method.tasks:
            method.check_task(spec.adapter, task)
        else:
            with pytest.raises(SpecError, match=f"adapter.method {method.name} needs model.task"):
                method.check_task(spec.adapter, task)


def test_monte_carlo_only_where_declared(trained):
    from workers.artifact import verify
    from workers.inference import Engine

    method = get_method(trained["spec"].adapter.method)
    if method.monte_carlo:
        pytest.skip(f"{method.name} gives Monte-Carlo outputs: tested in its own module")
    manifest = verify(trained["folder"])
    engine = Engine(manifest["model"])
    engine.add_adapter("a", trained["folder"], manifest)
    with pytest.raises(WrongTaskError, match="no Monte-Carlo outputs"):
        if trained["spec"].model.task == "seq-cls":
            engine.classify("a", trained["texts"], samples=8)
        else:
            engine.complete("a", trained["texts"][0], samples=8)


def test_adapters_sharing_one_forward_give_each_rows_own_outputs(trained):
    """Where a method declares `shares_forward`, a batch mixing two different adapters (the trained one
    and a copy with every adapter weight scaled by -1.5) gives each row exactly what its adapter
    gives alone."""
    spec = trained["spec"]
    method = get_method(spec.adapter.method)
    if not method.shares_forward:
        pytest.skip(f"{method.name} declares shares_forward: False (one adapter per forward)")
    tok, model = _loaded(trained, name="a")
    method.add(model, trained["folder"], "b")
    with torch.no_grad():
        changed = 0
        for name, p in model.named_parameters():
            if ".b." in name or name.endswith(".b"):
                p.mul_(-1.5)
                changed += 1
    assert changed > 0
    texts = trained["texts"]
    model.set_adapter("a")
    alone_a = _logits(model, tok, texts)
    model.set_adapter("b")
    alone_b = _logits(model, tok, texts)
    assert (alone_a - alone_b).abs().max() > 1e-3, "the two adapters should differ"
    names = ["a", "b"] * (len(texts) // 2)
    mixed = _logits(model, tok, texts, adapter_names=names)
    for i, n in enumerate(names):
        assert torch.allclose(mixed[i], (alone_a if n == "a" else alone_b)[i], atol=1e-5), (i, n)
