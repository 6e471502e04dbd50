"""Test tooling shared by the test modules (never by production code): tiny real models and data
made on the fly, spec builders, and the path to ../shared."""

from __future__ import annotations

import csv
import json
import os
import random
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

POS = ["good", "great", "lovely", "fine", "happy", "warm", "bright", "fun"]
NEG = ["bad", "awful", "sad", "dull", "cold", "grim", "boring", "poor"]
FILL = ["the", "a", "movie", "film", "was", "is", "very", "really", "and", "plot", "cast", "story"]


def shared_dir() -> Path | None:
    p = Path(os.environ.get("ADAPTERFLOW_SHARED", ROOT.parent / "shared"))
    return p if p.is_dir() else None


def need_shared(*parts: str) -> Path:
    """Path inside ../shared; skip (or fail under CI=true) when it is absent."""
    base = shared_dir()
    target = base.joinpath(*parts) if base else None
    if target is None or not target.exists():
        msg = f"../shared/{'/'.join(parts)} is absent (set ADAPTERFLOW_SHARED)"
        if os.environ.get("CI") == "true":
            pytest.fail(msg + " - required under CI")
        pytest.skip(msg)
    return target


def need_peft_sparta():
    """The peft-sparta package (the reference implementation `make test` installs); skip where it is
    absent, fail under CI."""
    try:
        import peft_sparta
    except ImportError:
        if os.environ.get("CI") == "true":
            pytest.fail("peft-sparta is not installed (make test installs it) - required under CI")
        pytest.skip("peft-sparta is not installed (make test installs it)")
    return peft_sparta


def toy_sentiment(n: int, seed: int = 0) -> list[dict]:
    """A learnable toy task: the label is whether positive words outnumber negative ones."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = i % 2
        words = rng.sample(FILL, 4) + rng.sample(POS if label else NEG, 2)
        rng.shuffle(words)
        rows.append({"sentence": " ".join(words), "label": label})
    return rows


def write_tsv(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]), delimiter="\t", quoting=csv.QUOTE_NONE)
        w.writeheader()
        w.writerows(rows)
    return path


def toy_instructions(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a = rng.choice(POS + NEG)
        rows.append({"instruction": f"say the word {a}", "input": "", "output": f"{a} {a}"})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def make_tiny_llama(folder: Path, seed: int = 0) -> Path:
    """A random-init Llama with a word-level tokenizer over the toy vocabulary, saved as safetensors."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    words = sorted(set(POS + NEG + FILL + ["say", "word", "###", "instruction:", "response:", "\n"]))
    vocab = {w: i for i, w in enumerate(specials + words)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tk, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    fast.save_pretrained(folder)
    cfg = LlamaConfig(
        vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        bos_token_id=1, eos_token_id=2, pad_token_id=3, tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    LlamaForCausalLM(cfg).save_pretrained(folder, safe_serialization=True)
    return folder


def mean(xs):
    return sum(xs) / len(xs)


def adapter_spec(data: dict):
    """An `adapter` section validated by its method's spec class (through the registry)."""
    from workers.methods import parse_adapter

    return parse_adapter(data)


def spec_for(model, data, tmp, task="seq-cls", **train):
    """A small local-mode pipeline spec: LoRA r=4 on q/v of `model`, trained on `data`."""
    from pipelines.spec import parse_spec

    d = {
        "name": "local-test", "workspace": str(tmp / "ws"),
        "model": {"name": str(model), "task": task},
        "data": {"path": str(data), "max_length": 32},
        "adapter": {"method": "lora", "r": 4, "alpha": 8, "dropout": 0.1,
                    "target_modules": ["q_proj", "v_proj"]},
        "train": {"num_workers": 0, "global_batch_size": 16, "lr": 5e-3, "epochs": 1,
                  "checkpoint_every": 4, "log_every": 2, "seed": 3, **train},
    }
    if task == "seq-cls":
        d["model"]["id2label"] = {0: "negative", 1: "positive"}
    else:
        d["data"].update(input_template="{instruction}", target_template="{output}")
        d["model"]["prompt_format"] = "### instruction: {prompt} response:"
    return parse_spec(d)


# ---------------------------------------------------------------- every method's test case
# the tiny Llama of make_tiny_llama: hidden 32, intermediate 64, 4 heads, 2 KV heads (head dim 8)
HIDDEN, INTER, KV = 32, 64, 16
LAYERS, LABELS = 2, 2
SHAPES = {"q_proj": (HIDDEN, HIDDEN), "k_proj": (HIDDEN, KV), "v_proj": (HIDDEN, KV), "o_proj": (HIDDEN, HIDDEN),
          "down_proj": (INTER, HIDDEN)}  # (in, out)
HEAD = HIDDEN * LABELS  # LlamaForSequenceClassification.score has no bias
QVD = ("q_proj", "v_proj", "down_proj")


def lora_count(r: int, modules) -> int:
    return LAYERS * sum(r * (SHAPES[m][0] + SHAPES[m][1]) for m in modules)


# the adapter each registered method trains with in the common tests, and its trainable-parameter
# count by formula (None: SpaRTA's draw is random, its count is checked against the binomial)
METHOD_CASES = {
    "lora": {"adapter": {"method": "lora", "r": 4, "alpha": 8, "target_modules": list(QVD)},
             "trainable": lora_count(4, QVD) + HEAD},
    "ia3": {"adapter": {"method": "ia3", "target_modules": ["k_proj", "v_proj", "down_proj"],
                        "feedforward_modules": ["down_proj"]},
            "trainable": LAYERS * (SHAPES["k_proj"][1] + SHAPES["v_proj"][1] + SHAPES["down_proj"][0]) + HEAD},
    "sparsepeft": {"adapter": {"method": "sparsepeft", "r": 4, "alpha": 8, "target_modules": list(QVD)},
                   "trainable": lora_count(4, QVD) + HEAD},
    "qa-sparsepeft": {"adapter": {"method": "qa-sparsepeft", "r": 4, "alpha": 8, "target_modules": list(QVD),
                                  "group_size": 16},
                      "trainable": lora_count(4, QVD) + HEAD},
    "nls": {"adapter": {"method": "nls", "alpha": 8, "search_space": [6, 4, 2], "target_modules": ["q_proj", "v_proj"]},
            "trainable": lora_count(6, ("q_proj", "v_proj")) + HEAD},
    "pvera": {"adapter": {"method": "pvera", "r": 8, "target_modules": ["q_proj", "v_proj"]},
              "trainable": LAYERS * sum(2 * 8 + SHAPES[m][1] for m in ("q_proj", "v_proj")) + HEAD},
    "sparta": {"adapter": {"method": "sparta", "sparsity": 0.9, "seed": 5}, "trainable": None},
    "alora": {"task": "causal-lm",
              "adapter": {"method": "alora", "invocation_string": " ###", "r": 4, "alpha": 8,
                          "target_modules": ["q_proj", "v_proj"]},
              "trainable": lora_count(4, ("q_proj", "v_proj"))},
}
# SpaRTA draws each weight of v/o (the non-frozen pool of the tiny Llama) with p = ((1-s)·N - head) / pool
SPARTA_POOL = LAYERS * sum(SHAPES[m][0] * SHAPES[m][1] for m in ("v_proj", "o_proj"))
METHOD_TEXTS = ["good great lovely movie", "bad awful dull plot", "the cast was fun and warm", "a cold grim story"]
CAUSAL_TEXTS = ["say the word good ###", "say the word bad ### bad", "say the word warm ### warm warm",
                "say ### the word"]


def train_method_case(name: str, tiny_llama: Path, toy_data: Path, toy_instruct: Path, tmp: Path,
                      task: str | None = None) -> dict:
    """Train the method's case through the platform (local mode) and build its artifact; `task`
    overrides the case's own (e.g. a causal-LM adapter of a method whose case classifies)."""
    from workers.stages import build_artifact, launch_training

    case = METHOD_CASES[name]
    task = task or case.get("task", "seq-cls")
    causal = task == "causal-lm"
    spec = spec_for(tiny_llama, toy_instruct if causal else toy_data, tmp, task=task, epochs=2, lr=3e-2)
    spec = spec.model_copy(update={"adapter": adapter_spec(case["adapter"])})
    if causal:  # the method's prompt format (aLoRA appends its invocation)
        from workers.methods import method_of

        spec.model.prompt_format = method_of(spec.adapter).prompt_format(spec.adapter, spec.model.prompt_format)
    out = launch_training(spec, run_name=f"method-{name}")
    folder = build_artifact(spec, out.checkpoint, tmp / "adapter")
    return {"name": name, "spec": spec, "out": out, "folder": folder, "case": case,
            "texts": CAUSAL_TEXTS if causal else METHOD_TEXTS}


def mlflow_client(workspace):
    """An MLflow client on a workspace's store, for its runs and its registry alike (a client given only a
    tracking URI takes the registry URI of whatever the process set last)."""
    import mlflow

    uri = f"sqlite:///{Path(workspace) / 'mlflow.db'}"
    return mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)


def read_store(db, query, timeout: float = 10):
    """`query(connection)` on an MLflow SQLite file, opened read-only beside its writer; None while the
    file or its schema is still being made (MLflow creates the file first and its tables after, so a
    poller can find a file with no `runs` table yet) or while a writer holds it locked past `timeout`."""
    import sqlite3

    if not Path(db).exists():
        return None
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=timeout) as con:
            return query(con)
    except sqlite3.OperationalError as e:
        if any(m in str(e) for m in ("no such table", "no such column", "database is locked")):
            return None
        raise
