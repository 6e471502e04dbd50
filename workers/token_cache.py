"""Tokenized examples kept on disk (`data.cache`), so a second run, a search trial or a warm worker's
next job does not tokenize again.

One safetensors file per key (`<key>.safetensors`: the token ids of all examples one after another,
their offsets, their labels) with the key in its metadata: no pickle, and a file whose key or shapes
do not match is ignored and written again. The key (workers.data.encode_key) covers the records'
content (sha256), the tokenizer's content, the templates, max_length and the task, so a change to any
of them misses. Files are written to a temporary name and renamed, so ranks of one machine writing
the same key at once leave one whole file.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

FORMAT = "adapterflow-tokens/1"
stats = {"hits": 0, "writes": 0, "rejected": 0}


def cache_dir(workspace: Path) -> Path:
    return Path(workspace) / "cache" / "tokens"


def load(directory: Path, key: str):
    """The examples stored under `key`, or None (absent, unreadable, or not what the key says)."""
    import torch
    from safetensors import safe_open

    from workers.data import Example

    path = Path(directory) / f"{key}.safetensors"
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
            if meta.get("format") != FORMAT or meta.get("key") != key:
                raise ValueError(f"metadata {meta} does not match key {key}")
            t = {name: fh.get_tensor(name) for name in fh.keys()}
        ids, offsets, labels = t["input_ids"], t["offsets"].tolist(), t["labels"]
        n = len(offsets) - 1
        if offsets[0] != 0 or offsets[-1] != len(ids) or any(b < a for a, b in zip(offsets, offsets[1:])):
            raise ValueError("offsets do not cut the token ids")
        flat_ids = ids.tolist()
        if meta.get("labels") == "tokens":
            if labels.shape != ids.shape:
                raise ValueError("token labels do not match the token ids")
            flat = labels.tolist()
            out = [Example(flat_ids[a:b], flat[a:b]) for a, b in zip(offsets, offsets[1:])]
        else:
            if labels.shape != torch.Size([n]):
                raise ValueError("one class label per example expected")
            out = [Example(flat_ids[a:b], c) for (a, b), c in zip(zip(offsets, offsets[1:]), labels.tolist())]
    except Exception as exc:  # noqa: BLE001 - a damaged cache file of any kind is a miss, never an error
        stats["rejected"] += 1
        log.warning("token cache %s is unusable (%s); tokenizing again", path, exc)
        return None
    stats["hits"] += 1
    return out


def save(directory: Path, key: str, examples) -> Path | None:
    """Store `examples` under `key`; a cache that cannot be written is only logged."""
    import torch
    from safetensors.torch import save_file

    directory = Path(directory)
    offsets = [0]
    for e in examples:
        offsets.append(offsets[-1] + len(e.input_ids))
    token_labels = bool(examples) and isinstance(examples[0].labels, list)
    tensors = {
        "input_ids": torch.tensor([t for e in examples for t in e.input_ids], dtype=torch.int64),
        "offsets": torch.tensor(offsets, dtype=torch.int64),
        "labels": torch.tensor([t for e in examples for t in e.labels] if token_labels
                               else [e.labels for e in examples], dtype=torch.int64),
    }
    meta = {"format": FORMAT, "key": key, "labels": "tokens" if token_labels else "class", "n": str(len(examples))}
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{key[:16]}-", suffix=".tmp")
        os.close(fd)
        save_file(tensors, tmp, metadata=meta)
        final = directory / f"{key}.safetensors"
        os.replace(tmp, final)
    except OSError as exc:
        log.warning("cannot write the token cache in %s (%s); continuing without it", directory, exc)
        return None
    stats["writes"] += 1
    return final
