"""Small helpers every part shares, each written once: the quiet environment, sha256 of a file,
the transformers model class for a task, and the pickle policy."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from pydantic import BaseModel, ConfigDict

# telemetry off and no progress bars: a pipeline's output is for people, and nothing phones home
QUIET_ENV = {
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    "DO_NOT_TRACK": "true",
    "TOKENIZERS_PARALLELISM": "false",
}
# what a Ray job passes on to its workers and replicas besides the quiet environment
FORWARDED_ENV = ("HF_HUB_OFFLINE", "HF_HOME")

# files that unpickle (and can run code) when loaded: refused unless a user opts in
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")

TASK_MODEL_CLASSES = {"seq-cls": "AutoModelForSequenceClassification", "causal-lm": "AutoModelForCausalLM"}


class StrictModel(BaseModel):
    """A config section: unknown keys are errors, values are validated, assignment too."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


def quiet_environment() -> dict[str, str]:
    """Set the quiet environment in this process (keeping what the user set); return what a Ray
    job should forward to its workers."""
    for k, v in QUIET_ENV.items():
        os.environ.setdefault(k, v)
    return {k: os.environ[k] for k in (*QUIET_ENV, *FORWARDED_ENV) if k in os.environ}


def set_key_path(data: dict, key: str, value) -> None:
    """Set `a.b.c` in nested mappings in place, making the missing ones; raises ValueError naming
    the part of the path that is not a mapping."""
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise ValueError("empty key path")
    node = data
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ValueError(f"{'.'.join(parts[: i + 1])} is not a mapping")
        node = child
    node[parts[-1]] = value


def hash_file_into(h, path: str | Path) -> None:
    """Feed a file's bytes to a running hash, 4 MiB at a time."""
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            h.update(chunk)


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    hash_file_into(h, path)
    return h.hexdigest()


def model_class(task: str):
    """The transformers Auto class that loads a model for `task`."""
    import transformers

    return getattr(transformers, TASK_MODEL_CLASSES[task])


def task_of(model) -> str:
    """The task a loaded transformers model was built for."""
    return "seq-cls" if type(model).__name__.endswith("ForSequenceClassification") else "causal-lm"


def is_pickle(path: str | Path) -> bool:
    return Path(path).suffix in PICKLE_SUFFIXES
