"""SparsePEFT (SQFT): LoRA whose update is masked by the base weight's non-zeros,
y = Wx + ((s·B·A) ⊙ M) x with M = (W != 0) and s = alpha/r. Merging W' = W + (s·B·A) ⊙ M keeps
exactly the base's zero pattern, so a Wanda-sparse base stays sparse after merging.

Built on PEFT's LoRA through its custom-module hook: the saved files are PEFT LoRA files, and the
manifest's method `sparsepeft` tells our loader to restore the mask (stock PEFT would load the
update unmasked).
"""

from __future__ import annotations

from pathlib import Path

from workers.methods import register_method
from workers.methods.base import AdapterMethod
from workers.methods.lora import lora_config
from workers.methods.sparsepeft.spec import SparsePeftSpec


class SparsePeftMethod(AdapterMethod):
    name = "sparsepeft"
    spec_class = SparsePeftSpec
    zero3 = False  # the mask reads the whole base weight outside the base layer's forward
    # shares_forward stays False: with adapter_names the layer runs PEFT's unmasked LoRA forward

    def zero3_refusal(self) -> str:
        return (f"adapter.method {self.name} reads whole base weights outside their layers' forward, which "
                "ZeRO-3 partitions; use train.zero_stage 2 (or 0/1) with it")

    def peft_config(self, spec: SparsePeftSpec, task: str):
        from workers.methods.peft_layers import with_linear_layer
        from workers.methods.sparsepeft.layers import SparseLoraLinear

        return with_linear_layer(lora_config(spec, task), SparseLoraLinear)

    def load(self, base, folder: Path, adapter_name: str = "default"):
        """A saved SparsePEFT adapter on `base`, with the mask restored."""
        from peft import PeftModel

        from workers.methods.sparsepeft.layers import saved_config

        return PeftModel.from_pretrained(base, str(folder), adapter_name=adapter_name, config=saved_config(folder))

    def add(self, model, folder: Path, adapter_name: str) -> None:
        from peft.utils import set_peft_model_state_dict
        from safetensors.torch import load_file

        from workers.methods.sparsepeft.layers import saved_config

        model.add_adapter(adapter_name, saved_config(folder))
        set_peft_model_state_dict(model, load_file(str(folder / "adapter_model.safetensors")), adapter_name=adapter_name)


register_method(SparsePeftMethod())

__all__ = ["SparsePeftMethod", "SparsePeftSpec"]
