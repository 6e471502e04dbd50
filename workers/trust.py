"""Trust comes from the operator, never from an adapter.

An adapter's manifest (`adapterflow.json`) says what the adapter was trained for (task, labels,
prompt format) and on which base (name and weight digest). It never decides what a replica builds
or whether code shipped with a model runs:

- the base model's name, revision, dtype and `trust_remote_code` come from the operator (a spec's
  `model` section, `--base`, or the registry version tag the operator's pipeline wrote);
- a manifest asking for remote code is refused everywhere an adapter is loaded;
- the adapter is checked against the operator's base by weight digest (by name when a digest
  cannot be computed, e.g. a hub model not cached here).
"""

from __future__ import annotations

from pathlib import Path

from workers.config import ModelSpec
from workers.errors import AdapterIntegrityError

BASE_KEYS = ("name", "revision", "dtype", "trust_remote_code")  # the operator's (and chat_template when set)
ADAPTER_KEYS = ("task", "num_labels", "id2label", "prompt_format", "pad_token")  # what the adapter was trained for


def refuse_remote_code(manifest: dict, folder: Path | str) -> None:
    if (manifest.get("model") or {}).get("trust_remote_code"):
        raise AdapterIntegrityError(
            f"{folder}: its manifest asks to run code shipped with the base model (trust_remote_code); an "
            "adapter never decides that: refused. Set it in the operator's spec (model.trust_remote_code) if "
            "that base needs it"
        )


def serving_spec(manifest: dict, base: ModelSpec | dict, folder: Path | str = "adapter") -> ModelSpec:
    """The model spec a replica or tool uses for this adapter: the operator's base (name, revision,
    dtype, trust) with the adapter's task fields."""
    refuse_remote_code(manifest, folder)
    base = base if isinstance(base, ModelSpec) else ModelSpec.model_validate({"name": base["name"], **base})
    trained = manifest.get("model") or {}
    fields = {k: trained[k] for k in ADAPTER_KEYS if trained.get(k) is not None}
    fields.update({k: getattr(base, k) for k in BASE_KEYS})
    template = base.chat_template or trained.get("chat_template")  # the operator's, else the training run's
    if template:
        fields["chat_template"] = template
    if "task" not in fields:
        fields["task"] = manifest.get("task", base.task)
    return ModelSpec.model_validate(fields)


def manifest_base(manifest: dict, folder: Path | str = "adapter") -> ModelSpec:
    """For a tool run by hand on an adapter folder without a base (merge, the SpaRTA API): the base the
    manifest names, never with remote code."""
    refuse_remote_code(manifest, folder)
    return ModelSpec.model_validate({**manifest["model"], "trust_remote_code": False})


def check_against_base(manifest: dict, base: ModelSpec, base_sha256: str | None, folder: Path | str) -> None:
    """The adapter was trained on this base: same weight digest (or, without digests, same name)."""
    from workers.artifact import check_base

    if (manifest.get("base_model") or {}).get("sha256") and base_sha256:
        check_base(manifest, base_sha256, folder)
        return
    named = (manifest.get("base_model") or {}).get("name")
    if named != base.name:
        raise AdapterIntegrityError(
            f"{folder}: trained on base {named!r}, but this base is {base.name!r} and no weight digest can tell "
            "them apart here; load it on the base it was trained on"
        )
