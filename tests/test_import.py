"""`adapterflow import`: adapters trained and saved with stock PEFT directly (none of our code), imported
for their base, are served with PEFT's own outputs (the replica's `build_engine`, logits to 1e-5);
what the folder does not say is asked for by name; an adapter for another base is refused."""

import json

import pytest
import torch
from typer.testing import CliRunner

from workers.artifact import verify
from workers.errors import AdapterIntegrityError, SpecError
from workers.importer import import_adapter

from helpers import METHOD_TEXTS, need_peft_sparta, need_shared

PROMPTS = ["say the word good ###", "say the word bad ###"]


def peft_trained(base_path, config, task, folder, steps=6):
    """A PEFT adapter trained a few steps with a plain torch loop and saved by PEFT itself."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(base_path)
    if task == "seq-cls":
        model = AutoModelForSequenceClassification.from_pretrained(base_path, num_labels=2)
        enc = tok(METHOD_TEXTS, padding=True, return_tensors="pt")
        labels = torch.tensor([1, 0, 1, 0])
    else:
        model = AutoModelForCausalLM.from_pretrained(base_path)
        enc = tok(PROMPTS, padding=True, return_tensors="pt")
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    model = get_peft_model(model, config)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    model.train()
    for _ in range(steps):
        model(**enc, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(str(folder))
    return model.eval(), tok


def _logits(model, tok, texts):
    enc = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        return model(**enc).logits


CASES = {
    "lora": ("seq-cls", lambda: __import__("peft").LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8,
                                                              target_modules=["q_proj", "v_proj"])),
    "ia3": ("causal-lm", lambda: __import__("peft").IA3Config(task_type="CAUSAL_LM", target_modules=["k_proj", "down_proj"],
                                                              feedforward_modules=["down_proj"])),
    "pvera": ("seq-cls", lambda: __import__("peft").PveraConfig(task_type="SEQ_CLS", r=8,
                                                                target_modules=["q_proj", "v_proj"])),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_stock_peft_adapters_serve_with_peft_outputs(name, tiny_llama, tmp_path):
    from serve.deploy import build_engine

    task, config = CASES[name]
    reference, tok = peft_trained(tiny_llama, config(), task, tmp_path / "peft")
    folder, manifest = import_adapter(tmp_path / "peft", {"name": str(tiny_llama)})
    assert folder == tmp_path / "peft" and manifest["method"] == name and manifest["task"] == task
    assert verify(folder)["base_model"]["sha256"]  # every file checksummed, the base's digest recorded
    engine = build_engine({"a": str(folder)}, {"name": str(tiny_llama)})
    texts = METHOD_TEXTS if task == "seq-cls" else PROMPTS
    want = _logits(reference, tok, texts)
    engine.model.set_adapter("a")
    got = _logits(engine.model, engine.tokenizer, texts)
    assert torch.allclose(got, want, atol=1e-5)
    if task == "seq-cls":
        assert manifest["model"]["num_labels"] == 2  # counted from the adapter's head
        probs = [r["probabilities"]["LABEL_1"] for r in engine.classify("a", texts)]
        assert probs == pytest.approx(torch.softmax(want, -1)[:, 1].tolist(), abs=1e-5)
    else:
        enc = tok(PROMPTS[0], return_tensors="pt")
        ids = reference.generate(**enc, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
        text = tok.decode(ids[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        assert engine.complete("a", PROMPTS[0], max_tokens=6)["text"] == text


def test_stock_alora_keeps_its_invocation(tiny_llama, tmp_path):
    from peft import LoraConfig

    from serve.deploy import build_engine

    probe = __import__("transformers").AutoTokenizer.from_pretrained(tiny_llama)
    ids = probe.encode("###", add_special_tokens=False)
    config = LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                        alora_invocation_tokens=ids)
    reference, tok = peft_trained(tiny_llama, config, "causal-lm", tmp_path / "peft")
    folder, manifest = import_adapter(tmp_path / "peft", {"name": str(tiny_llama)})
    assert manifest["method"] == "alora" and manifest["adapter"]["invocation_string"] == "###"
    assert manifest["model"]["prompt_format"].endswith("###")  # every served prompt carries the invocation
    engine = build_engine({"a": str(folder)}, {"name": str(tiny_llama)})
    engine.model.set_adapter("a")
    assert torch.allclose(_logits(engine.model, engine.tokenizer, PROMPTS), _logits(reference, tok, PROMPTS), atol=1e-5)


def test_what_the_folder_does_not_say_is_asked_for(tiny_llama, tmp_path):
    from peft import PveraConfig

    peft_trained(tiny_llama, PveraConfig(r=8, target_modules=["q_proj"]), "causal-lm", tmp_path / "peft", steps=1)
    with pytest.raises(SpecError, match="does not say its task; give --task"):
        import_adapter(tmp_path / "peft", {"name": str(tiny_llama)})
    _, manifest = import_adapter(tmp_path / "peft", {"name": str(tiny_llama)}, task="causal-lm",
                                 output=tmp_path / "out")
    assert manifest["task"] == "causal-lm" and not (tmp_path / "peft" / "adapterflow.json").exists()


def test_an_adapter_for_another_base_is_refused(tiny_llama, tmp_path):
    from peft import LoraConfig

    stories = need_shared("models", "stories260K")
    config = LoraConfig(task_type="CAUSAL_LM", r=4, target_modules=["q_proj", "v_proj"])
    peft_trained(tiny_llama, config, "causal-lm", tmp_path / "peft", steps=1)
    with pytest.raises(AdapterIntegrityError, match="does not fit base|another model"):
        import_adapter(tmp_path / "peft", {"name": str(stories)})
    assert not (tmp_path / "peft" / "adapterflow.json").exists()


def test_pickles_and_adapterflow_folders_are_refused(trained_adapters, tiny_llama, tmp_path):
    with pytest.raises(AdapterIntegrityError, match="already an adapterflow adapter"):
        import_adapter(trained_adapters("lora")["folder"], {"name": str(tiny_llama)})
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "task_type": "SEQ_CLS"}))
    (tmp_path / "bin" / "adapter_model.bin").write_bytes(b"\x80\x04N.")
    with pytest.raises(AdapterIntegrityError, match="adapter_model.bin would be unpickled"):
        import_adapter(tmp_path / "bin", {"name": str(tiny_llama)})


def test_the_import_command(tiny_llama, tmp_path):
    from peft import LoraConfig

    from pipelines.cli import app

    config = LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["q_proj", "v_proj"])
    peft_trained(tiny_llama, config, "seq-cls", tmp_path / "peft", steps=1)
    r = CliRunner().invoke(app, ["import", str(tmp_path / "peft"), "--base", str(tiny_llama), "--set",
                                 "model.id2label={0: negative, 1: positive}"])
    assert r.exit_code == 0, r.stderr
    assert "imported lora adapter (seq-cls)" in r.stdout
    assert verify(tmp_path / "peft")["model"]["id2label"] == {"0": "negative", "1": "positive"}
    r = CliRunner().invoke(app, ["import", str(tmp_path / "peft"), "--base", str(tiny_llama)])
    assert r.exit_code == 2 and "already an adapterflow adapter" in r.stderr


STORY_TEXTS = ["once upon a time there was a cat", "lily saw a big dog", "the sun was warm", "tom had a red ball"]


@pytest.mark.parametrize("task", ["causal-lm", "seq-cls"])
def test_peft_sparta_folders_import_and_serve_their_outputs(task, tmp_path):
    """A SpaRTA adapter trained and saved by peft-sparta itself; its trainer's `head_init.pt` (a pickle)
    is converted to safetensors in the imported copy (read with torch's weights-only loader)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    from serve.deploy import build_engine

    ps = need_peft_sparta()
    path = need_shared("models", "stories260K")
    tok = AutoTokenizer.from_pretrained(path)
    tok.pad_token = tok.eos_token
    if task == "seq-cls":
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
        model.config.pad_token_id = tok.pad_token_id
    else:
        model = AutoModelForCausalLM.from_pretrained(path)
    torch.manual_seed(2)
    theirs = ps.SpaRTA(model, sparsity=0.97)
    init_head = model.score.weight.detach().clone() if task == "seq-cls" else None
    enc = tok(STORY_TEXTS, return_tensors="pt", padding=True)
    labels = (torch.tensor([0, 1, 0, 1]) if task == "seq-cls"
              else enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100))
    opt = torch.optim.AdamW([p for p in theirs.parameters() if p.requires_grad], lr=3e-3)
    theirs.train()
    for _ in range(8):
        theirs(**enc, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad()
    theirs.eval()
    src = tmp_path / "theirs"
    src.mkdir()
    theirs.save(str(src), merged=False)
    if task == "seq-cls":  # what peft-sparta's trainer writes beside the deltas (a torch.save file)
        torch.save(init_head, src / "head_init.pt")
        with pytest.raises(AdapterIntegrityError, match="head_init.pt would be unpickled"):
            import_adapter(src, {"name": str(path)})
    # a causal folder says no task (a classifier's config has problem_type, set when it trained)
    given = None if task == "seq-cls" else "causal-lm"
    base = {"name": str(path)}
    if task == "seq-cls":  # nor its classes (default labels are not saved): asked for by name
        with pytest.raises(SpecError, match="count the classes; give them: --set model.num_labels"):
            import_adapter(src, base, output=tmp_path / "ours")
        assert not (tmp_path / "ours").exists()
        base["num_labels"] = 2
    folder, manifest = import_adapter(src, base, task=given, output=tmp_path / "ours")
    assert manifest["method"] == "sparta" and manifest["task"] == task
    assert not [p for p in folder.iterdir() if p.suffix == ".pt"]
    verify(folder)  # checksums, and no pickle left
    engine = build_engine({"a": str(folder)}, {"name": str(path)})
    engine.model.set_adapter("a")
    for text in STORY_TEXTS:
        one = tok(text, return_tensors="pt")
        with torch.no_grad():
            want = theirs(**one).logits.float()
            got = engine.model(**one).logits.float()
        assert torch.allclose(got, want, atol=1e-5), text


def test_import_register_pins_the_adapter_in_the_registry(tiny_llama, tmp_path):
    """`import --register --alias`: a new registry version with its manifest and base pinned; the
    registry reference resolves to the same adapter, and the base a server builds is the one given."""
    import mlflow
    from peft import LoraConfig

    from pipelines.cli import app
    from serve.deploy import build_engine, operator_base
    from workers.store import resolve

    config = LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["q_proj", "v_proj"])
    peft_trained(tiny_llama, config, "seq-cls", tmp_path / "peft", steps=1)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = ["import", str(tmp_path / "peft"), "--base", str(tiny_llama), "--set",
            "model.id2label={0: negative, 1: positive}", "--register", "--name", "stock-lora", "--alias", "champion",
            "--tracking-uri", uri]
    try:
        r = CliRunner().invoke(app, args)
        assert r.exit_code == 0, r.stderr
        assert "registered models:/stock-lora/1" in r.stdout
        folder, manifest = resolve("models:/stock-lora@champion", tracking_uri=uri)
        assert manifest == verify(tmp_path / "peft") and manifest["method"] == "lora"
        base = operator_base({"x": "models:/stock-lora@champion"}, uri)
        assert base["name"] == str(tiny_llama)
        texts = ["good great lovely movie", "a cold grim story"]
        served = build_engine({"x": "models:/stock-lora@champion"}, base, uri).classify("x", texts)
        local = build_engine({"x": str(tmp_path / "peft")}, {"name": str(tiny_llama)}).classify("x", texts)
        for s, w in zip(served, local):
            assert s["probabilities"] == pytest.approx(w["probabilities"], abs=1e-6)
        r = CliRunner().invoke(app, ["import", str(tmp_path / "x"), "--base", str(tiny_llama), "--alias", "a"])
        assert r.exit_code == 2 and "--alias needs --register" in r.stderr
    finally:
        mlflow.set_tracking_uri(None)


def test_saved_embeddings_must_fit_the_vocabulary(tiny_llama, tmp_path):
    """A stock-PEFT LoRA trained with two added tokens (its embedding saved in full): without its
    tokenizer beside it, the import says why it cannot fit; with the tokenizer, it imports."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    tok.add_tokens(["<tool>", "</tool>"])
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    model.resize_token_embeddings(len(tok))
    config = LoraConfig(task_type="CAUSAL_LM", r=4, target_modules=["q_proj", "v_proj"],
                        modules_to_save=["embed_tokens"])
    get_peft_model(model, config).save_pretrained(str(tmp_path / "added"))
    with pytest.raises(AdapterIntegrityError, match="rows but the base's vocabulary has"):
        import_adapter(tmp_path / "added", {"name": str(tiny_llama)}, task="causal-lm")
    assert not (tmp_path / "added" / "adapterflow.json").exists()
    tok.save_pretrained(str(tmp_path / "added"))
    folder, manifest = import_adapter(tmp_path / "added", {"name": str(tiny_llama)}, task="causal-lm")
    assert manifest["method"] == "lora" and (folder / "adapterflow.json").is_file()
