"""SparsePEFT (SQFT): LoRA whose update is masked by the base weight's non-zeros,
y = Wx + ((s·B·A) ⊙ M) x with M = (W != 0) and s = alpha/r. Merging W' = W + (s·B·A) ⊙ M keeps
exactly the base's zero pattern, so a Wanda-sparse base stays sparse after merging.

Built on PEFT's LoRA through its custom-module hook: the saved files are PEFT LoRA files, and the
manifest's method `sparsepeft` tells our loader to restore the mask (stock PEFT would load the
update unmasked).
"""

from __future__ import annotations

from typing import ClassVar, Literal

from workers.methods.lora import LoraSpec


class SparsePeftSpec(LoraSpec):
    method: Literal["sparsepeft"] = "sparsepeft"  # type: ignore[assignment]
    replica_group: ClassVar[str] = "sparsepeft"  # masks every LoRA layer of the replica's base

    def peft_config(self, task: str):
        import torch.nn as nn

        config = super().peft_config(task)
        config._register_custom_module({nn.Linear: _sparse_linear_class()})
        return config


_CLASS = None


def _sparse_linear_class():
    """PEFT's LoRA Linear with the update masked by the base weight's non-zeros (built lazily so
    importing this module needs no torch)."""
    global _CLASS
    if _CLASS is not None:
        return _CLASS
    import torch.nn.functional as F
    from peft.tuners.lora.layer import Linear

    from workers.methods.base import sum_lora_updates

    class SparseLoraLinear(Linear):
        def _mask(self):
            return self.get_base_layer().weight != 0

        def get_delta_weight(self, adapter):
            delta = super().get_delta_weight(adapter)
            mask = self._mask()
            return delta * (mask.T if self.fan_in_fan_out else mask).to(delta.dtype)

        def forward(self, x, *args, **kwargs):
            if self.disable_adapters or self.merged or kwargs.get("adapter_names") is not None:
                return super().forward(x, *args, **kwargs)
            return sum_lora_updates(self, x, args, kwargs, lambda name, xd: F.linear(xd, self.get_delta_weight(name)))

        def __repr__(self) -> str:
            return "sparsepeft." + super().__repr__()

    _CLASS = SparseLoraLinear
    return _CLASS


def _saved_config(folder: str):
    import torch.nn as nn
    from peft import LoraConfig

    config = LoraConfig.from_pretrained(folder)
    config._register_custom_module({nn.Linear: _sparse_linear_class()})
    return config


def load(base, folder: str, adapter_name: str = "default"):
    """A saved SparsePEFT adapter on `base`, with the mask restored."""
    from peft import PeftModel

    return PeftModel.from_pretrained(base, folder, adapter_name=adapter_name, config=_saved_config(folder))


def add(peft_model, folder: str, adapter_name: str) -> None:
    """One more saved SparsePEFT adapter on a PeftModel that already holds one."""
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    peft_model.add_adapter(adapter_name, _saved_config(folder))
    set_peft_model_state_dict(peft_model, load_file(f"{folder}/adapter_model.safetensors"), adapter_name=adapter_name)
