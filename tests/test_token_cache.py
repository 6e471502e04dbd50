"""Tokenized examples on disk (`data.cache`): a second run tokenizes nothing (the tokenizer's calls are
counted), any change to the records, templates, max_length or tokenizer misses, and a damaged file is
tokenized again, never trusted."""

import json

import pytest
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from workers import data as data_mod
from workers import token_cache
from workers.data import encode, encode_stats, load_train_eval
from workers.models import load_tokenizer
from workers.session import LocalSession
from workers.spec_view import WorkerSpec
from workers.train_loop import HISTORY_FILE, run_training

from helpers import spec_for


@pytest.fixture
def calls(monkeypatch):
    """How many times any tokenizer was called (`tokenizer(text)`)."""
    count = {"n": 0}
    original = PreTrainedTokenizerBase.__call__

    def counted(self, *a, **kw):
        count["n"] += 1
        return original(self, *a, **kw)

    monkeypatch.setattr(PreTrainedTokenizerBase, "__call__", counted)
    data_mod._encoded.clear()  # as in a new process: only the disk remembers
    yield count
    data_mod._encoded.clear()


def _spec(model, data, tmp, task="seq-cls", **train):
    return WorkerSpec.model_validate(spec_for(model, data, tmp, task=task, **train).model_dump(mode="json"))


@pytest.fixture
def cached(tiny_llama, toy_data, tmp_path, calls):
    """A classification spec, its tokenizer and records, its workspace, and the records encoded once
    (written to the cache)."""
    spec = _spec(tiny_llama, toy_data, tmp_path)
    tok = load_tokenizer(spec.model)
    records, _ = load_train_eval(spec.data, 0)
    ws = spec.workspace_path()
    return spec, tok, records, ws, encode(records, spec.data, spec.model, tok, ws)


def _files(spec):
    return sorted(token_cache.cache_dir(spec.workspace_path()).glob("*.safetensors"))


def _train(spec, root):
    run_training({"spec": spec.model_dump(mode="json"), "mlflow": None, "checkpoint_root": str(root)}, LocalSession())
    return json.loads((sorted(root.glob("checkpoint_*"))[-1] / HISTORY_FILE).read_text())


def test_a_second_run_reads_the_tokens_from_disk_and_trains_the_same(tiny_llama, toy_instruct, tmp_path, calls):
    spec = _spec(tiny_llama, toy_instruct, tmp_path, task="causal-lm", max_steps=3, checkpoint_every=100)
    first = _train(spec, tmp_path / "a")
    assert calls["n"] >= 2 * 128  # prompt and target of every training record
    assert len(_files(spec)) == 1
    data_mod._encoded.clear()
    calls["n"] = 0
    disk = encode_stats["disk_hits"]
    second = _train(spec, tmp_path / "b")
    assert calls["n"] == 0, "the second run tokenized again"
    assert encode_stats["disk_hits"] == disk + 1
    assert [h["loss"] for h in second] == [h["loss"] for h in first]


def test_any_change_to_what_shapes_an_example_misses(cached, calls):
    spec, tok, records, ws, base = cached
    edited = [dict(r) for r in records]
    edited[5]["sentence"] = "awful awful awful"
    variants = [
        (records, spec.data.model_copy(update={"max_length": 4}), spec.model, tok),
        (records, spec.data.model_copy(update={"input_template": "review: {sentence}"}), spec.model, tok),
        (edited, spec.data, spec.model, tok),
    ]
    grown = load_tokenizer(spec.model)
    grown.add_tokens(["awful-new"], special_tokens=True)
    variants.append((records, spec.data, spec.model, grown))
    for recs, d, m, t in variants:
        misses = encode_stats["misses"]
        encode(recs, d, m, t, ws)
        assert encode_stats["misses"] == misses + 1  # tokenized anew, not read from the disk
    assert len(_files(spec)) == 5  # one file per distinct key
    data_mod._encoded.clear()
    calls["n"] = 0
    assert encode(records, spec.data, spec.model, load_tokenizer(spec.model), ws) == base
    assert calls["n"] == 0
    off = spec.data.model_copy(update={"cache": False, "max_length": 7})
    encode(records, off, spec.model, tok, ws)
    assert len(_files(spec)) == 5  # data.cache: false writes nothing


def test_a_damaged_or_foreign_cache_file_is_tokenized_again(cached, calls):
    spec, tok, records, ws, base = cached
    (path,) = _files(spec)
    blob = bytearray(path.read_bytes())
    blob[len(blob) // 2 :] = b"\x00" * (len(blob) - len(blob) // 2)
    path.write_bytes(bytes(blob))  # truncated data
    data_mod._encoded.clear()
    calls["n"], rejected = 0, token_cache.stats["rejected"]
    assert encode(records, spec.data, spec.model, tok, ws) == base
    assert calls["n"] > 0 and token_cache.stats["rejected"] == rejected + 1, (token_cache.stats, encode_stats)
    folder, key = token_cache.cache_dir(ws), path.stem
    assert token_cache.load(folder, key) == base  # written again, whole
    (folder / f"{'0' * 64}.safetensors").write_bytes(path.read_bytes())
    assert token_cache.load(folder, "0" * 64) is None  # a file whose metadata names another key
