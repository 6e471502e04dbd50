"""What every adapter method module provides, and the strict pydantic base for configs."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class StrictModel(BaseModel):
    """A config section: unknown keys are errors, values are validated, assignment too."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


def sum_lora_updates(layer, x, args, kwargs, update):
    """A PEFT LoRA layer's forward with a custom per-adapter term: the base layer's output plus
    `update(name, x)` for every active adapter the layer holds, in the output's dtype."""
    result = layer.base_layer(x, *args, **kwargs)
    dtype = result.dtype
    for name in layer.active_adapters:
        if name in layer.lora_A:
            xa = layer._cast_input_dtype(x, layer.lora_A[name].weight.dtype)
            result = result + update(name, layer.lora_dropout[name](xa))
    return result.to(dtype)
