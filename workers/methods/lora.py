"""LoRA through PEFT: W' = W + (alpha/r)·B·A. Wrapped, never re-implemented."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from workers.methods.base import StrictModel

TASK_TYPES = {"seq-cls": "SEQ_CLS", "causal-lm": "CAUSAL_LM"}


class LoraSpec(StrictModel):
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
    bias: Literal["none", "all", "lora_only"] = "none"
    use_rslora: bool = Field(False, description="Scale by alpha/sqrt(r) instead of alpha/r.")
    init_lora_weights: bool | Literal["gaussian", "pissa", "olora"] = True

    mergeable: ClassVar[bool] = True

    replica_group: ClassVar[str] = "lora"  # one PEFT type per replica: PEFT cannot mix types

    def peft_config(self, task: str):
        from peft import LoraConfig

        return LoraConfig(
            r=self.r,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            target_modules=self.target_modules,
            modules_to_save=self.modules_to_save,
            bias=self.bias,
            use_rslora=self.use_rslora,
            init_lora_weights=self.init_lora_weights,
            task_type=TASK_TYPES[task],
        )
