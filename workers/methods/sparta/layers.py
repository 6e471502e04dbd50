"""SpaRTA's training form (torch): the seeded draw of trainable weights, and a model whose chosen
weights carry a `torch.nn.utils.parametrize` delta each."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import parametrize

from workers.errors import SpecError
from workers.methods.sparta.files import unravel, write_adapter
from workers.methods.sparta.selection import embedding_name, head_names, keep_probability, named_parameters
from workers.methods.sparta.spec import SpartaSpec


def draw_indices(model, spec: SpartaSpec, task: str) -> dict:
    """name -> flat int64 indices of the trainable weights (None = the whole tensor: the head)."""
    params = named_parameters(model)
    heads = head_names(model, task)
    for n in heads:
        hit = [k for k in spec.frozen_modules if k in n]
        if hit:
            raise SpecError(f"adapter.frozen_modules {hit} would freeze the classification head {n!r}; "
                            "the head always trains: remove them")
    embed = embedding_name(model)
    if spec.trainable_tokens:
        if embed is None:
            raise SpecError("adapter.trainable_tokens needs a model with input embeddings")
        vocab = params[embed].shape[0]
        bad = [t for t in spec.trainable_tokens if t >= vocab]
        if bad:
            raise SpecError(f"adapter.trainable_tokens {bad} are outside the vocabulary (size {vocab})")
    sizes = {n: p.numel() for n, p in params.items()}
    embed_dim = params[embed].shape[1] if embed else None
    p_keep = keep_probability(sizes, spec, heads, embed, embed_dim)
    gen = torch.Generator().manual_seed(spec.seed)
    out = {}
    for name, param in params.items():
        if name in heads:
            out[name] = None
            continue
        frozen = any(k in name for k in spec.frozen_modules)
        if frozen:
            mask = torch.zeros(param.shape, dtype=torch.bool)
        else:
            mask = torch.bernoulli(torch.full(param.shape, p_keep), generator=gen).bool()
        if name == embed and spec.trainable_tokens:
            mask[spec.trainable_tokens] = True
        out[name] = mask.reshape(-1).nonzero().squeeze(1)
    return out


class SparseDelta(nn.Module):
    """Parametrization: W0 with (W0[idx].float() + Δ).to(dtype) at idx (all of W for a head)."""

    def __init__(self, flat, numel: int, dropout: float):
        super().__init__()
        k = numel if flat is None else flat.numel()
        self.delta = nn.Parameter(torch.zeros(k, dtype=torch.float32))
        self.register_buffer("flat", flat, persistent=True)
        self.p = dropout

    def forward(self, w):
        d = F.dropout(self.delta, self.p, self.training) if self.p else self.delta
        if self.flat is None:
            return (w.float() + d.view(w.shape)).to(w.dtype)
        fw = w.reshape(-1)
        vals = (fw[self.flat].float() + d).to(w.dtype)
        return fw.index_put((self.flat,), vals).view(w.shape)



def _module_and_attr(model, name: str):
    mod_name, _, attr = name.rpartition(".")
    return (model.get_submodule(mod_name) if mod_name else model), attr


def _occurrences(model) -> dict:
    """name (first) -> every (module, attribute) holding that tensor: tied weights share a delta."""
    first, by_id = {}, {}
    for n, p in model.named_parameters(remove_duplicate=False):
        key = by_id.setdefault(id(p), n)
        first.setdefault(key, []).append(_module_and_attr(model, n))
    return first


class SpartaTrainModel(nn.Module):
    """A model with SpaRTA deltas attached, in its training form."""

    def __init__(self, model, spec: SpartaSpec, task: str):
        super().__init__()
        self.base_model = model
        self.task = task
        self.spec = spec
        params = named_parameters(model)
        self.shapes = {n: tuple(p.shape) for n, p in params.items()}
        self.total_params = sum(p.numel() for p in params.values())
        self.heads = head_names(model, task)
        draws = draw_indices(model, spec, task)
        for p in model.parameters():
            p.requires_grad_(False)
        self.head_init = {n: params[n].detach().clone() for n in self.heads}
        cls = SparseDelta
        self._deltas = {}
        occurrences = _occurrences(model)
        for name, flat in draws.items():
            if flat is not None and flat.numel() == 0:
                continue
            mod = cls(flat, params[name].numel(), spec.dropout).to(params[name].device)
            for module, attr in occurrences[name]:
                parametrize.register_parametrization(module, attr, mod, unsafe=True)
            self._deltas[name] = mod
        self.config = getattr(model, "config", None)

    def forward(self, *args, **kwargs):
        return self.base_model(*args, **kwargs)

    def generate(self, *args, **kwargs):
        return self.base_model.generate(*args, **kwargs)

    def parameter_counts(self) -> tuple[int, int]:
        trainable = sum(m.delta.numel() for m in self._deltas.values())
        return trainable, self.total_params

    def print_trainable_parameters(self) -> None:
        t, n = self.parameter_counts()
        print(f"trainable params: {t:,d} || all params: {n:,d} || trainable%: {100 * t / n:.5f}%")

    def sparse_state(self) -> tuple[dict, dict]:
        """(indices, deltas) per parameter name in peft-sparta's layout."""
        indices, deltas = {}, {}
        for name, shape in self.shapes.items():
            mod = self._deltas.get(name)
            if mod is None:
                indices[name] = torch.empty((0, len(shape)), dtype=torch.int32)
                deltas[name] = torch.empty((0,), dtype=torch.float32)
                continue
            flat = torch.arange(mod.delta.numel()) if mod.flat is None else mod.flat.cpu()
            indices[name] = unravel(flat, shape)
            deltas[name] = mod.delta.detach().float().cpu().reshape(-1).clone()
        return indices, deltas

    def save_pretrained(self, directory, safe_serialization: bool = True, **_):
        indices, deltas = self.sparse_state()
        write_adapter(Path(directory), self.base_model, self.task, indices, deltas,
                      {n: t.cpu() for n, t in self.head_init.items()}, self.spec,
                      new_rows=getattr(self, "new_rows", None), tokenizer=getattr(self, "new_tokenizer", None))

    @torch.no_grad()
    def merge_and_unload(self):
        """The base with the deltas written into its weights (parametrizations removed)."""
        for module in list(self.base_model.modules()):
            if parametrize.is_parametrized(module):
                for attr in list(module.parametrizations.keys()):
                    parametrize.remove_parametrizations(module, attr, leave_parametrized=True)
        self._deltas = {}
        return self.base_model
