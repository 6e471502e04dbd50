"""IA3's spec (no torch)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from workers.methods.base import MethodSpec


class IA3Spec(MethodSpec):
    method: Literal["ia3"] = "ia3"
    target_modules: list[str] | None = Field(
        None, description="Modules to scale; null = PEFT's default (Llama: k_proj, v_proj, down_proj)."
    )
    feedforward_modules: list[str] | None = Field(
        None, description="Targets whose input (not output) is scaled; must be among target_modules."
    )
    modules_to_save: list[str] | None = Field(
        None, description="Extra modules trained in full (the task head is added for seq-cls)."
    )
    init_ia3_weights: bool = Field(True, description="Start every vector at 1 (the identity).")

    @model_validator(mode="after")
    def _check(self):
        if self.feedforward_modules is not None:
            if self.target_modules is None:
                raise ValueError("adapter.feedforward_modules needs adapter.target_modules listing them too")
            missing = [m for m in self.feedforward_modules if m not in self.target_modules]
            if missing:
                raise ValueError(
                    f"adapter.feedforward_modules {missing} are not among adapter.target_modules "
                    f"{self.target_modules}; every feed-forward module must also be a target"
                )
        return self
