"""Monte-Carlo outputs of a PVeRA adapter: with z = μ + ε·σ drawn at inference, N forward passes
give per-output means and 95 % confidence intervals (mean ± 1.96·sd/√N) — for a classifier the
probability of each class, for a causal LM the log-probability of each next token."""

from __future__ import annotations

import contextlib
import math


@contextlib.contextmanager
def sampling(model, adapter_name: str = "default"):
    """Switch every PVeRA layer of `model` to sampling at inference for the duration."""
    layers = [m for m in model.modules() if hasattr(m, "sample_at_inference") and hasattr(m, "pvera_lambda_d")]
    if not layers:
        raise ValueError("Monte-Carlo outputs need a PVeRA adapter; this model has no PVeRA layer")
    saved = [m.sample_at_inference.get(adapter_name) for m in layers]
    for m in layers:
        m.sample_at_inference[adapter_name] = True
    try:
        yield
    finally:
        for m, s in zip(layers, saved):
            m.sample_at_inference[adapter_name] = s


def mc_outputs(model, batch: dict, samples: int, seed: int, task: str, adapter_name: str = "default") -> dict:
    """{'mean', 'low', 'high', 'std'} tensors: class probabilities [n, labels] (seq-cls) or
    next-token log-probabilities [n, seq, vocab] (causal-lm)."""
    import torch

    if samples < 2:
        raise ValueError("samples must be at least 2 for a confidence interval")
    torch.manual_seed(seed)
    draws = []
    model.eval()
    with torch.no_grad(), sampling(model, adapter_name):
        for _ in range(samples):
            logits = model(**batch).logits.float()
            draws.append(torch.softmax(logits, -1) if task == "seq-cls" else torch.log_softmax(logits, -1))
    stack = torch.stack(draws)
    mean, std = stack.mean(0), stack.std(0)
    half = 1.96 * std / math.sqrt(samples)
    return {"mean": mean, "std": std, "low": mean - half, "high": mean + half, "samples": samples}
