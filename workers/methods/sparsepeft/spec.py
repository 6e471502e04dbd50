"""SparsePEFT's spec (no torch): LoRA's fields."""

from __future__ import annotations

from typing import Literal

from workers.methods.lora.spec import LoraSpec


class SparsePeftSpec(LoraSpec):
    method: Literal["sparsepeft"] = "sparsepeft"  # type: ignore[assignment]
