"""QA-SparsePEFT's layer and base preparation (torch)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from workers.errors import AdapterIntegrityError
from workers.int4 import check_group, fake_quant, fake_quant_ste, qparams
from workers.methods.sparsepeft.layers import SparseLoraLinear
from workers.wanda import find_blocks


class QALoraLinear(SparseLoraLinear):
    def _merged_weight(self):
        w = self.get_base_layer().weight
        for name in self.active_adapters:
            if name in self.lora_A:
                w = w + self.get_delta_weight(name)
        return w

    def forward(self, x, *args, **kwargs):
        if self.disable_adapters or self.merged:
            return self.base_layer(x, *args, **kwargs)
        base = self.get_base_layer()
        wq = fake_quant_ste(self._merged_weight(), base.qa_scales, base.qa_zeros, base.qa_group)
        bias = base.bias
        return F.linear(x, wq.to(x.dtype), None if bias is None else bias.to(x.dtype))

    def merge(self, safe_merge: bool = False, adapter_names=None) -> None:
        base = self.get_base_layer()
        with torch.no_grad():
            wq = fake_quant(self._merged_weight().float(), base.qa_scales, base.qa_zeros, base.qa_group)
            base.weight.data = wq.to(base.weight.dtype)
        self.merged_adapters.extend(a for a in self.active_adapters if a in self.lora_A)

    def unmerge(self) -> None:
        raise AdapterIntegrityError("a QA-SparsePEFT merge is quantized and cannot be undone; reload the base")

    def __repr__(self) -> str:
        return "qa-" + super().__repr__()


def block_linears(model) -> dict:
    prefix, blocks = find_blocks(model)
    return {f"{prefix}.{i}.{n}": m for i, block in enumerate(blocks)
            for n, m in block.named_modules() if isinstance(m, nn.Linear)}


def prepare_base(model, group_size: int) -> None:
    """Fixed INT4 scales and zero points on every block Linear, from its (unquantized) base weight."""
    for name, lin in block_linears(model).items():
        if hasattr(lin, "qa_scales"):
            continue
        check_group(lin.in_features, group_size, name)
        scales, zeros = qparams(lin.weight, group_size)
        lin.register_buffer("qa_scales", scales.to(lin.weight.device), persistent=False)
        lin.register_buffer("qa_zeros", zeros.to(lin.weight.device), persistent=False)
        lin.qa_group = group_size


def quantize_unadapted(peft_model) -> int:
    """Quantize in place every prepared Linear that carries no adapter; returns how many."""
    adapted = {id(m.get_base_layer()) for m in peft_model.modules() if isinstance(m, QALoraLinear)}
    n = 0
    with torch.no_grad():
        for m in peft_model.modules():
            if isinstance(m, nn.Linear) and hasattr(m, "qa_scales") and id(m) not in adapted \
                    and not getattr(m, "qa_done", False):
                m.weight.data = fake_quant(m.weight.float(), m.qa_scales, m.qa_zeros, m.qa_group).to(m.weight.dtype)
                m.qa_done = True
                n += 1
    return n


def quantization_params(model) -> tuple[dict, int]:
    """(name -> (scales, zeros), group size) of every prepared Linear of `model` (e.g. merged)."""
    layers = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and hasattr(m, "qa_scales")}
    group = next(iter(layers.values())).qa_group if layers else 0
    return {n: (m.qa_scales, m.qa_zeros) for n, m in layers.items()}, group
