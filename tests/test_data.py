"""Data loading, templates, tokenization with prompt masking, deterministic batching."""

import json

import pytest

from workers.batching import BatchPlan
from workers.config import DataSpec, ModelSpec
from workers.data import IGNORE_INDEX, Example, collate, encode, load_train_eval, render
from workers.errors import DataError

from helpers import make_tiny_llama, toy_sentiment, write_jsonl, write_tsv


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(make_tiny_llama(tmp_path_factory.mktemp("llama")))


def test_reads_every_format_the_same(tmp_path):
    rows = toy_sentiment(20)
    write_tsv(tmp_path / "tsv" / "train.tsv", rows)
    write_jsonl(tmp_path / "jsonl" / "train.jsonl", rows)
    (tmp_path / "csv").mkdir()
    (tmp_path / "csv" / "train.csv").write_text(
        "sentence,label\n" + "".join(f"\"{r['sentence']}\",{r['label']}\n" for r in rows))
    (tmp_path / "json").mkdir()
    (tmp_path / "json" / "train.json").write_text(json.dumps(rows))
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "pq").mkdir()
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "pq" / "train.parquet")
    for sub in ("tsv", "jsonl", "csv", "json", "pq"):
        train, _ = load_train_eval(DataSpec(path=str(tmp_path / sub), eval_split=None), 0)
        assert [r["sentence"] for r in train] == [r["sentence"] for r in rows], sub
        assert [int(r["label"]) for r in train] == [r["label"] for r in rows], sub


def test_validation_split_finds_dev_and_held_out_fraction(tmp_path):
    write_tsv(tmp_path / "train.tsv", toy_sentiment(100))
    write_tsv(tmp_path / "dev.tsv", toy_sentiment(10, seed=3))
    train, ev = load_train_eval(DataSpec(path=str(tmp_path)), 0)
    assert len(train) == 100 and len(ev) == 10
    single = tmp_path / "single.jsonl"
    write_jsonl(single, [{"id": i, **r} for i, r in enumerate(toy_sentiment(100))])
    train, ev = load_train_eval(DataSpec(path=str(single), eval_fraction=0.2), 0)
    assert len(train) == 80 and len(ev) == 20
    assert {r["id"] for r in train} | {r["id"] for r in ev} == set(range(100))
    assert not {r["id"] for r in train} & {r["id"] for r in ev}
    again = load_train_eval(DataSpec(path=str(single), eval_fraction=0.2), 0)
    assert again[1] == ev


def test_missing_data_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="no such file or folder"):
        load_train_eval(DataSpec(path=str(tmp_path / "nope.tsv")), 0)
    with pytest.raises(DataError, match="split 'train' is missing"):
        load_train_eval(DataSpec(path=str(tmp_path)), 0)


def test_template_errors_name_the_field():
    assert render("Review: {text}", {"text": "fine"}) == "Review: fine"
    with pytest.raises(DataError, match="names field 'txt'.*text"):
        render("{txt}", {"text": "fine"})


def test_seq_cls_encoding_and_string_labels(tok):
    model = ModelSpec(name="x", id2label={0: "neg", 1: "pos"})
    data = DataSpec(path="x", input_template="{sentence}")
    ex = encode([{"sentence": "good movie", "label": "pos"}, {"sentence": "bad", "label": "0"}],
                data, model, tok)
    assert [e.labels for e in ex] == [1, 0]
    with pytest.raises(DataError, match="not among model.id2label"):
        encode([{"sentence": "x", "label": "meh"}], data, model, tok)


def test_causal_lm_masks_the_prompt(tok):
    model = ModelSpec(name="x", task="causal-lm", prompt_format="### instruction: {prompt} response:")
    data = DataSpec(path="x", input_template="{instruction}", target_template="{output}")
    [ex] = encode([{"instruction": "say the word good", "output": "good good"}], data, model, tok)
    prompt_len = len(tok("### instruction: say the word good response:")["input_ids"])
    assert ex.labels[:prompt_len] == [IGNORE_INDEX] * prompt_len
    target = ex.labels[prompt_len:]
    assert target == ex.input_ids[prompt_len:]
    assert tok.decode(target[:-1]) == "good good" and target[-1] == tok.eos_token_id
    batch = collate([ex, Example(ex.input_ids[:3], ex.labels[:3])], tok.pad_token_id)
    assert batch["labels"][1, 3:].eq(IGNORE_INDEX).all() and batch["attention_mask"][1, 3:].eq(0).all()


def test_batch_plan_partitions_each_global_batch():
    plan = BatchPlan(n_examples=103, global_batch=16, world_size=2, grad_accum=2, seed=7)
    assert plan.steps_per_epoch == 6
    seen_epoch = []
    for step in range(plan.steps_per_epoch):
        r0, r1 = plan.micro_batches(step, 0), plan.micro_batches(step, 1)
        assert [len(m) for m in r0 + r1] == [4, 4, 4, 4]
        flat = sum(r0 + r1, [])
        assert len(set(flat)) == 16
        seen_epoch += flat
    assert len(set(seen_epoch)) == 96  # no example twice within an epoch
    assert plan.micro_batches(3, 1) == BatchPlan(103, 16, 2, 2, 7).micro_batches(3, 1)  # pure function
    assert plan.micro_batches(6, 0) != plan.micro_batches(0, 0)  # next epoch reshuffles
