"""Training and evaluation data: load records, render templates, tokenize, batch.

Which examples form which batch is workers.batching's.
"""

from __future__ import annotations

import csv
import json
import random
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from workers.config import DataSpec, ModelSpec
from workers.errors import DataError

EXTENSIONS = {".tsv": "tsv", ".csv": "csv", ".jsonl": "jsonl", ".json": "json", ".parquet": "parquet"}
SPLIT_ALIASES = {"validation": ("validation", "dev", "val", "eval"), "dev": ("dev", "validation", "val")}
IGNORE_INDEX = -100


# ---------------------------------------------------------------- records
def _read_file(path: Path, fmt: str) -> list[dict]:
    if fmt == "auto":
        fmt = EXTENSIONS.get(path.suffix.lower(), "")
        if not fmt:
            raise DataError(f"{path}: unknown file type; set data.format (tsv, csv, jsonl, json, parquet)")
    if fmt in ("tsv", "csv"):
        with open(path, newline="", encoding="utf-8") as fh:
            if fmt == "tsv":
                reader = csv.DictReader(fh, delimiter="\t", quoting=csv.QUOTE_NONE)
            else:
                reader = csv.DictReader(fh)
            return [dict(r) for r in reader]
    if fmt == "jsonl":
        with open(path, encoding="utf-8") as fh:
            out = []
            for n, line in enumerate(fh, 1):
                if line.strip():
                    try:
                        out.append(json.loads(line))
                    except json.JSONDecodeError as exc:
                        raise DataError(f"{path}:{n}: not valid JSON: {exc}") from None
            return out
    if fmt == "json":
        data = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(data, dict):
            data = data.get("data", data.get("train"))
        if not isinstance(data, list):
            raise DataError(f"{path}: expected a JSON list of records")
        return data
    if fmt == "parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    raise DataError(f"{path}: unsupported format {fmt!r}")


def _find_split_file(folder: Path, split: str) -> Path | None:
    for name in SPLIT_ALIASES.get(split, (split,)):
        for ext in EXTENSIONS:
            f = folder / f"{name}{ext}"
            if f.is_file():
                return f
    return None


def looks_local(path: str) -> bool:
    """A data path that can only mean a local file or folder (not a hub dataset id)."""
    return path.startswith((".", "/", "~")) or path.count("/") > 1 or Path(path).suffix.lower() in EXTENSIONS


def load_split(spec: DataSpec, split: str) -> list[dict] | None:
    """Records of one split, or None when the source has no such split."""
    p = Path(spec.path).expanduser()
    if p.is_dir():
        f = _find_split_file(p, split)
        return _read_file(f, spec.format) if f else None
    if p.is_file():
        return _read_file(p, spec.format) if split == spec.train_split else None
    if looks_local(spec.path):
        raise DataError(f"data.path {spec.path!r}: no such file or folder")
    import datasets  # a hub dataset id

    try:
        names = datasets.get_dataset_split_names(spec.path)
    except Exception as exc:  # noqa: BLE001 - the hub client raises many kinds
        raise DataError(f"data.path {spec.path!r}: cannot open hub dataset: {exc}") from None
    for name in SPLIT_ALIASES.get(split, (split,)):
        if name in names:
            return list(datasets.load_dataset(spec.path, split=name))
    return None


def _split_off(records: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """(rest, slice): a seeded `fraction` of `records` (at least one) taken out, order kept."""
    rng = random.Random(seed)
    order = list(range(len(records)))
    rng.shuffle(order)
    held = set(order[: max(1, int(len(records) * fraction))])
    return [r for i, r in enumerate(records) if i not in held], [records[i] for i in sorted(held)]


def _train_records(spec: DataSpec) -> tuple[list[dict], list[dict]]:
    """(training records, held-out selection slice): `data.holdout_fraction` comes off first."""
    train = load_split(spec, spec.train_split)
    if not train:
        raise DataError(f"data.path {spec.path!r}: split {spec.train_split!r} is missing or empty")
    if spec.holdout_fraction > 0:
        return _split_off(train, spec.holdout_fraction, spec.holdout_seed)
    return train, []


def load_holdout(spec: DataSpec) -> list[dict]:
    """The held-out selection slice of the training split (`data.holdout_fraction`), never trained on."""
    held = _train_records(spec)[1]
    if not held:
        raise DataError("data.holdout_fraction is 0: there is no held-out slice to select on")
    return held


def load_calibration(spec: DataSpec, split: str) -> list[dict] | None:
    """Records whose inputs calibrate a sparsification (`sparsify.split`): the split, minus the
    held-out selection slice when it is the training split (a search's trials never see it)."""
    if split == spec.train_split and spec.holdout_fraction > 0:
        return _train_records(spec)[0]
    return load_split(spec, split)


def load_train_eval(spec: DataSpec, seed: int) -> tuple[list[dict], list[dict]]:
    train, _ = _train_records(spec)
    evals = load_split(spec, spec.eval_split) if spec.eval_split else None
    if evals is None and spec.eval_fraction > 0:
        train, evals = _split_off(train, spec.eval_fraction, seed)
    if spec.max_train_examples:
        train = train[: spec.max_train_examples]
    evals = evals or []
    if spec.max_eval_examples:
        evals = evals[: spec.max_eval_examples]
    return train, evals


# ---------------------------------------------------------------- templates
def template_fields(template: str) -> list[str]:
    return [f for _, f, _, _ in string.Formatter().parse(template) if f]


def render(template: str, record: dict) -> str:
    try:
        return template.format_map(record)
    except KeyError as exc:
        raise DataError(
            f"template {template!r} names field {exc.args[0]!r}, but records have: "
            f"{', '.join(map(str, record))}"
        ) from None


def input_template(data: DataSpec) -> str:
    return data.input_template or "{" + data.text_field + "}"


def label_index(value: Any, model: ModelSpec) -> int:
    labels = model.labels()
    if isinstance(value, str):
        v = value.strip()
        if v.lstrip("-").isdigit():
            value = int(v)
        else:
            names = {name: i for i, name in labels.items()}
            if v not in names:
                raise DataError(f"label {value!r} is not among model.id2label ({', '.join(names)})")
            return names[v]
    if isinstance(value, bool) or not isinstance(value, int) or value not in labels:
        raise DataError(f"label {value!r} is not a class index 0..{len(labels) - 1}")
    return value


# ---------------------------------------------------------------- tokenized examples
@dataclass(frozen=True)
class Example:
    input_ids: list[int]
    labels: int | list[int]


# Tokenized examples per process (a Tune actor's next trial, a warm worker's next job tokenize the same
# records again), and on disk when a workspace is given (workers.token_cache): keyed by the records'
# content, everything in the spec that shapes an example, and the tokenizer's content. Examples are
# frozen and only read.
_ENCODED_ENTRIES = 8
_encoded: dict[str, list[Example]] = {}
encode_stats = {"hits": 0, "misses": 0, "disk_hits": 0}


def _tokenizer_key(tokenizer) -> str:
    """sha256 of what the tokenizer does: its vocabulary and pipeline (a fast tokenizer's whole
    serialized form), its settings and special tokens; not where it was loaded from."""
    import hashlib

    h = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:  # less the truncation and padding a call leaves set on it
        state = json.loads(backend.to_str())
        state.pop("truncation", None)
        state.pop("padding", None)
        h.update(json.dumps(state, sort_keys=True).encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    paths = {"name_or_path", "vocab_file", "merges_file", "tokenizer_file", "special_tokens_map_file"}
    settings = {k: v for k, v in getattr(tokenizer, "init_kwargs", {}).items() if k not in paths}
    added = sorted((str(k), int(v)) for k, v in getattr(tokenizer, "added_tokens_encoder", {}).items())
    h.update(json.dumps([settings, added, len(tokenizer), tokenizer.pad_token_id, tokenizer.eos_token_id,
                         tokenizer.bos_token_id, getattr(tokenizer, "padding_side", None),
                         getattr(tokenizer, "truncation_side", None)], sort_keys=True, default=str).encode())
    return h.hexdigest()


def encode_key(records: list[dict], data: DataSpec, model: ModelSpec, tokenizer) -> str:
    import hashlib

    shape = ["examples/2", input_template(data), data.target_template, data.label_field, data.max_length,
             model.task, model.prompt_format, sorted(model.labels().items()) if model.task == "seq-cls" else None,
             _tokenizer_key(tokenizer)]
    h = hashlib.sha256(json.dumps(shape, default=str).encode())
    h.update(json.dumps(records, sort_keys=True, default=str).encode())
    return h.hexdigest()


def encode(records: list[dict], data: DataSpec, model: ModelSpec, tokenizer,
           workspace: Path | str | None = None) -> list[Example]:
    """Tokenized examples of `records` (seq-cls: the rendered input and its class index; causal LM: the
    prompt and target ids, the loss masked on the prompt); remembered per process, and kept under
    `<workspace>/cache/tokens` when a workspace is given and `data.cache` is on."""
    from workers import token_cache

    if not records:
        return []
    key = encode_key(records, data, model, tokenizer)
    if key in _encoded:
        encode_stats["hits"] += 1
        return list(_encoded[key])
    folder = token_cache.cache_dir(Path(workspace)) if workspace is not None and data.cache else None
    out = token_cache.load(folder, key) if folder is not None else None
    if out is not None:
        encode_stats["disk_hits"] += 1
    else:
        encode_stats["misses"] += 1
        out = _encode(records, data, model, tokenizer)
        if folder is not None:
            token_cache.save(folder, key, out)
    if len(_encoded) >= _ENCODED_ENTRIES:
        _encoded.pop(next(iter(_encoded)))
    _encoded[key] = out
    return list(out)


def _encode(records: list[dict], data: DataSpec, model: ModelSpec, tokenizer) -> list[Example]:
    tmpl = input_template(data)
    if model.task == "seq-cls":
        if data.label_field not in records[0]:
            raise DataError(
                f"data.label_field {data.label_field!r} not in records (fields: {', '.join(records[0])})"
            )
        texts = [render(tmpl, r) for r in records]
        enc = tokenizer(texts, truncation=True, max_length=data.max_length)
        return [
            Example(ids, label_index(r[data.label_field], model))
            for ids, r in zip(enc["input_ids"], records)
        ]
    out = []
    for r in records:
        prompt = model.prompt_format.format(prompt=render(tmpl, r))
        target = render(data.target_template, r)
        p_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
        t_ids = tokenizer(target, add_special_tokens=False)["input_ids"]
        if tokenizer.eos_token_id is not None:
            t_ids = t_ids + [tokenizer.eos_token_id]
        ids = (p_ids + t_ids)[: data.max_length]
        labels = ([IGNORE_INDEX] * len(p_ids) + t_ids)[: data.max_length]
        if all(x == IGNORE_INDEX for x in labels):
            continue  # the prompt alone fills max_length: nothing to learn from
        out.append(Example(ids, labels))
    return out


def collate(examples: list[Example], pad_id: int, padding_side: str = "right", width: int | None = None):
    """Examples padded to `width` (default: the longest), with their attention mask."""
    import torch

    width = width or max(len(e.input_ids) for e in examples)
    ids, mask, labels = [], [], []
    for e in examples:
        pad = width - len(e.input_ids)
        fill = [pad_id] * pad
        ones = [1] * len(e.input_ids)
        if padding_side == "left":
            ids.append(fill + e.input_ids)
            mask.append([0] * pad + ones)
        else:
            ids.append(e.input_ids + fill)
            mask.append(ones + [0] * pad)
        if isinstance(e.labels, list):
            lab_fill = [IGNORE_INDEX] * pad
            labels.append(lab_fill + e.labels if padding_side == "left" else e.labels + lab_fill)
        else:
            labels.append(e.labels)
    return {
        "input_ids": torch.tensor(ids),
        "attention_mask": torch.tensor(mask),
        "labels": torch.tensor(labels),
    }
