"""Wanda pruning (SQFT's sparse base): score S_ij = |W_ij| · ||X_j||_2 over calibration tokens, and
per output row zero the lowest `ratio`·in scores (unstructured) or the N lowest of every M
consecutive inputs (N:M). Works on any transformers model's Linear layers.

Blocks (the model's repeated layers: the largest ModuleList holding Linear layers) are pruned in
order: the statistics of block i come from one forward pass through the model whose blocks
0..i-1 are already pruned, so each block is calibrated on the outputs of the pruned ones before it
(within a block all Linears are measured before any of them is pruned, as upstream does).
Linear layers outside the blocks (embeddings, task heads, lm_head) are left dense.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

from workers.errors import DataError, ModelError, SpecError

log = logging.getLogger(__name__)

NM_PATTERN = re.compile(r"^(\d+):(\d+)$")


@dataclass(frozen=True)
class Pattern:
    ratio: float | None = None  # unstructured: share of each row zeroed
    n: int | None = None  # N:M: N zeroed of every M consecutive inputs
    m: int | None = None

    @classmethod
    def parse(cls, pattern: str, ratio: float | None) -> Pattern:
        if pattern == "unstructured":
            if ratio is None or not 0 < ratio < 1:
                raise ValueError(f"sparsity ratio must be in (0, 1), got {ratio!r}")
            return cls(ratio=ratio)
        match = NM_PATTERN.match(pattern)
        if not match:
            raise ValueError(f"pattern {pattern!r}: expected 'unstructured' or 'N:M' such as '2:4'")
        n, m = int(match[1]), int(match[2])
        if not 0 < n < m:
            raise ValueError(f"pattern {pattern!r}: need 0 < N < M")
        return cls(n=n, m=m)


def find_blocks(model):
    """The model's repeated layers: the largest torch ModuleList whose members hold Linear layers."""
    import torch.nn as nn

    best = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and any(
            isinstance(m, nn.Linear) for child in module for m in child.modules()
        ):
            if best is None or len(module) > len(best[1]):
                best = (name, module)
    if best is None:
        raise ModelError("no ModuleList of layers with Linear modules found; nothing to prune")
    return best


def prune_mask(weight, sq_norm, pattern: Pattern):
    """Boolean mask of the weights to zero: scores |W| * ||X_j|| (broadcast over output rows)."""
    import torch

    score = weight.abs() * torch.sqrt(sq_norm).reshape(1, -1)
    rows, cols = score.shape
    mask = torch.zeros_like(score, dtype=torch.bool)
    if pattern.ratio is not None:
        k = int(cols * pattern.ratio)
        idx = torch.sort(score, dim=-1, stable=True)[1][:, :k]
        mask.scatter_(1, idx, True)
        return mask
    if cols % pattern.m:
        raise SpecError(f"sparsify.pattern: N:M {pattern.n}:{pattern.m} needs input size divisible by "
                        f"{pattern.m}, got {cols}")
    groups = score.reshape(rows, cols // pattern.m, pattern.m)
    idx = torch.sort(groups, dim=-1, stable=True)[1][..., : pattern.n]
    gmask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, idx, True)
    return gmask.reshape(rows, cols)


def sparsify(model, calibration: list[dict], pattern: Pattern) -> dict:
    """Prune `model` in place with Wanda; `calibration` is a list of tokenizer outputs (tensors).
    Returns a report: per-layer and total sparsity of the pruned Linear weights."""
    import torch
    import torch.nn as nn

    blocks_name, blocks = find_blocks(model)
    model.eval()
    report: dict = {"layers": {}, "pattern": pattern.__dict__, "blocks": blocks_name}
    for b, block in enumerate(blocks):
        linears = {f"{blocks_name}.{b}.{n}": m for n, m in block.named_modules() if isinstance(m, nn.Linear)}
        stats = {name: torch.zeros(m.in_features, dtype=torch.float64) for name, m in linears.items()}

        def hook(name):
            def fn(module, args, output):
                x = args[0].detach().reshape(-1, args[0].shape[-1]).to(torch.float64)
                stats[name] += (x * x).sum(0)  # noqa: B023 - hooks are removed within this iteration

            return fn

        handles = [m.register_forward_hook(hook(name)) for name, m in linears.items()]
        try:
            with torch.no_grad():
                for batch in calibration:
                    model(**batch)
        finally:
            for h in handles:
                h.remove()
        with torch.no_grad():
            for name, m in linears.items():
                mask = prune_mask(m.weight.data.float(), stats[name].float(), pattern)
                m.weight.data[mask] = 0
                zeros = int((m.weight.data == 0).sum())
                report["layers"][name] = {"zeros": zeros, "numel": m.weight.numel(),
                                          "sparsity": zeros / m.weight.numel()}
        log.info("pruned block %d/%d", b + 1, len(blocks))
    zeros = sum(v["zeros"] for v in report["layers"].values())
    numel = sum(v["numel"] for v in report["layers"].values())
    report["total"] = {"zeros": zeros, "numel": numel, "sparsity": zeros / numel}
    return report


def calibration_batches(tokenizer, texts: list[str], seq_len: int, n_samples: int,
                        batch_size: int = 8) -> list[dict]:
    """Calibration as upstream: the texts' tokens concatenated and cut into `n_samples` chunks of
    exactly `seq_len` tokens, so no padding enters the statistics."""
    import torch

    stream: list[int] = []
    for t in texts:
        stream += tokenizer(t, add_special_tokens=False)["input_ids"]
        if len(stream) >= seq_len * n_samples:
            break
    n = min(n_samples, len(stream) // seq_len)
    if n == 0:
        raise DataError(f"sparsify: the calibration texts give {len(stream)} tokens, fewer than one chunk of {seq_len}")
    ids = torch.tensor(stream[: n * seq_len]).reshape(n, seq_len)
    return [{"input_ids": ids[i : i + batch_size], "attention_mask": torch.ones_like(ids[i : i + batch_size])}
            for i in range(0, n, batch_size)]
