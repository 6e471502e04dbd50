"""`data.batching`: length-grouped plans and packed rows. Plans are pure functions of (seed, epoch,
step, rank) that give every rank the same shapes; a packed row's loss is exactly the loss of its
examples run one by one, on the real stories260K model with a non-trivial adapter."""

import random

import pytest
import torch

from workers.batching import BatchPlan, collate_packed, pack_rows, packing_refusal
from workers.data import IGNORE_INDEX, Example, collate

from helpers import need_shared


def _lengths(n, seed=0):
    rng = random.Random(seed)
    return [max(2, min(256, int(rng.lognormvariate(4.3, 0.6)))) for _ in range(n)]


def _plan(mode, lengths, **kw):
    args = {"global_batch": 16, "world_size": 2, "grad_accum": 2, "seed": 7, **kw}
    return BatchPlan(len(lengths), mode=mode, lengths=tuple(lengths), **args)


def test_length_grouped_plan_covers_each_epoch_once_with_common_shapes_and_little_padding():
    lengths = _lengths(3003)
    plan = _plan("length_grouped", lengths, window=32)
    rnd = BatchPlan(len(lengths), 16, 2, 2, 7)
    assert plan.steps_per_epoch == 187
    real = {"grouped": 0, "random": 0}
    computed = {"grouped": 0, "random": 0}
    seen, firsts = [], []
    for step in range(plan.steps_per_epoch):
        ranks = [plan.micro_batches(step, r) for r in range(2)]
        assert [len(m) for r in ranks for m in r] == [4, 4, 4, 4]
        flat = [i for r in ranks for m in r for i in m]
        seen += flat
        firsts.append(flat[0])
        for m in range(2):
            width = plan.width(step, m)
            assert width == max(lengths[i] for r in ranks for i in r[m])  # every rank pads micro m to it
            real["grouped"] += sum(lengths[i] for r in ranks for i in r[m])
            computed["grouped"] += width * 8
            for r in range(2):
                idx = rnd.micro_batches(step, r)[m]
                real["random"] += sum(lengths[i] for i in idx)
                computed["random"] += max(lengths[i] for i in idx) * 4
    assert len(set(seen)) == len(seen) == 187 * 16  # no example twice in an epoch
    share = {k: real[k] / computed[k] for k in real}
    assert share["grouped"] > 0.95 > 0.85 > share["random"], share
    # batch order is shuffled: the longest batches do not all come first
    first_len = [lengths[i] for i in firsts]
    assert first_len != sorted(first_len, reverse=True)
    # a pure function of its inputs, reshuffled every epoch
    again = _plan("length_grouped", lengths, window=32)
    assert all(again.micro_batches(s, 1) == plan.micro_batches(s, 1) for s in (0, 17, 186, 187, 300))
    assert plan.micro_batches(187, 0) != plan.micro_batches(0, 0)
    assert _plan("length_grouped", lengths, window=32, seed=8).micro_batches(0, 0) != plan.micro_batches(0, 0)


def test_random_plan_is_the_recorded_layout():
    """random keeps the layout runs were recorded with: rank r takes the r-th slice of the seeded batch."""
    plan = BatchPlan(103, 16, 2, 2, 7)
    order = torch.randperm(103, generator=torch.Generator().manual_seed(7 * 1_000_003 + 0))
    batch = order[16:32].tolist()
    assert plan.micro_batches(1, 1) == [batch[8:12], batch[12:16]]
    assert plan.width(1, 0) is None


def test_pack_rows_places_every_example_once_within_capacity():
    lengths = _lengths(999)
    rows = pack_rows(lengths, 256, seed=3)
    placed = sorted(i for row in rows for i in row)
    assert placed == list(range(999))
    assert max(sum(lengths[i] for i in row) for row in rows) <= 256
    fill = sum(lengths) / (256 * len(rows))
    assert fill > 0.95, fill
    assert pack_rows(lengths, 256, seed=3) == rows
    with pytest.raises(ValueError, match="more than a packed row"):
        pack_rows([10, 300], 256, seed=0)


def test_collate_packed_restarts_positions_and_ignores_each_first_label():
    a, b = Example([1, 5, 6, 7], [IGNORE_INDEX, IGNORE_INDEX, 6, 7]), Example([1, 8, 9], [1, 8, 9])
    batch = collate_packed([[a, b], [b]], pad_id=0, width=9)
    assert batch["input_ids"].tolist() == [[1, 5, 6, 7, 1, 8, 9, 0, 0], [1, 8, 9, 0, 0, 0, 0, 0, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1, 2, 0, 1], [0, 1, 2, 0, 1, 2, 3, 4, 5]]
    x = IGNORE_INDEX
    assert batch["labels"].tolist() == [[x, x, 6, 7, x, 8, 9, x, x], [x, 8, 9, x, x, x, x, x, x]]
    assert "attention_mask" not in batch and batch["use_cache"] is False


def _stories_with_adapter(attn: str):
    """stories260K with a non-trivial LoRA adapter, in float64: per-token losses reach 25 nats here, where
    float32 rounding alone differs by 1e-5 between a packed row and a lone example; in float64 what is
    left of a difference is what one example saw of another."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    path = need_shared("models", "stories260K")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation=attn)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():  # a non-trivial adapter: B is zero when fresh
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.2)
    return model.double().eval()


def _alpaca_examples(n):
    from transformers import AutoTokenizer

    from workers.config import DataSpec, ModelSpec
    from workers.data import encode, load_train_eval

    path = need_shared("models", "stories260K")
    tok = AutoTokenizer.from_pretrained(path)
    tok.pad_token = tok.unk_token
    data = DataSpec(path=str(need_shared("data", "instruct", "alpaca_en_demo.json")), eval_split=None,
                    input_template="{instruction} {input}", max_length=96, max_train_examples=n)
    model = ModelSpec(name=str(path), task="causal-lm", prompt_format="Q: {prompt} A:")
    return encode(load_train_eval(data, 0)[0], data, model, tok), tok


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_loss_equals_the_examples_run_one_by_one(attn):
    model = _stories_with_adapter(attn)
    examples, tok = _alpaca_examples(24)
    rows = pack_rows([len(e.input_ids) for e in examples], 256, seed=1)
    assert max(len(r) for r in rows) >= 3  # rows really hold several examples
    batch = collate_packed([[examples[i] for i in row] for row in rows], tok.pad_token_id)
    with torch.no_grad():
        packed = model(**batch)
        # per-token losses of the packed rows, in the rows' order
        lp = torch.log_softmax(packed.logits[:, :-1], -1)
        tgt = batch["labels"][:, 1:]
        keep = tgt != IGNORE_INDEX
        packed_tok = -lp.gather(-1, tgt.clamp(min=0).unsqueeze(-1)).squeeze(-1)[keep]
        alone_tok = []
        for row in rows:
            for i in row:
                one = collate([examples[i]], tok.pad_token_id)
                logits = model(input_ids=one["input_ids"]).logits[0, :-1]
                t = one["labels"][0, 1:]
                k = t != IGNORE_INDEX
                alone_tok.append(-torch.log_softmax(logits, -1).gather(-1, t.clamp(min=0).unsqueeze(-1))
                                 .squeeze(-1)[k])
    alone_tok = torch.cat(alone_tok)
    assert packed_tok.shape == alone_tok.shape and len(alone_tok) > 500
    assert torch.allclose(packed_tok, alone_tok, atol=1e-5, rtol=0), (packed_tok - alone_tok).abs().max()
    assert packed.loss.item() == pytest.approx(alone_tok.mean().item(), abs=1e-5)  # the model's own loss
    assert packing_refusal(model) is None


def _register_leaky_attention():
    """'whole_row_causal': plain causal attention over the whole row, ignoring the packing."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    def whole_row_causal(module, query, key, value, attention_mask, **kw):
        kw.pop("is_causal", None)
        return sdpa_attention_forward(module, query, key, value, None, is_causal=True, **kw)

    AttentionInterface.register("whole_row_causal", whole_row_causal)


def test_an_attention_that_lets_packed_examples_see_each_other_is_refused():
    """An attention kernel that ignores the packing (plain causal attention over the whole row) is
    found out by the probe and named."""
    _register_leaky_attention()
    model = _stories_with_adapter("whole_row_causal")
    why = packing_refusal(model)
    assert why and "'whole_row_causal'" in why and "see each other" in why


def test_specs_refuse_packing_where_it_cannot_be_exact(tiny_llama, toy_data):
    from pipelines.spec import parse_spec
    from workers.errors import SpecError

    base = {"name": "x", "model": {"name": str(tiny_llama), "task": "seq-cls"},
            "data": {"path": str(toy_data), "batching": "packed"},
            "adapter": {"method": "lora", "target_modules": ["q_proj"]}}
    with pytest.raises(SpecError, match="data.batching packed applies to causal-lm"):
        parse_spec(base)
    with pytest.raises(SpecError, match="data.batching: Input should be 'auto', 'random'"):
        parse_spec({**base, "data": {"path": str(toy_data), "batching": "packd"}})
    alora = {**base, "model": {"name": str(tiny_llama), "task": "causal-lm"},
             "adapter": {"method": "alora", "invocation_string": " A:", "target_modules": ["q_proj"]}}
    with pytest.raises(SpecError, match="packed cannot train adapter.method alora"):
        parse_spec(alora)
    auto = parse_spec({**base, "data": {"path": str(toy_data)}})
    assert auto.data.resolved_batching("seq-cls") == "random"
    assert auto.data.resolved_batching("causal-lm") == "length_grouped"


def _stories_spec(tmp, mode, **model):
    from workers.spec_view import WorkerSpec

    return WorkerSpec.model_validate({
        "name": f"modes-{mode}", "workspace": str(tmp / "ws"),
        "model": {"name": str(need_shared("models", "stories260K")), "task": "causal-lm",
                  "prompt_format": "Q: {prompt} A:", **model},
        "data": {"path": str(need_shared("data", "instruct", "alpaca_en_demo.json")), "eval_split": None,
                 "input_template": "{instruction} {input}", "target_template": " {output}", "max_length": 256,
                 "max_train_examples": 400, "batching": mode, "group_window": 8},
        "adapter": {"method": "lora", "r": 8, "alpha": 16, "dropout": 0.1, "target_modules": ["q_proj", "v_proj"]},
        "train": {"num_workers": 0, "global_batch_size": 8, "grad_accum": 2, "lr": 5e-3, "max_steps": 6,
                  "checkpoint_every": 3, "log_every": 3, "seed": 4, "keep": 3},
    })


def _run(spec, root, resume_from=None):
    import json

    from workers.session import LocalSession
    from workers.train_loop import HISTORY_FILE, run_training

    session = LocalSession(resume_from=resume_from)
    run_training({"spec": spec.model_dump(mode="json"), "mlflow": None, "checkpoint_root": str(root)}, session)
    return json.loads((sorted(root.glob("checkpoint_*"))[-1] / HISTORY_FILE).read_text()), session.reports[-1]


@pytest.mark.parametrize("mode", ["random", "length_grouped", "packed"])
def test_each_mode_trains_through_the_spec_and_resumes_exactly(mode, tmp_path):
    spec = _stories_spec(tmp_path, mode)
    full, final = _run(spec, tmp_path / "full")
    assert final["batching"] == mode and final["step"] == 6
    share = final["real_token_share"]
    assert (share > 0.95) if mode != "random" else (share < 0.9), share
    if mode == "packed":  # 8 rows of up to 256 tokens a step, nearly full
        assert final["train_tokens"] / 6 > 0.95 * 8 * 256
    assert full[-1]["tokens_per_s"] > 0 and full[-1]["real_token_share"] == pytest.approx(
        final["real_token_share"], rel=0.2)
    resumed, _ = _run(spec, tmp_path / "resumed", resume_from=str(tmp_path / "full" / "checkpoint_0000003"))
    assert [h["step"] for h in resumed] == list(range(1, 7))
    assert [h["loss"] for h in resumed] == pytest.approx([h["loss"] for h in full], abs=1e-6)


def test_a_packed_run_on_an_attention_that_leaks_stops_with_its_name(tmp_path):
    from workers.errors import SpecError

    _register_leaky_attention()
    with pytest.raises(SpecError, match="data.batching packed: .*'whole_row_causal' lets packed examples see"):
        _run(_stories_spec(tmp_path, "packed", attn_implementation="whole_row_causal"), tmp_path / "x")


def test_evaluation_in_length_grouped_batches_gives_the_per_example_outputs():
    """Evaluation batches are grouped by length (less padding); the report is the one of examples run
    one at a time, with no padding at all."""
    from workers.evaluate import evaluate_model, length_grouped

    model = _stories_with_adapter("sdpa")
    examples, tok = _alpaca_examples(40)
    batches = length_grouped(examples, 8)
    assert sorted(i for b in batches for i in b) == list(range(len(examples)))
    widths = [len(examples[b[0]].input_ids) for b in batches]
    assert widths == sorted(widths, reverse=True)
    grouped = evaluate_model(model, tok, examples, "causal-lm", None, batch_size=8)
    alone = evaluate_model(model, tok, examples, "causal-lm", None, batch_size=1)
    assert grouped["tokens"] == alone["tokens"] > 1000
    assert grouped["eval_loss"] == pytest.approx(alone["eval_loss"], abs=1e-5)
