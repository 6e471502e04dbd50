"""Adapter methods: one module per method, one registry line per method.

A method module defines a pydantic spec class (its `method` field is the registry name). A spec
with `peft_config(task)` is attached with PEFT's `get_peft_model`; a module that needs more (the
tokenizer, say) defines `attach(model, spec, task, tokenizer=..., prompt_format=...)`. Loading a saved adapter goes through PEFT's own
`PeftModel.from_pretrained` for every PEFT-backed method.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from workers.errors import SpecError
from workers.methods.alora import ALoraSpec
from workers.methods.ia3 import IA3Spec
from workers.methods.lora import LoraSpec
from workers.methods.nls import NlsSpec
from workers.methods.pvera import PveraSpec
from workers.methods.qa_sparsepeft import QASparsePeftSpec
from workers.methods.sparsepeft import SparsePeftSpec
from workers.methods.sparta import SpartaSpec

# name -> (spec class, module path). Adding a method = one module + one line here.
REGISTRY: dict[str, tuple[type, str]] = {
    "lora": (LoraSpec, "workers.methods.lora"),
    "ia3": (IA3Spec, "workers.methods.ia3"),
    "pvera": (PveraSpec, "workers.methods.pvera"),
    "sparsepeft": (SparsePeftSpec, "workers.methods.sparsepeft"),
    "alora": (ALoraSpec, "workers.methods.alora"),
    "sparta": (SpartaSpec, "workers.methods.sparta"),
    "qa-sparsepeft": (QASparsePeftSpec, "workers.methods.qa_sparsepeft"),
    "nls": (NlsSpec, "workers.methods.nls"),
}


def spec_classes() -> tuple[type, ...]:
    return tuple(cls for cls, _ in REGISTRY.values())


def method_module(name: str) -> ModuleType:
    try:
        _, path = REGISTRY[name]
    except KeyError:
        raise SpecError(
            f"adapter.method: unknown method {name!r}; known methods: {', '.join(sorted(REGISTRY))}"
        ) from None
    return importlib.import_module(path)


def attach(model, spec, task: str, tokenizer=None, prompt_format: str | None = None):
    """Wrap `model` in a PEFT model with a fresh adapter; only the adapter (and the head) train."""
    module = method_module(spec.method)
    if hasattr(module, "attach"):
        return module.attach(model, spec, task, tokenizer=tokenizer, prompt_format=prompt_format)
    from peft import get_peft_model

    return get_peft_model(model, spec.peft_config(task))


def load(base, folder, method: str, adapter_name: str = "default"):
    """A saved adapter on `base`: the method's own loader when it has one, else PEFT's."""
    module = method_module(method)
    if hasattr(module, "load"):
        return module.load(base, str(folder), adapter_name)
    from peft import PeftModel

    return PeftModel.from_pretrained(base, str(folder), adapter_name=adapter_name)


def add(model, folder, method: str, adapter_name: str) -> None:
    """One more saved adapter on a model that already holds some (same replica group)."""
    module = method_module(method)
    if hasattr(module, "add"):
        module.add(model, str(folder), adapter_name)
    else:
        model.load_adapter(str(folder), adapter_name=adapter_name)
