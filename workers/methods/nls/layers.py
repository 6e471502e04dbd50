"""NLS's elastic LoRA layer and the per-forward rank draws (torch)."""

from __future__ import annotations

import random

import torch
import torch.nn as nn
import torch.nn.functional as F
from peft import get_peft_model
from peft.tuners.lora.layer import Linear

from workers.errors import SpecError
from workers.methods.nls.extract import group_key, strip_prefix
from workers.methods.peft_layers import sum_lora_updates


class ElasticLoraLinear(Linear):
    """PEFT's LoRA Linear with an active rank: A[:r], B[:, :r], scaling alpha/r_max."""

    nls_rank: int | None = None

    def forward(self, x, *args, **kwargs):
        r = self.nls_rank
        if r is None or self.disable_adapters or self.merged or kwargs.get("adapter_names") is not None:
            return super().forward(x, *args, **kwargs)
        return sum_lora_updates(self, x, args, kwargs, lambda name, xd: F.linear(
            F.linear(xd, self.lora_A[name].weight[:r]), self.lora_B[name].weight[:, :r]) * self.scaling[name])

    def __repr__(self) -> str:
        return "nls." + super().__repr__()


class NlsState(nn.Module):
    """The forward count the draws are a function of; a buffer, so checkpoints carry it."""

    def __init__(self):
        super().__init__()
        self.register_buffer("forwards", torch.zeros((), dtype=torch.long))


def attach_elastic(model, config, spec):
    """A PEFT model whose LoRA layers draw their rank per forward from `spec.search_space`."""
    peft_model = get_peft_model(model, config)
    layers = {n: m for n, m in peft_model.named_modules() if isinstance(m, ElasticLoraLinear)}
    if not layers:
        raise SpecError("adapter.target_modules matched no Linear layer for NLS")
    groups: dict[str, list] = {}
    for n, m in layers.items():
        groups.setdefault(group_key(strip_prefix(n), spec.group_by), []).append(m)
    state = NlsState()
    peft_model.base_model.add_module("nls_state", state)
    keys = sorted(groups)

    def draw(module, args, kwargs):
        if not module.training:  # evaluation: r_max, or the ranks set_ranks chose
            fixed = module.nls_eval_ranks or {}
            for k, ms in groups.items():
                for m in ms:
                    m.nls_rank = fixed.get(k)
            return None
        rng = random.Random(f"{spec.seed}:{int(state.forwards)}")
        for k in keys:
            r = rng.choice(spec.search_space)
            for m in groups[k]:
                m.nls_rank = r
        state.forwards += 1
        return None

    peft_model.register_forward_pre_hook(draw, with_kwargs=True)
    peft_model.nls_groups = {k: groups[k] for k in keys}
    peft_model.nls_eval_ranks = None
    return peft_model
