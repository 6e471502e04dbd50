"""NLS's elastic LoRA layer and the per-forward rank draws (torch)."""

from __future__ import annotations

import random
from pathlib import Path

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


def _rank_hook(peft_model, groups: dict[str, list], spec=None) -> None:
    """Set every elastic layer's rank before each top-level forward: in training (with `spec`) a draw
    per group, a pure function of (seed, forward count); in evaluation r_max, or the ranks
    `set_ranks` chose."""
    state = NlsState()
    peft_model.base_model.add_module("nls_state", state)
    keys = list(groups)

    def draw(module, args, kwargs):
        if not module.training or spec is None:
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
    peft_model.nls_groups = groups
    peft_model.nls_eval_ranks = None


def attach_elastic(model, config, spec):
    """A PEFT model whose LoRA layers draw their rank per forward from `spec.search_space`."""
    peft_model = get_peft_model(model, config)
    layers = {n: m for n, m in peft_model.named_modules() if isinstance(m, ElasticLoraLinear)}
    if not layers:
        raise SpecError("adapter.target_modules matched no Linear layer for NLS")
    groups: dict[str, list] = {}
    for n, m in layers.items():
        groups.setdefault(group_key(strip_prefix(n), spec.group_by), []).append(m)
    _rank_hook(peft_model, {k: groups[k] for k in sorted(groups)}, spec)
    return peft_model


def load_elastic(base, folder: Path, adapter_name: str = "default"):
    """A saved super-adapter as an elastic model: PEFT loads its LoRA files into elastic layers, grouped
    as its `elastic_adapter_config.json` says (group i = the file's i-th entry), so `set_ranks` runs it
    at any rank configuration of its space (r_max until then)."""
    import json

    from peft import LoraConfig, PeftModel

    from workers.errors import AdapterIntegrityError
    from workers.methods.nls.extract import ELASTIC_FILE
    from workers.methods.peft_layers import with_linear_layer

    folder = Path(folder)
    config = with_linear_layer(LoraConfig.from_pretrained(str(folder)), ElasticLoraLinear)
    peft_model = PeftModel.from_pretrained(base, str(folder), adapter_name=adapter_name, config=config)
    layers = {n: m for n, m in peft_model.named_modules() if isinstance(m, ElasticLoraLinear)}
    groups: dict[str, list] = {}
    for i, g in enumerate(json.loads((folder / ELASTIC_FILE).read_text())):
        members = []
        for target in g["target"]:
            module = target.rsplit(".lora_A", 1)[0]
            if module not in layers:
                raise AdapterIntegrityError(f"{folder}: {ELASTIC_FILE} names {target!r}, which the loaded model "
                                            "does not have")
            members.append(layers[module])
        groups[group_name(i)] = members
    _rank_hook(peft_model, groups)
    return peft_model


def group_name(i: int) -> str:
    return f"group {i}"
