"""aLoRA on stories260K: before the invocation the logits are the base model's (so its KV cache can
be reused); from the invocation on, the trained adapter changes them."""

import pytest
import torch

from pipelines.spec import parse_spec
from workers.errors import SpecError
from workers.methods import load
from workers.models import load_model, load_tokenizer
from workers.stages import build_artifact, launch_training

from helpers import need_shared

INVOCATION = " Answer:"


def alora_spec(model, data, tmp, **adapter):
    return parse_spec({
        "name": "alora-test", "workspace": str(tmp / "ws"),
        "model": {"name": str(model), "task": "causal-lm", "prompt_format": "Question: {prompt}."},
        "data": {"path": str(data), "max_length": 48, "input_template": "{instruction}",
                 "target_template": " {output}"},
        "adapter": {"method": "alora", "invocation_string": INVOCATION, "r": 8, "alpha": 16,
                    "target_modules": ["q_proj", "v_proj"], **adapter},
        "train": {"num_workers": 0, "global_batch_size": 8, "lr": 2e-2, "epochs": 2, "checkpoint_every": 100,
                  "seed": 1},
    })


def test_spec_rules():
    with pytest.raises(SpecError, match="alora needs model.task: causal-lm"):
        parse_spec({"name": "x", "model": {"name": "m"}, "data": {"path": "p"},
                    "adapter": {"method": "alora", "invocation_string": " go"}})
    with pytest.raises(SpecError, match="adapter.invocation_string: required key is missing"):
        parse_spec({"name": "x", "model": {"name": "m", "task": "causal-lm"}, "data": {"path": "p"},
                    "adapter": {"method": "alora"}})
    s = parse_spec({"name": "x", "model": {"name": "m", "task": "causal-lm"}, "data": {"path": "p"},
                    "adapter": {"method": "alora", "invocation_string": " go"}})
    assert s.model.prompt_format == "{prompt} go"  # every prompt carries the invocation


def test_logits_before_the_invocation_are_the_base_models(toy_instruct, tmp_path, ray_session):
    model_path = need_shared("models", "stories260K")
    spec = alora_spec(model_path, toy_instruct, tmp_path)
    out = launch_training(spec, run_name="alora")
    losses = [h["loss"] for h in out.history]
    assert sum(losses[-4:]) < sum(losses[:4])
    folder = build_artifact(spec, out.checkpoint, tmp_path / "adapter")

    tok = load_tokenizer(spec.model)
    base = load_model(spec.model, tok).eval()
    adapted = load(load_model(spec.model, tok), folder, "alora").eval()
    prompt = spec.model.prompt_format.format(prompt="say the word good")
    ids = tok(prompt + " good good", return_tensors="pt")["input_ids"]
    inv = tok.encode(INVOCATION, add_special_tokens=False)
    seq = ids[0].tolist()
    start = max(i for i in range(len(seq) - len(inv) + 1) if seq[i : i + len(inv)] == inv)
    with torch.no_grad():
        lb = base(input_ids=ids).logits[0]
        la = adapted(input_ids=ids).logits[0]
    assert torch.allclose(la[:start], lb[:start], atol=1e-5)
    assert (la[start:] - lb[start:]).abs().amax(-1).min() > 1e-4  # every position from the invocation on


def test_warns_when_the_invocation_tokenizes_differently_in_context(caplog):
    from workers.methods.alora import ALoraSpec, invocation_tokens

    tok = load_tokenizer(parse_spec({"name": "x", "model": {"name": str(need_shared("models", "stories260K")),
                                                            "task": "causal-lm"}, "data": {"path": "p"},
                                     "adapter": {"method": "lora"}}).model)
    spec = ALoraSpec(invocation_string="swer:")  # merges with the text before it in context
    with caplog.at_level("WARNING"):
        invocation_tokens(tok, spec, "Question: what is the an" + "swer:")
    assert "does not tokenize the same inside a prompt" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        invocation_tokens(tok, ALoraSpec(invocation_string=INVOCATION), "Question: hi." + INVOCATION)
    assert "does not tokenize" not in caplog.text


def test_new_special_token_invocation(toy_instruct, tmp_path, ray_session):
    """An invocation made of a NEW special token: the embeddings grow, only the new row trains
    (PEFT's trainable tokens), the grown tokenizer and the row are saved with the adapter, and the
    adapter loads, evaluates and serves on the unmodified base."""
    from workers.artifact import verify
    from workers.inference import Engine
    from workers.stages import evaluate_artifact

    model_path = need_shared("models", "stories260K")
    spec = alora_spec(model_path, toy_instruct, tmp_path, invocation_string="<|answer|>",
                      new_tokens=["<|answer|>"])
    out = launch_training(spec, run_name="alora-new-token")
    lora = 5 * 8 * ((64 + 64) + (64 + 32))  # r (in + out) for q_proj and v_proj on 5 layers
    assert out.metrics["trainable_params"] == lora + 64  # + one embedding row of width 64
    folder = build_artifact(spec, out.checkpoint, tmp_path / "adapter")
    manifest = verify(folder)
    assert "tokenizer_config.json" in manifest["files"]

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    new_id = tok.convert_tokens_to_ids("<|answer|>")
    assert len(tok) == 513 and new_id == 512
    base_tok = load_tokenizer(spec.model)
    base = load_model(spec.model, base_tok).eval()
    adapted = load(load_model(spec.model, base_tok), folder, "alora").eval()
    emb = adapted.get_base_model().get_input_embeddings()
    merged_rows = emb.get_merged_weights(["default"]) if hasattr(emb, "get_merged_weights") else emb.weight
    old = base.get_input_embeddings().weight
    assert torch.equal(merged_rows[:512], old)  # the old vocabulary is untouched
    mean_init = old.mean(0)
    assert (merged_rows[512] - mean_init).abs().max() > 1e-3  # the new row trained

    prompt = spec.model.prompt_format.format(prompt="say the word good")
    ids = tok(prompt + " good good", return_tensors="pt")["input_ids"]
    seq = ids[0].tolist()
    assert seq.count(new_id) == 1  # one token, not pieces
    start = seq.index(new_id)
    with torch.no_grad():
        lb = base(input_ids=ids[:, :start]).logits[0]
        la = adapted(input_ids=ids).logits[0]
    assert torch.allclose(la[:start, :512], lb, atol=1e-5)  # the prefix is the base model's
    report = evaluate_artifact(spec, folder)
    assert report["eval_loss"] < 6
    engine = Engine(manifest["model"])
    engine.add_adapter("ans", folder, manifest)
    got = engine.complete("ans", "say the word good", max_tokens=4)
    assert got["prompt_tokens"] == len(tok(prompt)["input_ids"])  # the engine used the grown tokenizer
