"""Which weights SpaRTA trains: the head, the frozen modules, the keep probability (shapes only,
no torch at import: the pre-check runs on a meta-device model)."""

from __future__ import annotations

from workers.common import task_of
from workers.errors import SpecError
from workers.methods.sparta.spec import SpartaSpec


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


def embedding_name(model) -> str | None:
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
    embed = embedding_name(model)
    if spec.trainable_tokens and embed is not None:
        vocab = params[embed].shape[0]
        bad = [t for t in spec.trainable_tokens if t >= vocab]
        if bad:
            raise SpecError(f"adapter.trainable_tokens {bad} are outside the vocabulary (size {vocab})")
    keep_probability({n: p.numel() for n, p in params.items()}, spec, heads, embed,
                     params[embed].shape[1] if embed else None)


def head_names_or_none(base) -> list[str]:
    """The head of a loaded sequence classifier, [] for anything else."""
    try:
        return head_names(base, "seq-cls") if task_of(base) == "seq-cls" else []
    except SpecError:
        return []
