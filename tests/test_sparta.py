"""SpaRTA: the index draw against its target, trained deltas (merged == training form, unmerge
exact), peft-sparta's file format both ways with the reference package itself, and the seed's
inference API."""

import math

import pytest
import torch

from workers.errors import SpecError
from workers.methods.sparta import SpartaSpec, attach, load
from workers.methods.sparta.layers import draw_indices

from helpers import need_peft_sparta, need_shared

TEXTS = ["once upon a time there was a cat", "the little dog ran home", "lily was sad", "tom saw a big tree"]


def _stories(task="causal-lm", dtype=torch.float32, labels=2):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    path = need_shared("models", "stories260K")
    tok = AutoTokenizer.from_pretrained(path)
    tok.pad_token = tok.eos_token
    if task == "seq-cls":
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=labels, dtype=dtype)
        model.config.pad_token_id = tok.pad_token_id
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    return path, tok, model


def _train(model, tok, task, steps=8, lr=3e-3):
    """A few optimizer steps on a fixed batch: non-trivial deltas."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    enc = tok(TEXTS, return_tensors="pt", padding=True)
    kwargs = {"labels": torch.tensor([0, 1, 0, 1])} if task == "seq-cls" else {
        "labels": enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)}
    losses = []
    model.train()
    for _ in range(steps):
        out = model(**enc, **kwargs)
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(out.loss.item())
    model.eval()
    assert losses[-1] < losses[0], losses
    return enc


def _logits(model, enc):
    with torch.no_grad():
        return model(**{k: v for k, v in enc.items()}).logits.float()


# ---------------------------------------------------------------- the draw
@pytest.mark.parametrize("sparsity", [0.9, 0.95, 0.99])
def test_kept_fraction_matches_the_target_within_sampling_error(sparsity):
    _, _, model = _stories("seq-cls")
    total = sum(p.numel() for p in model.parameters())
    spec = SpartaSpec(sparsity=sparsity)
    draws = draw_indices(model, spec, "seq-cls")
    params = dict(model.named_parameters())
    head = params["score.weight"].numel()
    kept = sum(params[n].numel() if f is None else f.numel() for n, f in draws.items())
    pool = sum(p.numel() for n, p in params.items()
               if n != "score.weight" and not any(k in n for k in spec.frozen_modules))
    p = ((1 - sparsity) * total - head) / pool
    sigma = math.sqrt(pool * p * (1 - p))
    assert abs(kept - (1 - sparsity) * total) < 4 * sigma + 1, (kept, (1 - sparsity) * total, sigma)
    assert draws["score.weight"] is None  # the head: every weight
    assert all(f.numel() == 0 for n, f in draws.items() if n != "score.weight"
               and any(k in n for k in spec.frozen_modules))
    # seeded: the same seed draws the same indices, another seed others
    again = draw_indices(model, spec, "seq-cls")
    other = draw_indices(model, SpartaSpec(sparsity=sparsity, seed=1), "seq-cls")
    name = "model.layers.0.self_attn.v_proj.weight"
    assert torch.equal(draws[name], again[name]) and not torch.equal(draws[name], other[name])


def test_head_is_fully_trainable_whatever_it_is_called():
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=32, num_labels=3)
    model = BertForSequenceClassification(cfg)
    wrapped = attach(model, SpartaSpec(sparsity=0.9, frozen_modules=["embeddings"]), "seq-cls")
    assert set(wrapped.heads) == {"classifier.weight", "classifier.bias"}
    assert wrapped._deltas["classifier.weight"].delta.numel() == 16 * 3
    assert wrapped._deltas["classifier.bias"].delta.numel() == 3
    with pytest.raises(SpecError, match="freeze the classification head"):
        attach(BertForSequenceClassification(cfg), SpartaSpec(sparsity=0.9, frozen_modules=["classifier"]), "seq-cls")


def test_impossible_sparsities_are_clear_errors():
    _, _, model = _stories("seq-cls")
    with pytest.raises(SpecError, match="too low.*freeze fewer"):
        draw_indices(model, SpartaSpec(sparsity=0.5), "seq-cls")  # v/o projections are ~12 % of the model
    with pytest.raises(SpecError, match="too high.*head"):
        draw_indices(model, SpartaSpec(sparsity=0.99999), "seq-cls")
    for bad in (0, 1, 1.5, -0.1):
        with pytest.raises(Exception, match="sparsity"):
            from pipelines.spec import parse_spec

            parse_spec({"name": "x", "model": {"name": "m"}, "data": {"path": "d"},
                        "adapter": {"method": "sparta", "sparsity": bad}})


# ---------------------------------------------------------------- trained adapters
@pytest.mark.parametrize("task", ["causal-lm", "seq-cls"])
def test_merged_equals_training_form_and_unmerge_restores_the_base(task, tmp_path):
    _, tok, model = _stories(task)
    torch.manual_seed(0)
    wrapped = attach(model, SpartaSpec(sparsity=0.97, dropout=0.1), task)
    enc = _train(wrapped, tok, task)
    live = _logits(wrapped, enc)
    wrapped.save_pretrained(tmp_path)

    _, _, fresh = _stories(task)
    before = {n: p.detach().clone() for n, p in fresh.named_parameters()}
    merged = load(fresh, str(tmp_path)).eval()
    assert torch.equal(_logits(merged, enc), live)  # merged in place == parametrized training form
    changed = [n for n, p in fresh.named_parameters() if not torch.equal(p, before[n])]
    assert changed and all("v_proj" in n or "o_proj" in n or n == "score.weight" for n in changed)
    # scatter-add: each chosen weight moved by exactly its delta, nothing else moved
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "sparse_deltas.safetensors"))
    name = "model.layers.2.self_attn.o_proj.weight"
    idx = saved[f"indices.{name}"].long().unbind(1)
    w = dict(fresh.named_parameters())[name].detach()
    assert torch.equal(w[idx], before[name][idx] + saved[f"deltas.{name}"])
    untouched = torch.ones_like(w, dtype=torch.bool)
    untouched[idx] = False
    assert torch.equal(w[untouched], before[name][untouched])

    merged.unmerge()
    for n, p in fresh.named_parameters():
        if n != "score.weight":  # the head is the adapter's own (its random init + deltas)
            assert torch.equal(p, before[n]), n
    merged.set_adapter("default")
    assert torch.equal(_logits(merged, enc), live)


# ---------------------------------------------------------------- peft-sparta interop


@pytest.mark.parametrize("task", ["causal-lm", "seq-cls"])
def test_ours_loads_in_peft_sparta(task, tmp_path):
    ps = need_peft_sparta()
    _, tok, model = _stories(task)
    torch.manual_seed(1)
    wrapped = attach(model, SpartaSpec(sparsity=0.97), task)
    enc = _train(wrapped, tok, task)
    ours = _logits(wrapped, enc)
    wrapped.save_pretrained(tmp_path)

    # peft-sparta merges into a bfloat16 base: ours merged into the same bf16 base is bit-identical
    _, _, bf16 = _stories(task, dtype=torch.bfloat16)
    ours_bf16_model = load(bf16, str(tmp_path)).eval()
    ours_bf16 = dict(ours_bf16_model.base_model.named_parameters())
    if task == "causal-lm":
        theirs = ps.SpaRTAforCausalLM(str(tmp_path))
        for n, p in theirs.base_model.named_parameters():
            assert torch.equal(p, ours_bf16[n]), n
        with torch.no_grad():
            their_logits = theirs(**enc).logits.float()
        assert torch.equal(their_logits, _logits(ours_bf16_model, enc))  # same weights, same dtype
        # bf16 upstream vs float32 here: next-token probabilities within bf16 precision
        mask = enc["attention_mask"].bool()
        p_theirs, p_ours = their_logits.softmax(-1), ours.softmax(-1)
        assert (p_theirs - p_ours)[mask].abs().max() < 0.05
        assert (p_theirs.argmax(-1) == p_ours.argmax(-1))[mask].float().mean() > 0.9
    else:
        theirs = ps.SpaRTAforSequenceClassification(str(tmp_path))
        for n, p in theirs.base_model.named_parameters():
            assert torch.equal(p, ours_bf16["model." + n]), n
        _, _, f32 = _stories(task)
        head = dict(load(f32, str(tmp_path)).base_model.named_parameters())["score.weight"]
        assert torch.equal(theirs.head.weight, head)  # their head is float32: exact
        probs = torch.cat([theirs.classify([t]) for t in TEXTS])  # one at a time: no padding upstream
        assert (probs - ours.softmax(-1)).abs().max() < 0.05
        assert torch.equal(probs.argmax(-1), ours.argmax(-1))


@pytest.mark.parametrize("task", ["causal-lm", "seq-cls"])
def test_peft_sparta_adapter_loads_here(task, tmp_path):
    ps = need_peft_sparta()
    path, tok, model = _stories(task)
    torch.manual_seed(2)
    theirs = ps.SpaRTA(model, sparsity=0.97)
    init_head = model.score.weight.detach().clone() if task == "seq-cls" else None
    enc = _train(theirs, tok, task)
    their_logits = _logits(theirs, enc)  # eval() merged their deltas in float32
    theirs.save(str(tmp_path), merged=False)
    if task == "seq-cls":  # what peft-sparta's trainer writes beside the deltas (a torch.save file)
        torch.save(init_head, tmp_path / "head_init.pt")

    _, _, fresh = _stories(task)
    ours = load(fresh, str(tmp_path)).eval()
    their_params = dict(model.named_parameters())
    for n, p in ours.base_model.named_parameters():
        assert torch.equal(p, their_params[n]), n
    assert torch.allclose(_logits(ours, enc), their_logits, atol=1e-5)


# ---------------------------------------------------------------- the seed's inference API
def test_inference_api_classify_decide_evaluate(tmp_path):
    from sklearn.metrics import balanced_accuracy_score, confusion_matrix, f1_score, matthews_corrcoef

    from workers.sparta import SpaRTAforSequenceClassification

    path, tok, model = _stories("seq-cls")
    model.config.id2label, model.config.label2id = {0: "negative", 1: "positive"}, {"negative": 0, "positive": 1}
    torch.manual_seed(3)
    wrapped = attach(model, SpartaSpec(sparsity=0.97), "seq-cls")
    _train(wrapped, tok, "seq-cls", steps=10)
    wrapped.save_pretrained(tmp_path)

    clf = SpaRTAforSequenceClassification(str(tmp_path), input_template="{sentence}")
    assert clf.id2label == {"0": "negative", "1": "positive"}
    assert repr(clf) == (f"(SpaRTA)ModelForSeqClassification(\n\tadapter = '{tmp_path}'\n\tmodel = '{path}'\n"
                         "\tid2label = {0: 'negative', 1: 'positive'}\n)")
    inputs = [{"sentence": t} for t in TEXTS]
    probs = clf.classify(inputs)
    assert probs.shape == (4, 2) and torch.allclose(probs.sum(-1), torch.ones(4))
    # batched with left padding == one at a time
    single = torch.cat([clf.classify([x]) for x in inputs])
    assert torch.allclose(probs, single, atol=1e-5)
    decided = clf.decide_class(inputs)
    assert decided == [clf.id2label[str(i)] for i in probs.argmax(-1).tolist()]
    labels = [0, 1, 1, 0]
    rep = clf.evaluate(inputs, labels, batch_size=3)
    preds = probs.argmax(-1).tolist()
    assert rep["loss"] == pytest.approx(float(-probs[range(4), labels].log().mean()), rel=1e-5)
    assert rep["accuracy"] == pytest.approx(sum(p == y for p, y in zip(preds, labels)) / 4)
    assert rep["confusion matrix"].tolist() == confusion_matrix(labels, preds, labels=[0, 1]).tolist()
    assert rep["balanced accuracy"] == pytest.approx(balanced_accuracy_score(labels, preds))
    assert rep["MCC"] == pytest.approx(matthews_corrcoef(labels, preds))
    assert rep["F1-score"] == pytest.approx(f1_score(labels, preds, zero_division=0))
    with pytest.raises(SpecError, match="input_template"):
        SpaRTAforSequenceClassification(str(tmp_path)).classify(inputs)


def test_inference_api_causal_lm_generates_like_the_merged_model(tmp_path):
    from workers.sparta import SpaRTAforCausalLM

    path, tok, model = _stories()
    torch.manual_seed(4)
    wrapped = attach(model, SpartaSpec(sparsity=0.97), "causal-lm")
    enc = _train(wrapped, tok, "causal-lm", steps=10, lr=1e-2)
    wrapped.save_pretrained(tmp_path)
    lm = SpaRTAforCausalLM(str(tmp_path))
    assert repr(lm) == f"(SpaRTA)ModelForCausalLM(\n\tadapter = '{tmp_path}'\n\tbase model = '{path}'\n)"
    prompt = tok(["once upon a time"], return_tensors="pt")
    ours = lm.generate(**prompt, max_new_tokens=12, do_sample=False)
    ref = wrapped.merge_and_unload().generate(**prompt, max_new_tokens=12, do_sample=False)
    assert torch.equal(ours, ref)
    _, _, base = _stories()
    plain = base.generate(**prompt, max_new_tokens=12, do_sample=False)
    assert not torch.equal(ours, plain), "ten steps at lr 1e-2 should change greedy text"
    del enc


# ---------------------------------------------------------------- serving: many SpaRTA adapters, one base
def _artifact(tmp_path, name, seed, model_spec):
    from workers.artifact import write_manifest
    from workers.config import ModelSpec
    from workers.models import base_fingerprint, load_model, load_tokenizer

    spec = ModelSpec.model_validate(model_spec)
    tok = load_tokenizer(spec)
    torch.manual_seed(seed)
    wrapped = attach(load_model(spec, tok), SpartaSpec(sparsity=0.97, seed=seed), "seq-cls")
    _train(wrapped, tok, "seq-cls", steps=6)
    folder = tmp_path / name
    wrapped.save_pretrained(folder)
    return folder, write_manifest(folder, method="sparta", model=spec.model_dump(mode="json"),
                                  base_sha256=base_fingerprint(spec), extra={"max_length": 64})


def test_one_replica_switches_between_sparta_adapters(tmp_path):
    from workers.errors import AdapterIntegrityError
    from workers.inference import Engine
    from workers.sparta import SpaRTAforSequenceClassification

    path = need_shared("models", "stories260K")
    model_spec = {"name": str(path), "task": "seq-cls", "id2label": {0: "negative", 1: "positive"}}
    a, man_a = _artifact(tmp_path, "a", 11, model_spec)
    b, man_b = _artifact(tmp_path, "b", 12, model_spec)
    engine = Engine(model_spec)
    pristine = {n: p.detach().clone() for n, p in engine.base.named_parameters()}
    engine.add_adapter("a", a, man_a)
    engine.add_adapter("b", b, man_b)
    refs = {}
    for name, folder in (("a", a), ("b", b)):
        clf = SpaRTAforSequenceClassification(str(folder))
        refs[name] = torch.cat([clf.classify([t]) for t in TEXTS])
    assert (refs["a"] - refs["b"]).abs().max() > 1e-3
    for name in ("a", "b", "a", "b"):  # merge / unmerge back and forth: no drift
        got = torch.tensor([[r["probabilities"]["negative"], r["probabilities"]["positive"]]
                            for r in (engine.classify(name, [t])[0] for t in TEXTS)])
        assert torch.allclose(got, refs[name], atol=1e-6), name
    engine.model.unmerge()
    for n, p in engine.base.named_parameters():
        if n != "score.weight":
            assert torch.equal(p, pristine[n]), n
    lora_manifest = {**man_a, "method": "lora"}
    with pytest.raises(AdapterIntegrityError, match="cannot share a replica"):
        engine.add_adapter("lora", a, lora_manifest)


def test_shape_dependent_adapter_errors_come_before_any_work(tiny_llama, toy_data, tmp_path):
    """check_inputs (the driver, before Ray starts) builds a weightless copy of the model and
    checks SpaRTA's sparsity bounds and the INT4 group size against its shapes."""
    from workers.stages import check_inputs

    from helpers import adapter_spec, spec_for

    spec = spec_for(tiny_llama, toy_data, tmp_path)
    ok = spec.model_copy(update={"adapter": adapter_spec({"method": "sparta", "sparsity": 0.9})})
    check_inputs(ok)
    low = spec.model_copy(update={"adapter": adapter_spec({"method": "sparta", "sparsity": 0.5})})
    with pytest.raises(SpecError, match="sparsity 0.5 is too low"):
        check_inputs(low)
    tokens = spec.model_copy(update={"adapter": adapter_spec(
        {"method": "sparta", "sparsity": 0.9, "trainable_tokens": [10_000]})})
    with pytest.raises(SpecError, match="outside the vocabulary"):
        check_inputs(tokens)
    qa = spec.model_copy(update={"adapter": adapter_spec(
        {"method": "qa-sparsepeft", "group_size": 24})})
    with pytest.raises(SpecError, match="adapter.group_size: .*not a multiple of group_size 24"):
        check_inputs(qa)


def test_new_tokens_train_in_full_and_load_in_peft_sparta(tmp_path):
    """`new_tokens`: the embeddings grow, the new row trains in full from a saved initial value,
    and peft-sparta's classifier (which reads new_embeddings_init and the adapter's tokenizer)
    classifies text holding the new token as we do."""
    ps = need_peft_sparta()
    from transformers import AutoTokenizer

    from workers.sparta import SpaRTAforSequenceClassification

    path, tok, model = _stories("seq-cls")
    torch.manual_seed(5)
    wrapped = attach(model, SpartaSpec(sparsity=0.97, new_tokens=["<|review|>"]), "seq-cls", tokenizer=tok)
    new_id = tok.convert_tokens_to_ids("<|review|>")
    assert new_id == 512 and wrapped._deltas["model.embed_tokens.weight"].delta.numel() == 64  # one full row
    texts = [f"<|review|> {t}" for t in TEXTS]
    params = [p for p in wrapped.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=3e-3)
    enc = tok(texts, return_tensors="pt", padding=True)
    wrapped.train()
    for _ in range(8):
        wrapped(**enc, labels=torch.tensor([0, 1, 0, 1])).loss.backward()
        opt.step()
        opt.zero_grad()
    wrapped.eval()
    assert wrapped._deltas["model.embed_tokens.weight"].delta.abs().sum() > 0  # the new row trained
    wrapped.save_pretrained(tmp_path)
    assert len(AutoTokenizer.from_pretrained(tmp_path)) == 513
    ours = torch.cat([torch.softmax(_logits(wrapped, tok([t], return_tensors="pt")), -1) for t in texts])

    again = SpaRTAforSequenceClassification(str(tmp_path))  # a fresh 512-row base, grown on load
    assert torch.allclose(torch.cat([again.classify([t]) for t in texts]), ours, atol=1e-6)
    # peft-sparta 0.0.3 hands safetensors a torch.device for this file, which safetensors rejects;
    # it reads the same tensor from its torch.save form, so a scratch copy (test only: we never
    # write pickles) carries that one file as .pt
    import shutil

    from safetensors.torch import load_file

    copy = tmp_path.parent / f"{tmp_path.name}-pt"
    shutil.copytree(tmp_path, copy)
    with pytest.raises(Exception, match="device"):
        ps.SpaRTAforSequenceClassification(str(copy))
    rows = load_file(str(copy / "new_embeddings_init.safetensors"))["new_embeddings"]
    (copy / "new_embeddings_init.safetensors").unlink()
    torch.save(rows, copy / "new_embeddings_init.pt")
    theirs = ps.SpaRTAforSequenceClassification(str(copy))
    probs = torch.cat([theirs.classify([t]) for t in texts])
    assert (probs - ours).abs().max() < 0.05 and torch.equal(probs.argmax(-1), ours.argmax(-1))
