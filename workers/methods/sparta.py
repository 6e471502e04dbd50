"""SpaRTA (sparse random parameter adaptation), written here; reads and writes peft-sparta's files.

A seeded draw picks each weight of every non-frozen parameter independently with probability
p = keep / (N_total - N_frozen), keep = (1 - sparsity)·N_total (the task head and any
`trainable_tokens` rows are taken out of `keep` first: they are always fully trainable). The
trainable values are float32 deltas at those indices, W = W0 + scatter(idx, Δ).

Training: each chosen parameter gets a `torch.nn.utils.parametrize` parametrization computing
W0 with (W0[idx].float() + Δ).to(dtype) written at idx, so every forward (and any recomputed
forward) sees the deltas and autograd reaches only Δ. Inference: the deltas are merged in place
(no runtime cost); the values they overwrite are kept, so unmerging restores the base exactly and
one replica can switch between adapters.

Files (peft-sparta's): `sparse_deltas.safetensors` with `indices.<param>` int32 [k, ndim] and
`deltas.<param>` float32 [k] for every parameter (empty for untouched ones); `config.json` of the
base with `sparta_pretrained_model`; for sequence classification `head_init.safetensors` (the
random head the deltas start from; key `head` as peft-sparta reads it, and one key per head
parameter). peft-sparta's pickled `*.pt` variants are read only with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal

from pydantic import Field, field_validator

from workers.errors import SpecError
from workers.methods.base import StrictModel
from workers.methods.sparta_files import unravel, write_adapter

UPSTREAM_FROZEN = ["embed_tokens", "self_attn.q", "self_attn.k", "mlp", "norm"]


class SpartaSpec(StrictModel):
    method: Literal["sparta"] = "sparta"
    sparsity: float = Field(
        0.99, gt=0, lt=1,
        description="Fraction of ALL model parameters left untrained (frozen modules included).",
    )
    frozen_modules: list[str] = Field(
        default_factory=lambda: list(UPSTREAM_FROZEN),
        description="Substrings of parameter names made entirely non-trainable (peft-sparta's default).",
    )
    trainable_tokens: list[int] | None = Field(
        None, description="Token ids whose whole embedding rows train (e.g. new special tokens)."
    )
    new_tokens: list[str] | None = Field(
        None, description="Special tokens to add: the embeddings grow and the new rows train in full; the "
        "rows' initial values and the tokenizer are saved with the adapter (peft-sparta's layout).",
    )
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the deltas during training.")
    seed: int = Field(0, description="Seed of the random index draw (the indices are saved too).")

    mergeable: ClassVar[bool] = True
    replica_group: ClassVar[str] = "sparta"

    @field_validator("trainable_tokens")
    @classmethod
    def _unique_tokens(cls, v):
        if v is not None:
            if len(set(v)) != len(v):
                raise ValueError("token ids must be unique")
            if any(t < 0 for t in v):
                raise ValueError("token ids must be >= 0")
        return v


# ------------------------------------------------------------------ which weights train
def named_parameters(model) -> dict:
    """name -> parameter, each tensor once (tied weights under their first name)."""
    return dict(model.named_parameters())


def head_names(model, task: str) -> list[str]:
    """The task head's parameters: for a sequence classifier, everything outside the backbone
    (`score` on Llama-style models, `classifier` on BERT, ...)."""
    if task != "seq-cls":
        return []
    prefix = getattr(model, "base_model_prefix", "") + "."
    names = [n for n in named_parameters(model) if not n.startswith(prefix)]
    if not names:
        names = [n for n in named_parameters(model) if n.split(".")[0] in ("score", "classifier")]
    if not names:
        raise SpecError(f"{type(model).__name__}: cannot find the classification head to train")
    return names


def _embedding_name(model) -> str | None:
    if not hasattr(model, "get_input_embeddings"):
        return None
    weight = model.get_input_embeddings().weight
    return next((n for n, p in named_parameters(model).items() if p is weight), None)


def keep_probability(sizes: dict[str, int], spec: SpartaSpec, heads: list[str], embed: str | None,
                     embed_dim: int | None) -> float:
    """p for the non-frozen parameters, so that (1 - sparsity)·N_total weights train in all."""
    total = sum(sizes.values())
    keep = (1 - spec.sparsity) * total
    head = sum(sizes[n] for n in heads)
    if head > keep:
        raise SpecError(
            f"adapter.sparsity {spec.sparsity} is too high: the classification head alone has {head} "
            f"weights; choose sparsity < {1 - head / total:.6f} to keep it fully trainable"
        )
    keep -= head
    frozen = {n for n in sizes if n not in heads and any(k in n for k in spec.frozen_modules)}
    tokens = 0
    if spec.trainable_tokens:
        tokens = len(spec.trainable_tokens) * embed_dim
        if tokens > keep:
            raise SpecError(
                f"adapter.sparsity {spec.sparsity} is too high: the {len(spec.trainable_tokens)} trainable "
                f"token rows need {tokens} weights; choose sparsity < {1 - (head + tokens) / total:.6f}"
            )
        keep -= tokens
    pool = total - head - sum(sizes[n] for n in frozen) - (tokens if embed not in frozen else 0)
    if pool <= 0 or keep / pool >= 1:
        raise SpecError(
            f"adapter.sparsity {spec.sparsity} is too low: only {max(pool, 0)} non-frozen weights to choose "
            f"{int(keep)} from; raise the sparsity or freeze fewer modules (adapter.frozen_modules)"
        )
    return keep / pool


def precheck(model, spec: SpartaSpec, task: str) -> None:
    """The sparsity bounds and token ids, from shapes alone (works on a meta-device model)."""
    params = named_parameters(model)
    heads = head_names(model, task)
    embed = _embedding_name(model)
    if spec.trainable_tokens and embed is not None:
        vocab = params[embed].shape[0]
        bad = [t for t in spec.trainable_tokens if t >= vocab]
        if bad:
            raise SpecError(f"adapter.trainable_tokens {bad} are outside the vocabulary (size {vocab})")
    keep_probability({n: p.numel() for n, p in params.items()}, spec, heads, embed,
                     params[embed].shape[1] if embed else None)


def draw_indices(model, spec: SpartaSpec, task: str) -> dict:
    """name -> flat int64 indices of the trainable weights (None = the whole tensor: the head)."""
    import torch

    params = named_parameters(model)
    heads = head_names(model, task)
    for n in heads:
        hit = [k for k in spec.frozen_modules if k in n]
        if hit:
            raise SpecError(f"adapter.frozen_modules {hit} would freeze the classification head {n!r}; "
                            "the head always trains: remove them")
    embed = _embedding_name(model)
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


# ------------------------------------------------------------------ training form
def _delta_class():
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

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

    return SparseDelta


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


def _train_model_class():
    import torch
    import torch.nn as nn
    from torch.nn.utils import parametrize

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
            cls = _delta_class()
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

    return SpartaTrainModel


def attach(model, spec: SpartaSpec, task: str, tokenizer=None, prompt_format=None):
    rows = None
    if spec.new_tokens:
        from workers.methods.alora import add_new_tokens

        if tokenizer is None:
            raise SpecError("adapter.new_tokens needs the tokenizer")
        ids = add_new_tokens(model, tokenizer, spec.new_tokens)
        rows = model.get_input_embeddings().weight[-len(ids):].detach().clone()
        spec = spec.model_copy(update={"trainable_tokens": (spec.trainable_tokens or []) + ids})
    wrapped = _train_model_class()(model, spec, task)
    if rows is not None:
        wrapped.new_rows, wrapped.new_tokenizer = rows, tokenizer
    return wrapped


def load(base, folder: str, adapter_name: str = "default"):
    """A saved SpaRTA adapter (ours or peft-sparta's) merged into `base`."""
    from workers.methods.sparta_inference import model_class

    task = "seq-cls" if head_names_or_none(base) else "causal-lm"
    model = model_class()(base, task)
    model.load_adapter(folder, adapter_name)
    return model


def head_names_or_none(base) -> list[str]:
    try:
        return head_names(base, "seq-cls") if _is_seq_cls(base) else []
    except SpecError:
        return []


def _is_seq_cls(model) -> bool:
    return type(model).__name__.endswith("ForSequenceClassification")
