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

from workers.errors import AdapterIntegrityError, SpecError
from workers.methods import register_method
from workers.methods.lora import lora_config
from workers.methods.qa_sparsepeft.spec import QASparsePeftSpec
from workers.methods.sparsepeft import SparsePeftMethod

QA_FILE = "qa_sparsepeft.json"


class QASparsePeftMethod(SparsePeftMethod):
    name = "qa-sparsepeft"
    spec_class = QASparsePeftSpec
    max_adapters_per_replica = 1  # merged weights are quantized against one base

    def peft_config(self, spec: QASparsePeftSpec, task: str):
        from workers.methods.peft_layers import with_linear_layer
        from workers.methods.qa_sparsepeft.layers import QALoraLinear

        return with_linear_layer(lora_config(spec, task), QALoraLinear)

    def precheck(self, model, spec: QASparsePeftSpec, task: str) -> None:
        """Every block Linear's input size must be a multiple of the group size (shapes only)."""
        from workers.int4 import check_group
        from workers.methods.qa_sparsepeft.layers import block_linears

        for name, lin in block_linears(model).items():
            try:
                check_group(lin.in_features, spec.group_size, name)
            except ValueError as exc:
                raise SpecError(f"adapter.group_size: {exc}") from None

    def attach(self, model, spec: QASparsePeftSpec, task: str, tokenizer=None, prompt_format=None):
        from peft import get_peft_model

        from workers.methods.qa_sparsepeft.layers import prepare_base, quantize_unadapted

        prepare_base(model, spec.group_size)
        peft_model = get_peft_model(model, self.peft_config(spec, task))
        quantize_unadapted(peft_model)
        return peft_model

    def write_extra(self, spec: QASparsePeftSpec, directory: Path, model=None) -> None:
        (Path(directory) / QA_FILE).write_text(json.dumps({"bits": spec.bits, "group_size": spec.group_size}) + "\n")

    def load(self, base, folder: Path, adapter_name: str = "default"):
        from peft import PeftModel

        from workers.methods.qa_sparsepeft.layers import QALoraLinear, prepare_base, quantize_unadapted
        from workers.methods.sparsepeft.layers import saved_config

        meta = Path(folder) / QA_FILE
        if not meta.is_file():
            raise AdapterIntegrityError(f"{folder}: no {QA_FILE}; not a QA-SparsePEFT adapter")
        prepare_base(base, int(json.loads(meta.read_text())["group_size"]))
        config = saved_config(folder, QALoraLinear)
        model = PeftModel.from_pretrained(base, str(folder), adapter_name=adapter_name, config=config)
        quantize_unadapted(model)
        return model

    def add(self, model, folder: Path, adapter_name: str) -> None:
        raise AdapterIntegrityError(
            "one QA-SparsePEFT adapter per replica: its merged weights are quantized against one base; deploy "
            "each as its own application"
        )

    def save_merged(self, merged, tokenizer, output: Path) -> None:
        """One packed INT4 sparse model (see workers/int4.py)."""
        from workers.int4 import save_int4_model
        from workers.methods.qa_sparsepeft.layers import quantization_params

        layers, group = quantization_params(merged)
        save_int4_model(merged, tokenizer, output, layers, group)


register_method(QASparsePeftMethod())

__all__ = ["QA_FILE", "QASparsePeftMethod", "QASparsePeftSpec"]
