"""SpaRTA's spec (no torch)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from workers.methods.base import MethodSpec

UPSTREAM_FROZEN = ["embed_tokens", "self_attn.q", "self_attn.k", "mlp", "norm"]


class SpartaSpec(MethodSpec):
    method: Literal["sparta"] = "sparta"
    sparsity: float = Field(
        0.99, gt=0, lt=1,
        description="Fraction of ALL model parameters left untrained (frozen modules included).",
    )
    frozen_modules: list[str] = Field(
        default_factory=lambda: list(UPSTREAM_FROZEN),
        description="Substrings of parameter names made entirely non-trainable (peft-sparta's default).",
    )
    trainable_tokens: list[int] | None = Field(
        None, description="Token ids whose whole embedding rows train (e.g. new special tokens)."
    )
    new_tokens: list[str] | None = Field(
        None, description="Special tokens to add: the embeddings grow and the new rows train in full; the "
        "rows' initial values and the tokenizer are saved with the adapter (peft-sparta's layout).",
    )
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the deltas during training.")
    seed: int = Field(0, description="Seed of the random index draw (the indices are saved too).")


    @field_validator("trainable_tokens")
    @classmethod
    def _unique_tokens(cls, v):
        if v is not None:
            if len(set(v)) != len(v):
                raise ValueError("token ids must be unique")
            if any(t < 0 for t in v):
                raise ValueError("token ids must be >= 0")
        return v
