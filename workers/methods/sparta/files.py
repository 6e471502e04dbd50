"""SpaRTA's files (peft-sparta's layout): writing an adapter folder, and reading one (ours or
peft-sparta's) as merge entries for a base model."""

from __future__ import annotations

import json
from pathlib import Path

from workers.errors import AdapterIntegrityError

DELTAS_FILE = "sparse_deltas.safetensors"
HEAD_INIT_FILE = "head_init.safetensors"
NEW_EMBEDDINGS_FILE = "new_embeddings_init.safetensors"
CONFIG_FILE = "sparta_config.json"


def unravel(flat, shape):
    import torch

    if len(shape) == 0:
        return torch.zeros((flat.numel(), 0), dtype=torch.int32)
    return torch.stack(torch.unravel_index(flat, shape), 1).to(torch.int32)


def write_adapter(folder: Path, base, task: str, indices: dict, deltas: dict, head_init: dict,
                  spec=None, new_rows=None, tokenizer=None) -> None:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name in indices:
        tensors[f"indices.{name}"] = indices[name].contiguous()
        tensors[f"deltas.{name}"] = deltas[name].contiguous()
    save_file(tensors, str(folder / DELTAS_FILE), metadata={"format": "pt"})
    config = base.config
    cfg = config.to_dict()
    cfg["sparta_pretrained_model"] = getattr(config, "sparta_pretrained_model", None) or config._name_or_path
    if task == "seq-cls":  # what peft-sparta's classifier loader reads
        cfg["problem_type"] = cfg.get("problem_type") or "single_label_classification"
        cfg["id2label"] = {str(k): v for k, v in config.id2label.items()}
        cfg["label2id"] = {v: int(k) for k, v in config.id2label.items()}
    (folder / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True, default=str) + "\n")
    if head_init:
        heads = {n: t.contiguous().clone() for n, t in head_init.items()}
        weights = [n for n, t in head_init.items() if t.dim() == 2]
        if len(weights) == 1:
            heads["head"] = head_init[weights[0]].contiguous().clone()  # the key peft-sparta reads
        save_file(heads, str(folder / HEAD_INIT_FILE), metadata={"format": "pt"})
    if new_rows is not None:  # added tokens: their initial rows and the grown tokenizer
        save_file({"new_embeddings": new_rows.cpu().contiguous()}, str(folder / NEW_EMBEDDINGS_FILE),
                  metadata={"format": "pt"})
        tokenizer.save_pretrained(str(folder))
    kept = sum(int(d.numel()) for d in deltas.values())
    meta = {"task": task, "head": sorted(head_init), "trainable_params": kept}
    if spec is not None:
        meta.update(spec.model_dump(mode="json"))
    (folder / CONFIG_FILE).write_text(json.dumps(meta, indent=2))


def load_tensors(folder: Path, stem: str) -> dict | None:
    """`<stem>.safetensors`, or peft-sparta's `<stem>.pt` through torch's weights-only loader."""
    import torch
    from safetensors.torch import load_file

    st, pt = folder / f"{stem}.safetensors", folder / f"{stem}.pt"
    if st.is_file():
        return load_file(str(st))
    if pt.is_file():
        obj = torch.load(str(pt), map_location="cpu", weights_only=True)
        return obj if isinstance(obj, dict) else {stem.removesuffix("_init"): obj}
    return None


def read_adapter(folder: Path, base, task: str) -> dict:
    """A saved SpaRTA adapter as merge entries for `base`, checked against its shapes."""
    import torch

    from workers.methods.sparta.selection import head_names, named_parameters

    folder = Path(folder)
    raw = load_tensors(folder, "sparse_deltas")
    if raw is None:
        raise AdapterIntegrityError(f"{folder}: no {DELTAS_FILE}; not a SpaRTA adapter folder")
    if "indices" in raw and isinstance(raw["indices"], dict):  # the .pt layout: nested dicts
        idx_by, delta_by = raw["indices"], raw["deltas"]
    else:
        idx_by, delta_by = {}, {}
        for k, v in raw.items():
            if k.startswith("indices."):
                idx_by[k[8:]] = v
            elif k.startswith("deltas."):
                delta_by[k[7:]] = v
            else:
                raise AdapterIntegrityError(f"{folder}/{DELTAS_FILE}: unexpected tensor {k!r}")
    _add_new_embeddings(folder, base)
    params = named_parameters(base)
    unknown = sorted(set(idx_by) - set(params))
    if unknown:
        raise AdapterIntegrityError(
            f"{folder}: the adapter names parameters this base does not have ({', '.join(unknown[:3])}...); "
            "it was trained on another architecture or task"
        )
    heads = head_names(base, task)
    head_init = load_tensors(folder, "head_init") or {}
    entries = []
    for name, param in params.items():
        idx = idx_by.get(name)
        if idx is None or idx.numel() == 0:
            continue
        delta = delta_by.get(name)
        if delta is None or idx.dim() != 2 or idx.shape[1] != param.dim() or delta.numel() != idx.shape[0]:
            raise AdapterIntegrityError(f"{folder}: indices/deltas for {name!r} do not fit its shape "
                                        f"{tuple(param.shape)}")
        idx = idx.long()
        if (idx < 0).any() or (idx >= torch.tensor(param.shape)).any():
            raise AdapterIntegrityError(f"{folder}: indices for {name!r} fall outside {tuple(param.shape)}")
        flat = torch.zeros(idx.shape[0], dtype=torch.long)
        for d, size in enumerate(param.shape):
            flat = flat * size + idx[:, d]
        init = None
        if name in heads:
            init = head_init.get(name)
            if init is None and "head" in head_init and param.dim() == 2:
                init = head_init["head"]
            if init is None:
                raise AdapterIntegrityError(
                    f"{folder}: no initial value for the head parameter {name!r} ({HEAD_INIT_FILE})"
                )
            if tuple(init.shape) != tuple(param.shape):
                raise AdapterIntegrityError(f"{folder}: head init for {name!r} has shape {tuple(init.shape)}, "
                                            f"the base's head {tuple(param.shape)}")
            init = init.reshape(-1)[flat].float()
        entries.append((name, flat.to(param.device), delta.float().to(param.device), init))
    return {"entries": entries}


def _add_new_embeddings(folder: Path, base) -> None:
    """Added tokens (peft-sparta's layout): grow the input embeddings to the adapter's tokenizer
    and set the new rows to their saved initial values (the deltas start from them)."""
    import torch

    new = load_tensors(folder, "new_embeddings_init")
    if not new:
        return
    rows = next(iter(new.values()))
    n = rows.shape[0]
    old = base.get_input_embeddings().weight.shape[0]
    target = old + n
    if (folder / "tokenizer_config.json").is_file():
        from transformers import AutoTokenizer

        target = len(AutoTokenizer.from_pretrained(str(folder)))
    if old < target:
        base.resize_token_embeddings(target, mean_resizing=False)
    with torch.no_grad():
        emb = base.get_input_embeddings().weight
        emb[target - n:target] = rows.to(emb.dtype)
