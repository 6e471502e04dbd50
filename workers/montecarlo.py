"""Monte-Carlo outputs of an adapter whose method samples at inference (`monte_carlo`, e.g. PVeRA's
z = μ + ε·σ): N forward passes give per-output means and 95 % confidence intervals
(mean ± 1.96·sd/√N) — for a classifier the probability of each class, for a causal LM the
log-probability of each next token. The method switches its layers to sampling (`method.sampling`)."""

from __future__ import annotations

import math

from workers.errors import WrongTaskError


def mc_outputs(model, batch: dict, samples: int, seed: int, task: str, method, adapter_name: str = "default",
               reduce=None) -> dict:
    """{'mean', 'low', 'high', 'std'} tensors: class probabilities [n, labels] (seq-cls) or
    next-token log-probabilities [n, seq, vocab] (causal-lm); `reduce` maps each draw first
    (e.g. to the log-probabilities of the tokens that matter, so N draws fit in memory)."""
    import torch

    if samples < 2:
        raise WrongTaskError("samples: a confidence interval needs at least 2 samples (0 = mean only)")
    torch.manual_seed(seed)
    draws = []
    model.eval()
    with torch.no_grad(), method.sampling(model, adapter_name):
        for _ in range(samples):
            logits = model(**batch).logits.float()
            out = torch.softmax(logits, -1) if task == "seq-cls" else torch.log_softmax(logits, -1)
            draws.append(reduce(out) if reduce else out)
    stack = torch.stack(draws)
    mean, std = stack.mean(0), stack.std(0)
    half = 1.96 * std / math.sqrt(samples)
    return {"mean": mean, "std": std, "low": mean - half, "high": mean + half, "samples": samples}


def token_logprobs(input_ids, labels=None):
    """A `reduce` for causal LMs: log p(token t | tokens < t) for t >= 1 -> [n, seq - 1]; with
    `labels`, the masked (-100) positions are set to 0."""
    import torch

    def fn(logp):
        target = input_ids[:, 1:] if labels is None else labels[:, 1:].clamp(min=0)
        got = torch.gather(logp[:, :-1], -1, target.unsqueeze(-1)).squeeze(-1)
        return got if labels is None else got * (labels[:, 1:] != -100)

    return fn


def mc_report(model, tokenizer, examples, task: str, samples: int, seed: int, method,
              batch_size: int = 32) -> dict:
    """Monte-Carlo evaluation: per example, the mean and 95 % interval of each class probability
    (seq-cls) or of each target token's log-probability (causal-lm), plus summary figures."""
    import torch

    from workers.data import collate

    per_example, correct, nll, tokens, widths = [], 0, 0.0, 0, []
    for i in range(0, len(examples), batch_size):
        batch = collate(examples[i:i + batch_size], tokenizer.pad_token_id)
        labels = batch.pop("labels")
        if task == "seq-cls":
            mc = mc_outputs(model, batch, samples, seed + i, task, method)
            for j in range(len(labels)):
                m, lo, hi = mc["mean"][j], mc["low"][j], mc["high"][j]
                per_example.append({"mean": m.tolist(), "low": lo.tolist(), "high": hi.tolist()})
                correct += int(m.argmax() == labels[j])
                widths.append(float((hi - lo).mean()))
        else:
            mc = mc_outputs(model, batch, samples, seed + i, task, method, reduce=token_logprobs(batch["input_ids"], labels))
            mask = labels[:, 1:] != -100
            for j in range(len(labels)):
                keep = mask[j]
                m, lo, hi = mc["mean"][j][keep], mc["low"][j][keep], mc["high"][j][keep]
                per_example.append({"mean": m.tolist(), "low": lo.tolist(), "high": hi.tolist()})
                nll -= float(m.sum())
                tokens += int(keep.sum())
                widths.extend((hi - lo).tolist())
    out = {"samples": samples, "seed": seed, "mean_interval_width": sum(widths) / max(len(widths), 1),
           "per_example": per_example}
    if task == "seq-cls":
        out["accuracy"] = correct / len(examples)
    else:
        out["eval_loss"] = nll / max(tokens, 1)
    del torch
    return out
