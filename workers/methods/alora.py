"""Activated LoRA through PEFT (`LoraConfig(alora_invocation_tokens=...)`): LoRA applies only from
the start of the last occurrence of the invocation tokens onward, so everything before sees the
base weights and its KV cache equals the base model's. Causal LMs only; not mergeable.

The spec names an `invocation_string`; the pipeline appends it to `model.prompt_format` (unless the
format already holds it) so every training prompt and every served prompt carries it where the
adapter must switch on.
"""

from __future__ import annotations

import logging
from typing import ClassVar, Literal

from pydantic import Field

from workers.methods.base import StrictModel

log = logging.getLogger(__name__)


class ALoraSpec(StrictModel):
    method: Literal["alora"] = "alora"
    invocation_string: str = Field(..., min_length=1, description="Text that switches the adapter on.")
    r: int = Field(32, gt=0, description="Rank of the update B·A (32 recommended for aLoRA).")
    alpha: float = Field(32.0, gt=0, description="Scale numerator: the update is (alpha/r)·B·A.")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the LoRA input.")
    target_modules: list[str] | Literal["all-linear"] | None = Field(
        None, description="Module names to adapt; null = PEFT's default for the architecture."
    )
    new_tokens: list[str] | None = Field(
        None, description="Special tokens to add (e.g. the invocation marker): the embeddings grow, only "
        "the new rows train, and they and the tokenizer are saved with the adapter.",
    )

    mergeable: ClassVar[bool] = False

    replica_group: ClassVar[str] = "lora"  # one PEFT type per replica: PEFT cannot mix types


def invocation_tokens(tokenizer, spec: ALoraSpec, prompt_example: str | None = None) -> list[int]:
    """The invocation's token ids; warns when they do not appear as such inside a real prompt."""
    ids = tokenizer.encode(spec.invocation_string, add_special_tokens=False)
    if not ids:
        raise ValueError(f"adapter.invocation_string {spec.invocation_string!r} tokenizes to nothing")
    if prompt_example is not None:
        ctx = tokenizer.encode(prompt_example, add_special_tokens=False)
        if not any(ctx[i : i + len(ids)] == ids for i in range(len(ctx) - len(ids) + 1)):
            log.warning(
                "adapter.invocation_string %r does not tokenize the same inside a prompt (%s alone vs %s "
                "in context); the adapter may never switch on. Begin and end it with special tokens or "
                "a newline so it tokenizes identically.", spec.invocation_string, ids, ctx[-len(ids) - 2:],
            )
    return ids


def add_new_tokens(model, tokenizer, tokens: list[str]) -> list[int]:
    """Add `tokens` as special tokens and grow the embeddings (new rows start at the mean of the
    old ones); returns their ids."""
    existing = [t for t in tokens if t in tokenizer.get_vocab()]
    if existing:
        raise ValueError(f"adapter.new_tokens {existing} are already in the vocabulary; list only new ones")
    tokenizer.add_tokens(list(tokens), special_tokens=True)
    model.resize_token_embeddings(len(tokenizer), mean_resizing=True)
    return tokenizer.convert_tokens_to_ids(list(tokens))


def attach(model, spec: ALoraSpec, task: str, tokenizer=None, prompt_format: str | None = None):
    from peft import LoraConfig, get_peft_model

    if task != "causal-lm":
        raise ValueError("adapter.method alora needs model.task: causal-lm")
    if tokenizer is None:
        raise ValueError("aLoRA needs the tokenizer to encode its invocation string")
    new_ids = add_new_tokens(model, tokenizer, spec.new_tokens) if spec.new_tokens else None
    config = LoraConfig(
        r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout, target_modules=spec.target_modules,
        alora_invocation_tokens=invocation_tokens(
            tokenizer, spec, prompt_format.format(prompt="Tell a story.") if prompt_format else None), task_type="CAUSAL_LM",
        trainable_token_indices=new_ids,  # PEFT trains and saves just these embedding rows
    )
    peft_model = get_peft_model(model, config)
    if new_ids:
        peft_model.adapter_tokenizer = tokenizer
    return peft_model


def write_extra(spec: ALoraSpec, directory, model=None) -> None:
    """With new tokens, the grown tokenizer goes with the adapter (its ids index the new rows)."""
    tok = getattr(model, "adapter_tokenizer", None) if model is not None else None
    if spec.new_tokens and tok is not None:
        tok.save_pretrained(str(directory))


def _grow_base(base, folder: str) -> None:
    from pathlib import Path

    if not (Path(folder) / "tokenizer_config.json").is_file():
        return
    from transformers import AutoTokenizer

    n = len(AutoTokenizer.from_pretrained(folder))
    if base.get_input_embeddings().weight.shape[0] < n:
        base.resize_token_embeddings(n, mean_resizing=False)  # the adapter restores the new rows


def load(base, folder: str, adapter_name: str = "default"):
    from peft import PeftModel

    _grow_base(base, folder)
    return PeftModel.from_pretrained(base, folder, adapter_name=adapter_name)


def add(model, folder: str, adapter_name: str) -> None:
    _grow_base(model.get_base_model(), folder)
    model.load_adapter(folder, adapter_name=adapter_name)
