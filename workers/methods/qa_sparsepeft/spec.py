"""QA-SparsePEFT's spec (no torch)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from workers.methods.sparsepeft.spec import SparsePeftSpec


class QASparsePeftSpec(SparsePeftSpec):
    method: Literal["qa-sparsepeft"] = "qa-sparsepeft"  # type: ignore[assignment]
    dropout: float = Field(0.0, description="Must be 0: the update acts through the quantized merged weight.")
    bits: Literal[4] = Field(4, description="Quantization bits (INT4).")
    group_size: int = Field(128, gt=0, description="Inputs per quantization group (must divide every layer's input size).")

    @field_validator("dropout")
    @classmethod
    def _no_dropout(cls, v):
        if v != 0:
            raise ValueError("must be 0 for qa-sparsepeft (LoRA dropout cannot act on a quantized merged weight)")
        return v

    @field_validator("group_size")
    @classmethod
    def _even(cls, v):
        if v % 2:
            raise ValueError("must be even (two 4-bit values are packed per byte)")
        return v
