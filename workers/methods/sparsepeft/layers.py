"""SparsePEFT's layer: PEFT's LoRA Linear with the update masked by the base weight's non-zeros."""

from __future__ import annotations

import torch.nn.functional as F
from peft import LoraConfig
from peft.tuners.lora.layer import Linear

from workers.methods.peft_layers import sum_lora_updates, with_linear_layer


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


def saved_config(folder, layer_class=SparseLoraLinear):
    """The saved adapter's LoraConfig with `layer_class` restored on its Linear targets."""
    return with_linear_layer(LoraConfig.from_pretrained(str(folder)), layer_class)
