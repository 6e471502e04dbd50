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

    mergeable: ClassVar[bool] = False

    replica_group: ClassVar[str] = "peft"  # methods of one group share a replica


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


def attach(model, spec: ALoraSpec, task: str, tokenizer=None, prompt_format: str | None = None):
    from peft import LoraConfig, get_peft_model

    if task != "causal-lm":
        raise ValueError("adapter.method alora needs model.task: causal-lm")
    if tokenizer is None:
        raise ValueError("aLoRA needs the tokenizer to encode its invocation string")
    config = LoraConfig(
        r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout, target_modules=spec.target_modules,
        alora_invocation_tokens=invocation_tokens(
            tokenizer, spec, prompt_format.format(prompt="Tell a story.") if prompt_format else None), task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)
