"""Helpers for methods whose layers subclass PEFT's LoRA layers (torch-free at import)."""

from __future__ import annotations


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


def with_linear_layer(config, layer_class):
    """A PEFT LoRA config whose Linear targets are built as `layer_class` (a subclass of PEFT's
    LoRA Linear), through PEFT's custom-module hook."""
    import torch.nn as nn

    config._register_custom_module({nn.Linear: layer_class})
    return config
