"""QA-SparsePEFT (SQFT): SparsePEFT trained against the INT4 model it will be merged into.

Every Linear of the model's blocks gets fixed INT4 group-wise scales and zero points from its base
weight (round-to-nearest, `workers.int4`). Layers without an adapter are quantized in place; an
adapted layer computes its merged weight W' = W + (s·B·A) ⊙ M (M = W != 0), fake-quantizes it,
W_q = s_g·(clamp(round(W'/s_g + z), 0, 15) - z), and uses W' + (W_q - W').detach() (straight-through
estimator) in the forward. Merging writes W_q itself: one INT4 sparse model (`adapterflow merge`
packs it, see `workers/int4.py`), whose outputs are what training and evaluation saw.

Files: PEFT LoRA files plus `qa_sparsepeft.json` (bits, group size); the manifest's method tells
the loader to rebuild the quantized base and the fake-quantized layers.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import ClassVar, Literal

from pydantic import Field, field_validator

from workers.errors import AdapterIntegrityError
from workers.methods.sparsepeft import SparsePeftSpec, _sparse_linear_class

QA_FILE = "qa_sparsepeft.json"


class QASparsePeftSpec(SparsePeftSpec):
    method: Literal["qa-sparsepeft"] = "qa-sparsepeft"  # type: ignore[assignment]
    dropout: float = Field(0.0, description="Must be 0: the update acts through the quantized merged weight.")
    bits: Literal[4] = Field(4, description="Quantization bits (INT4).")
    group_size: int = Field(128, gt=0, description="Inputs per quantization group (must divide every layer's input size).")

    replica_group: ClassVar[str] = "qa-sparsepeft"

    @field_validator("dropout")
    @classmethod
    def _no_dropout(cls, v):
        if v != 0:
            raise ValueError("must be 0 for qa-sparsepeft (LoRA dropout cannot act on a quantized merged weight)")
        return v

    @field_validator("group_size")
    @classmethod
    def _even(cls, v):
        if v % 2:
            raise ValueError("must be even (two 4-bit values are packed per byte)")
        return v

    def peft_config(self, task: str):
        import torch.nn as nn

        config = super().peft_config(task)
        config._register_custom_module({nn.Linear: _qa_linear_class()})
        return config


_CLASS = None


def _qa_linear_class():
    global _CLASS
    if _CLASS is not None:
        return _CLASS
    import torch.nn.functional as F

    from workers.int4 import fake_quant, fake_quant_ste

    class QALoraLinear(_sparse_linear_class()):
        def _merged_weight(self):
            base = self.get_base_layer()
            w = base.weight
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
            import torch

            base = self.get_base_layer()
            with torch.no_grad():
                wq = fake_quant(self._merged_weight().float(), base.qa_scales, base.qa_zeros, base.qa_group)
                base.weight.data = wq.to(base.weight.dtype)
            self.merged_adapters.extend(a for a in self.active_adapters if a in self.lora_A)

        def unmerge(self) -> None:
            raise RuntimeError("a QA-SparsePEFT merge is quantized and cannot be undone; reload the base")

        def __repr__(self) -> str:
            return "qa-" + super().__repr__()

    _CLASS = QALoraLinear
    return _CLASS


def _block_linears(model) -> dict:
    import torch.nn as nn

    from workers.wanda import find_blocks

    prefix, blocks = find_blocks(model)
    return {f"{prefix}.{i}.{n}": m for i, block in enumerate(blocks)
            for n, m in block.named_modules() if isinstance(m, nn.Linear)}


def precheck(model, spec: QASparsePeftSpec, task: str) -> None:
    """Every block Linear's input size must be a multiple of the group size (shapes only)."""
    from workers.errors import SpecError
    from workers.int4 import check_group

    for name, lin in _block_linears(model).items():
        try:
            check_group(lin.in_features, spec.group_size, name)
        except ValueError as exc:
            raise SpecError(f"adapter.group_size: {exc}") from None


def prepare_base(model, group_size: int) -> None:
    """Fixed INT4 scales and zero points on every block Linear, from its (unquantized) base weight."""
    from workers.int4 import check_group, qparams

    for name, lin in _block_linears(model).items():
        if hasattr(lin, "qa_scales"):
            continue
        check_group(lin.in_features, group_size, name)
        scales, zeros = qparams(lin.weight, group_size)
        lin.register_buffer("qa_scales", scales.to(lin.weight.device), persistent=False)
        lin.register_buffer("qa_zeros", zeros.to(lin.weight.device), persistent=False)
        lin.qa_group = group_size


def quantize_unadapted(peft_model) -> int:
    """Quantize in place every prepared Linear that carries no adapter; returns how many."""
    import torch

    from workers.int4 import fake_quant

    adapted = {id(m.get_base_layer()) for m in peft_model.modules() if isinstance(m, _qa_linear_class())}
    n = 0
    with torch.no_grad():
        for m in peft_model.modules():
            if isinstance(m, torch.nn.Linear) and hasattr(m, "qa_scales") and id(m) not in adapted \
                    and not getattr(m, "qa_done", False):
                m.weight.data = fake_quant(m.weight.float(), m.qa_scales, m.qa_zeros, m.qa_group).to(m.weight.dtype)
                m.qa_done = True
                n += 1
    return n


def attach(model, spec: QASparsePeftSpec, task: str, tokenizer=None, prompt_format=None):
    from peft import get_peft_model

    prepare_base(model, spec.group_size)
    peft_model = get_peft_model(model, spec.peft_config(task))
    quantize_unadapted(peft_model)
    return peft_model


def write_extra(spec: QASparsePeftSpec, directory: Path, model=None) -> None:
    (Path(directory) / QA_FILE).write_text(json.dumps({"bits": spec.bits, "group_size": spec.group_size}) + "\n")


def load(base, folder: str, adapter_name: str = "default"):
    import torch.nn as nn
    from peft import LoraConfig, PeftModel

    meta = Path(folder) / QA_FILE
    if not meta.is_file():
        raise AdapterIntegrityError(f"{folder}: no {QA_FILE}; not a QA-SparsePEFT adapter")
    group = int(json.loads(meta.read_text())["group_size"])
    prepare_base(base, group)
    config = LoraConfig.from_pretrained(folder)
    config._register_custom_module({nn.Linear: _qa_linear_class()})
    model = PeftModel.from_pretrained(base, folder, adapter_name=adapter_name, config=config)
    quantize_unadapted(model)
    return model


def add(model, folder: str, adapter_name: str) -> None:
    raise AdapterIntegrityError(
        "one QA-SparsePEFT adapter per replica: its merged weights are quantized against one base; deploy "
        "each as its own application"
    )
