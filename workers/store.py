"""The adapter store: resolve an adapter reference to a verified local folder.

A reference is a local adapter folder, or an MLflow URI (`models:/NAME@ALIAS`, `models:/NAME/3`,
`runs:/RUN_ID/adapter`) of an adapter that a pipeline registered. Files are checked against the
manifest's sha256 before anything loads them.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

from workers.artifact import MANIFEST, verify
from workers.common import sha256_file
from workers.errors import AdapterIntegrityError, UnknownAdapterError

log = logging.getLogger(__name__)

MLFLOW_SCHEMES = ("models:/", "runs:/", "mlflow-artifacts:/")
# registered-model-version tags the pipeline writes at registration (the operator's record)
MANIFEST_TAG = "adapterflow.manifest_sha256"
BASE_TAG = "adapterflow.base"
REGISTRY_REF = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+))$")


def base_record(model) -> dict:
    """The operator's base model section as recorded with a registered version."""
    from workers.trust import ADAPTER_KEYS, BASE_KEYS

    data = model.model_dump(mode="json")
    return {k: data[k] for k in (*BASE_KEYS, *ADAPTER_KEYS, "chat_template") if data.get(k) is not None}


def registered_version(ref: str, tracking_uri: str | None = None):
    """The registry's model version a `models:/NAME@ALIAS` or `models:/NAME/N` reference names
    (None for other references)."""
    m = REGISTRY_REF.match(ref)
    if not m:
        return None
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    try:
        if m["alias"]:
            return client.get_model_version_by_alias(m["name"], m["alias"])
        return client.get_model_version(m["name"], m["version"])
    except MlflowException as exc:
        raise UnknownAdapterError(f"adapter {ref!r} not found in MLflow ({exc.message})") from None


def registered_base(ref: str, tracking_uri: str | None = None) -> dict | None:
    """The base model the operator's pipeline recorded for a registered adapter, if any."""
    version = registered_version(ref, tracking_uri)
    raw = version.tags.get(BASE_TAG) if version is not None else None
    return json.loads(raw) if raw else None


def version_of_logged_model(run_id: str, model_id: str, tracking_uri: str | None = None):
    """The registered version made from the logged model `model_id` of run `run_id` (None when the
    registry has none, e.g. a model loaded from a folder)."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    hits = [v for v in client.search_model_versions(f"run_id = '{run_id}'")
            if v.source == f"models:/{model_id}"]
    return hits[0] if hits else None


def check_pinned(version, ref: str, folder: Path, allow_unpinned: bool = False) -> None:
    """Refuse a registered adapter whose manifest is not the one pinned at registration, or that has
    no pinned manifest (unless `allow_unpinned`: then it is checked against its own manifest only)."""
    pinned = version.tags.get(MANIFEST_TAG)
    if pinned is None:
        if not allow_unpinned:
            raise AdapterIntegrityError(
                f"adapter {ref!r}: version {version.version} of {version.name!r} was registered without a pinned "
                f"manifest sha256 (tag {MANIFEST_TAG}), so an edit in the artifact store could not be told; "
                "re-register it with this version of adapterflow (re-run its pipeline, or `adapterflow import "
                "--register` for an imported adapter), or pass allow_unpinned=True to trust its own manifest"
            )
        log.warning("%s: registered without a pinned manifest; checked against its own manifest only "
                    "(allow_unpinned)", ref)
    elif sha256_file(folder / MANIFEST) != pinned:
        raise AdapterIntegrityError(
            f"adapter {ref!r}: its {MANIFEST} in the artifact store differs from the one registered "
            f"(sha256 {pinned[:16]}...): the artifact was changed after registration; re-register it"
        )


def _find_adapter_folder(root: Path) -> Path | None:
    if (root / MANIFEST).is_file():
        return root
    for candidate in (root / "artifacts" / "adapter", root / "adapter"):
        if (candidate / MANIFEST).is_file():
            return candidate
    hits = sorted(root.rglob(MANIFEST))
    return hits[0].parent if hits else None


def resolve(ref: str, *, tracking_uri: str | None = None, dst: str | Path | None = None,
            allow_pickle: bool = False, allow_unpinned: bool = False) -> tuple[Path, dict]:
    """Return (local folder, verified manifest) for an adapter reference. A registered version must
    carry the manifest sha256 pinned at registration (`allow_unpinned` accepts one without)."""
    if ref.startswith(MLFLOW_SCHEMES):
        import mlflow
        from mlflow.exceptions import MlflowException

        if tracking_uri:
            mlflow.set_tracking_uri(tracking_uri)
            mlflow.set_registry_uri(tracking_uri)
        try:
            local = Path(mlflow.artifacts.download_artifacts(ref, dst_path=str(dst) if dst else None))
        except MlflowException as exc:
            raise UnknownAdapterError(f"adapter {ref!r} not found in MLflow ({exc.message})") from None
    else:
        local = Path(ref).expanduser()
        if not local.exists():
            raise UnknownAdapterError(f"adapter {ref!r}: no such folder or MLflow URI")
    folder = _find_adapter_folder(local)
    if folder is None:
        raise UnknownAdapterError(f"adapter {ref!r}: no {MANIFEST} found under {local}")
    version = registered_version(ref, tracking_uri) if ref.startswith("models:/") else None
    if version is not None:
        check_pinned(version, ref, folder, allow_unpinned)
    return folder, verify(folder, allow_pickle=allow_pickle)
