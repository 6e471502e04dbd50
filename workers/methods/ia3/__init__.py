"""IA3 through PEFT: learned vectors l (init 1). Ordinary targets scale the output, y = (Wx)⊙l;
`feedforward_modules` scale the input, y = W(x⊙l). Mergeable (W⊙l by rows or columns)."""

from __future__ import annotations

from workers.methods import register_method
from workers.methods.base import PEFT_TASK_TYPES, AdapterMethod
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


register_method(IA3Method())

__all__ = ["IA3Method", "IA3Spec"]
