"""LoRA's spec (no torch): W' = W + (alpha/r)·B·A."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from workers.methods.base import MethodSpec


class LoraSpec(MethodSpec):
    method: Literal["lora"] = "lora"
    r: int = Field(8, gt=0, description="Rank of the update B·A.")
    alpha: float = Field(16.0, gt=0, description="Scale numerator: the update is (alpha/r)·B·A.")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the LoRA input.")
    target_modules: list[str] | Literal["all-linear"] | None = Field(
        None, description="Module names to adapt; null = PEFT's default for the architecture."
    )
    modules_to_save: list[str] | None = Field(
        None, description="Extra modules trained in full (the task head is added for seq-cls)."
    )
    bias: Literal["none", "all", "lora_only"] = Field("none", description="Which biases train.")
    use_rslora: bool = Field(False, description="Scale by alpha/sqrt(r) instead of alpha/r.")
    rank_pattern: dict[str, int] | None = Field(
        None, description="Per-module ranks, PEFT's rank_pattern: module name (or regex) -> rank, overriding r.")
    alpha_pattern: dict[str, float] | None = Field(
        None, description="Per-module alphas, PEFT's alpha_pattern: module name (or regex) -> alpha, overriding alpha.")
    init_lora_weights: bool | Literal["gaussian", "pissa", "olora"] = Field(
        True, description="PEFT's LoRA initialisation (true, gaussian, pissa, olora).")
