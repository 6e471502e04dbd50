"""`adapterflow import`: an adapter folder another library wrote (stock PEFT's `save_pretrained`:
LoRA, aLoRA, IA3, PVeRA; peft-sparta's SpaRTA) becomes an adapterflow adapter: recognised by the
method it belongs to, checked against the operator's base (it must load onto it with every weight
used), completed with what the folder does not say (task, labels), and given a manifest with the
sha256 of every file. Pickled files are converted into a copy (`output`) where the method can read
them as plain tensors (torch's weights-only loader), else refused.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from workers.artifact import MANIFEST, write_manifest
from workers.common import is_pickle
from workers.config import ModelSpec
from workers.errors import AdapterIntegrityError, SpecError

PEFT_TASKS = {"SEQ_CLS": "seq-cls", "CAUSAL_LM": "causal-lm"}


def _config(folder: Path) -> dict | None:
    f = folder / "adapter_config.json"
    if not f.is_file():
        return None
    try:
        return json.loads(f.read_text())
    except json.JSONDecodeError as exc:
        raise AdapterIntegrityError(f"{f}: not valid JSON ({exc})") from None


def _model_config(folder: Path) -> dict:
    """The transformers `config.json` some libraries save beside an adapter (peft-sparta does)."""
    f = folder / "config.json"
    try:
        return json.loads(f.read_text()) if f.is_file() else {}
    except json.JSONDecodeError:
        return {}


def _task(folder: Path, config: dict | None, given: str | None) -> str:
    said = PEFT_TASKS.get((config or {}).get("task_type") or "")
    if not said and _model_config(folder).get("problem_type"):  # set by transformers when a classifier trains
        said = "seq-cls"
    if given and said and given != said:
        raise SpecError(f"{folder}: the adapter says task {said!r}, but --task is {given!r}")
    task = given or said
    if task is None:
        raise SpecError(f"{folder}: the folder does not say its task; give --task seq-cls or --task causal-lm")
    return task


def _head_labels(folder: Path) -> int | None:
    """Classes of a saved classification head (PEFT's modules_to_save copy), if the adapter has one."""
    from safetensors import safe_open

    f = folder / "adapter_model.safetensors"
    if not f.is_file():
        return None
    with safe_open(str(f), framework="pt") as fh:
        for key in fh.keys():
            if key.endswith(".weight") and any(h in key.split(".") for h in ("score", "classifier")):
                shape = fh.get_slice(key).get_shape()
                if len(shape) == 2:
                    return int(shape[0])
    return None


def import_adapter(folder: str | Path, base: dict, task: str | None = None,
                   output: str | Path | None = None) -> tuple[Path, dict]:
    """Import `folder` for the operator's `base` (a model section: name at least; labels, prompt
    format and the like when the folder does not say them) and `task` when the folder does not say it.
    Writes the artifact to `output` (default: the folder itself, which gains `adapterflow.json`);
    returns (folder, manifest)."""
    from workers.methods import methods
    from workers.models import base_fingerprint, load_tokenizer
    from workers.trust import ADAPTER_KEYS

    src = Path(folder)
    if not src.is_dir():
        raise AdapterIntegrityError(f"{src}: no such folder")
    if (src / MANIFEST).is_file():
        raise AdapterIntegrityError(f"{src}: already an adapterflow adapter ({MANIFEST} present); serve it as it is")
    pickles = sorted(p.name for p in src.iterdir() if is_pickle(p))
    if pickles and (output is None or Path(output) == src):
        raise AdapterIntegrityError(
            f"{src}: {', '.join(pickles)} would be unpickled to load; save the adapter with safetensors (PEFT: "
            "save_pretrained(..., safe_serialization=True)), or give --output DIR for a converted copy where the "
            "method can convert them")
    config = _config(src)
    task = _task(src, config, task)
    fields = {**base, "task": task}
    if task == "seq-cls" and not fields.get("id2label") and not fields.get("num_labels"):
        n = _head_labels(src)
        saved = _model_config(src).get("id2label")
        if n is None and saved:
            fields["id2label"] = {int(k): v for k, v in saved.items()}
            n = len(saved)
        if n is None:
            raise SpecError(f"{src}: no classification head in the adapter to count the classes; give them: "
                            "--set model.num_labels=N or --set model.id2label='{0: neg, 1: pos}'")
        fields.setdefault("num_labels", n)
    model = ModelSpec.model_validate(fields)
    if model.trust_remote_code:
        raise SpecError("import: trust_remote_code is the operator's to set in a spec, not on import")
    tok = load_tokenizer(model)
    found = [(m, d) for m in methods().values() if (d := m.spec_from_folder(src, config, tok))]
    if not found:
        raise AdapterIntegrityError(
            f"{src}: not an adapter folder adapterflow can read (PEFT's adapter_config.json with peft_type LORA, "
            "IA3 or PVERA, and adapter_model.safetensors)")
    method, data = found[0]
    spec = method.spec_class.model_validate(data)
    method.check_task(spec, task)
    model = model.model_copy(update={"prompt_format": method.prompt_format(spec, model.prompt_format)})

    dst = Path(output) if output else src
    if dst != src:
        if dst.exists():
            raise AdapterIntegrityError(f"{dst} exists; choose a new --output folder")
        shutil.copytree(src, dst, ignore=lambda _, names: [n for n in names if is_pickle(Path(n))])
        converted = method.convert_pickles(src, dst)
        left = sorted(set(pickles) - set(converted))
        if left:
            shutil.rmtree(dst)
            raise AdapterIntegrityError(f"{src}: {', '.join(left)} would be unpickled to load and {method.name} cannot "
                                        "convert them; save the adapter with safetensors")
    try:
        _check_fit(method, model, dst)
    except AdapterIntegrityError:
        if dst != src:
            shutil.rmtree(dst)
        raise
    record = model.model_dump(mode="json")
    record = {k: record[k] for k in ("name", "revision", "dtype", "trust_remote_code", *ADAPTER_KEYS) if k in record}
    if task == "seq-cls":
        record["id2label"] = {str(k): v for k, v in model.labels().items()}
        record["num_labels"] = len(record["id2label"])
    manifest = write_manifest(dst, method=method.name, model=record, base_sha256=base_fingerprint(model),
                              extra={"adapter": spec.model_dump(mode="json"), "input_template": None,
                                     "max_length": 512, "imported_from": str(src.resolve()),
                                     **({"converted": pickles} if pickles else {})})
    return dst, manifest


EMBEDDINGS = ("embed_tokens", "word_embeddings", "lm_head", "wte", "embed_out")


def _check_vocabulary(folder: Path, vocab_size: int | None) -> None:
    """Saved embedding rows (a trained or resized embedding, `modules_to_save`) fit the vocabulary the
    adapter will be used with: the base's, or the tokenizer saved beside the adapter (added tokens)."""
    from safetensors import safe_open

    f = folder / "adapter_model.safetensors"
    if not f.is_file() or not vocab_size:
        return
    own = (folder / "tokenizer_config.json").is_file()
    if own:
        from transformers import AutoTokenizer

        vocab_size = len(AutoTokenizer.from_pretrained(str(folder)))
    with safe_open(str(f), framework="pt") as fh:
        for key in fh.keys():
            if key.endswith(".weight") and any(e in key.split(".") for e in EMBEDDINGS):
                rows = fh.get_slice(key).get_shape()[0]
                if (rows < vocab_size) if own else (rows != vocab_size):
                    where = "the tokenizer saved with it" if own else "the base's vocabulary"
                    raise AdapterIntegrityError(
                        f"{folder}: {key} has {rows} rows but {where} has {vocab_size} tokens; an adapter trained "
                        "with added tokens needs its tokenizer saved beside it (tokenizer.save_pretrained), and "
                        "one trained on another model does not fit this base")


def _check_fit(method, model: ModelSpec, folder: Path) -> None:
    """The adapter loads onto the operator's base with every saved weight used and every shape right,
    and its saved embeddings fit the vocabulary."""
    from workers.models import load_model, load_tokenizer

    base = load_model(model, load_tokenizer(model))
    _check_vocabulary(folder, getattr(base.config, "vocab_size", None))
    try:
        loaded = method.load(base, folder)
    except (RuntimeError, ValueError, KeyError) as exc:
        raise AdapterIntegrityError(f"{folder}: does not fit base {model.name!r}: {str(exc).splitlines()[0]}") from None
    from peft import PeftModel

    if isinstance(loaded, PeftModel):
        from peft.utils import set_peft_model_state_dict
        from safetensors.torch import load_file

        result = set_peft_model_state_dict(loaded, load_file(str(folder / "adapter_model.safetensors")))
        unused = [k for k in getattr(result, "unexpected_keys", []) if "lora_" in k or "ia3_" in k or "pvera_" in k]
        if unused:
            raise AdapterIntegrityError(f"{folder}: weights for modules base {model.name!r} does not have "
                                        f"({', '.join(unused[:3])}...); it was trained on another model")
