"""IA3 through PEFT: learned vectors l (init 1). Ordinary targets scale the output, y = (Wx)⊙l;
`feedforward_modules` scale the input, y = W(x⊙l). Mergeable (W⊙l by rows or columns)."""

from __future__ import annotations

from workers.methods import register_method
from workers.methods.base import PEFT_TASK_TYPES, AdapterMethod, peft_fields
from workers.methods.ia3.spec import IA3Spec


class IA3Method(AdapterMethod):
    name = "ia3"
    spec_class = IA3Spec
    # PEFT's IA3 layers ignore adapter_names: one adapter per forward

    def peft_config(self, spec: IA3Spec, task: str):
        from peft import IA3Config

        return IA3Config(
            target_modules=spec.target_modules, feedforward_modules=spec.feedforward_modules,
            modules_to_save=spec.modules_to_save, init_ia3_weights=spec.init_ia3_weights,
            task_type=PEFT_TASK_TYPES[task],
        )

    def spec_from_folder(self, folder, config, tokenizer) -> dict | None:
        if not config or config.get("peft_type") != "IA3":
            return None
        return {"method": self.name, **peft_fields(config, {
            "target_modules": "target_modules", "feedforward_modules": "feedforward_modules",
            "modules_to_save": "modules_to_save"})}


register_method(IA3Method())

__all__ = ["IA3Method", "IA3Spec"]
