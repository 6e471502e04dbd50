"""Tiny real models and data made on the fly, and the path to ../shared."""

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
