"""aLoRA's spec (no torch)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from workers.methods.base import MethodSpec


class ALoraSpec(MethodSpec):
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
