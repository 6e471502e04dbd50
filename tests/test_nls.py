"""NLS: an elastic-rank LoRA super-adapter trained through the platform; rank draws per layer group;
the same ranks in a recomputed (checkpointed) forward; sub-adapters that stock PEFT loads with the
outputs of the super-adapter run at the chosen ranks."""

import json
import subprocess
import sys
from collections import Counter

import pytest
import torch

from workers.errors import SpecError
from workers.methods import attach
from workers.methods.nls import ELASTIC_FILE, extract_subadapter, set_ranks
from workers.models import load_model, load_tokenizer
from workers.stages import build_artifact, launch_training

from helpers import adapter_spec, mean, spec_for

SPACE = [4, 3, 2]
TARGETS = ["q_proj", "v_proj", "down_proj"]
TEXTS = ["good great lovely movie", "bad awful dull plot", "the cast was fun and warm", "a cold grim story"]


def nls_spec(**kw):
    return adapter_spec({"method": "nls", "alpha": 8, "search_space": SPACE,
                                              "target_modules": TARGETS, "dropout": 0.0, **kw})


@pytest.fixture(scope="module")
def super_adapter(tiny_llama, toy_data, tmp_path_factory, ray_session):
    tmp = tmp_path_factory.mktemp("nls")
    spec = spec_for(tiny_llama, toy_data, tmp, epochs=2, lr=3e-2)
    spec = spec.model_copy(update={"adapter": nls_spec()})
    out = launch_training(spec, run_name="nls")
    return {"spec": spec, "out": out, "folder": build_artifact(spec, out.checkpoint, tmp / "adapter")}


def test_super_adapter_trains_at_r_max_size(super_adapter):
    losses = [h["loss"] for h in super_adapter["out"].history]
    assert mean(losses[-6:]) < mean(losses[:6]) - 0.05, losses
    per_layer = 4 * ((32 + 32) + (32 + 16) + (64 + 32))  # r_max (in + out) for q, v, down
    assert super_adapter["out"].metrics["trainable_params"] == 2 * per_layer + 64  # + score head
    groups = json.loads((super_adapter["folder"] / ELASTIC_FILE).read_text())
    assert len(groups) == 2 and all(g["search_space"] == SPACE and len(g["target"]) == 3 for g in groups)
    assert all(".layers.0." in t for t in groups[0]["target"]) and all(".layers.1." in t for t in groups[1]["target"])


def test_ranks_are_drawn_per_group_every_training_forward(tiny_llama):
    tok = load_tokenizer(spec_for(tiny_llama, tiny_llama, tiny_llama).model)
    from transformers import AutoModelForSequenceClassification

    model = attach(AutoModelForSequenceClassification.from_pretrained(tiny_llama, num_labels=2), nls_spec(), "seq-cls")
    enc = tok(TEXTS[:1], return_tensors="pt")
    draws = []
    model.train()
    for _ in range(300):
        model(**enc)
        draws.append(tuple(ms[0].nls_rank for ms in model.nls_groups.values()))
        for ms in model.nls_groups.values():  # one rank for every layer of a group
            assert len({m.nls_rank for m in ms}) == 1
    for g in range(2):
        counts = Counter(d[g] for d in draws)
        assert set(counts) == set(SPACE) and min(counts.values()) > 300 / 3 - 40, counts  # uniform
    assert sum(d[0] != d[1] for d in draws) > 100  # groups draw independently
    # a pure function of (seed, forward count): a fresh model replays the same sequence
    again = attach(AutoModelForSequenceClassification.from_pretrained(tiny_llama, num_labels=2), nls_spec(), "seq-cls")
    again.train()
    for d in draws[:20]:
        again(**enc)
        assert tuple(ms[0].nls_rank for ms in again.nls_groups.values()) == d
    model.eval()
    model(**enc)
    assert all(m.nls_rank is None for ms in model.nls_groups.values() for m in ms)  # r_max


def test_recomputed_forward_uses_the_drawn_ranks(tiny_llama):
    """Gradients with activation checkpointing (the forward recomputed in backward) equal those
    without, for the same draw: the recomputation sees the same ranks."""
    from transformers import AutoModelForCausalLM

    tok = load_tokenizer(spec_for(tiny_llama, tiny_llama, tiny_llama).model)
    enc = tok(TEXTS, return_tensors="pt", padding=True)
    grads = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        base = AutoModelForCausalLM.from_pretrained(tiny_llama)
        if ckpt:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model = attach(base, nls_spec(), "causal-lm")
        for n, p in model.named_parameters():
            if "lora_B" in n:
                torch.nn.init.normal_(p, std=0.1)
        model.train()
        for _ in range(3):  # advance the draws to one where the layers' ranks differ from r_max
            with torch.no_grad():
                model(**enc)
        out = model(**enc, labels=enc["input_ids"])
        out.loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        ranks = [ms[0].nls_rank for ms in model.nls_groups.values()]
    assert any(r != SPACE[0] for r in ranks), ranks
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        assert torch.allclose(grads[0][n], grads[1][n], atol=1e-6), n
        if "lora_A" in n:  # rows beyond the drawn rank get no gradient
            layer = int(n.split(".layers.")[1].split(".")[0])
            assert grads[0][n][ranks[layer]:].abs().sum() == 0


@pytest.mark.parametrize("version", ["heuristic", "minimal", "maximal", [4, 2]])
def test_subadapter_in_stock_peft_equals_the_super_adapter_at_those_ranks(super_adapter, version, tmp_path):
    from peft import PeftModel

    spec = super_adapter["spec"]
    tok = load_tokenizer(spec.model)
    enc = tok(TEXTS, return_tensors="pt", padding=True)
    summary = extract_subadapter(super_adapter["folder"], tmp_path, version)
    expected = version if isinstance(version, list) else {"heuristic": [3, 3], "minimal": [2, 2], "maximal": [4, 4]}[version]
    assert summary["ranks"] == expected
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert set(cfg["rank_pattern"].values()) == set(expected)
    assert all(cfg["alpha_pattern"][k] == 8 * r / 4 for k, r in cfg["rank_pattern"].items())

    stock = PeftModel.from_pretrained(load_model(spec.model, tok), str(tmp_path)).eval()  # plain PEFT LoRA
    # the super-adapter, run at the chosen ranks by its own elastic layers
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    elastic = attach(load_model(spec.model, tok), spec.adapter, "seq-cls")
    set_peft_model_state_dict(elastic, load_file(str(super_adapter["folder"] / "adapter_model.safetensors")))
    elastic.eval()
    set_ranks(elastic, dict(zip(elastic.nls_groups, expected)))
    with torch.no_grad():
        got, want = stock(**enc).logits, elastic(**enc).logits
        set_ranks(elastic, None)
        full = elastic(**enc).logits
    assert torch.allclose(got, want, atol=1e-5)
    if expected != [4, 4]:
        assert (got - full).abs().max() > 1e-4  # smaller ranks really are another model
    sizes = {k: v.shape for k, v in load_file(str(tmp_path / "adapter_model.safetensors")).items()}
    assert sizes["base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"][0] == expected[1]


def test_bad_ranks_and_cli(super_adapter, tmp_path):
    with pytest.raises(SpecError, match="rank 5 is not in its search space"):
        extract_subadapter(super_adapter["folder"], tmp_path / "x", [5, 4])
    with pytest.raises(SpecError, match="one rank per group"):
        extract_subadapter(super_adapter["folder"], tmp_path / "x", [4])
    with pytest.raises(Exception, match="largest first"):
        nls_spec(search_space=[2, 4])
    with pytest.raises(Exception, match="must equal the largest rank"):
        nls_spec(r=8)
    cli = [sys.executable, "-m", "pipelines.cli", "extract-subadapter", str(super_adapter["folder"]), "-o"]
    ok = subprocess.run(cli + [str(tmp_path / "h")], capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr
    assert "ranks [3, 3]" in ok.stdout
    from workers.artifact import verify

    manifest = verify(tmp_path / "h")
    assert manifest["method"] == "lora" and manifest["nls"]["ranks"] == [3, 3]
    bad = subprocess.run(cli + [str(tmp_path / "b"), "--version", "9,9"], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "not in its search space" in bad.stderr


def test_a_saved_super_adapter_loads_elastic_and_each_configuration_is_its_subadapter(super_adapter, tmp_path):
    """The saved files load as an elastic model (not plain LoRA at r_max): two rank configurations give
    different outputs, each equal to its extracted sub-adapter in stock PEFT."""
    from peft import PeftModel

    from workers.methods import get_method

    spec = super_adapter["spec"]
    tok = load_tokenizer(spec.model)
    enc = tok(TEXTS, return_tensors="pt", padding=True)
    elastic = get_method("nls").load(load_model(spec.model, tok), super_adapter["folder"]).eval()
    assert list(elastic.nls_groups) == ["group 0", "group 1"]
    outs = {}
    for ranks in ([4, 2], [2, 3]):
        set_ranks(elastic, ranks)
        sub = tmp_path / "-".join(map(str, ranks))
        extract_subadapter(super_adapter["folder"], sub, ranks)
        stock = PeftModel.from_pretrained(load_model(spec.model, tok), str(sub)).eval()
        with torch.no_grad():
            outs[tuple(ranks)] = elastic(**enc).logits
            assert torch.allclose(outs[tuple(ranks)], stock(**enc).logits, atol=1e-5), ranks
    assert (outs[(4, 2)] - outs[(2, 3)]).abs().max() > 1e-4
    set_ranks(elastic, None)  # r_max: the super-adapter's own outputs
    with torch.no_grad():
        full = elastic(**enc).logits
    plain = PeftModel.from_pretrained(load_model(spec.model, tok), str(super_adapter["folder"])).eval()
    with torch.no_grad():
        assert torch.allclose(full, plain(**enc).logits, atol=1e-5)
    with pytest.raises(SpecError, match="one rank per group"):
        set_ranks(elastic, [4])
