"""LoRA through PEFT: W' = W + (alpha/r)·B·A. Wrapped, never re-implemented."""

from __future__ import annotations

from workers.methods import register_method
from workers.methods.base import PEFT_TASK_TYPES, AdapterMethod, peft_fields
from workers.methods.lora.spec import LoraSpec


def lora_config(spec: LoraSpec, task: str, r: int | None = None):
    """PEFT's LoraConfig for a LoRA-shaped spec (LoRA and the methods built on its layers)."""
    from peft import LoraConfig

    return LoraConfig(
        r=r or spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout, target_modules=spec.target_modules,
        modules_to_save=spec.modules_to_save, bias=spec.bias, use_rslora=spec.use_rslora,
        init_lora_weights=spec.init_lora_weights, task_type=PEFT_TASK_TYPES[task],
        rank_pattern=dict(spec.rank_pattern or {}), alpha_pattern=dict(spec.alpha_pattern or {}),
    )


class LoraMethod(AdapterMethod):
    name = "lora"
    spec_class = LoraSpec
    shares_forward = True  # PEFT's mixed-batch forward; proven per row in tests/test_methods.py

    def peft_config(self, spec: LoraSpec, task: str):
        return lora_config(spec, task)

    def spec_from_folder(self, folder, config, tokenizer) -> dict | None:
        if not config or config.get("peft_type") != "LORA" or config.get("alora_invocation_tokens"):
            return None
        return {"method": self.name, **peft_fields(config, LORA_KEYS)}


# spec key -> the key PEFT saves in adapter_config.json
LORA_KEYS = {"r": "r", "alpha": "lora_alpha", "dropout": "lora_dropout", "target_modules": "target_modules",
             "modules_to_save": "modules_to_save", "bias": "bias", "use_rslora": "use_rslora",
             "rank_pattern": "rank_pattern", "alpha_pattern": "alpha_pattern"}


register_method(LoraMethod())

__all__ = ["LoraMethod", "LoraSpec", "lora_config"]
