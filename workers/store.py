"""The adapter store: resolve an adapter reference to a verified local folder.

A reference is a local adapter folder, or an MLflow URI (`models:/NAME@ALIAS`, `models:/NAME/3`,
`runs:/RUN_ID/adapter`) of an adapter that a pipeline registered. Files are checked against the
manifest's sha256 before anything loads them.
"""

from __future__ import annotations

from pathlib import Path

from workers.artifact import MANIFEST, verify
from workers.errors import UnknownAdapterError

MLFLOW_SCHEMES = ("models:/", "runs:/", "mlflow-artifacts:/")


def _find_adapter_folder(root: Path) -> Path | None:
    if (root / MANIFEST).is_file():
        return root
    for candidate in (root / "artifacts" / "adapter", root / "adapter"):
        if (candidate / MANIFEST).is_file():
            return candidate
    hits = sorted(root.rglob(MANIFEST))
    return hits[0].parent if hits else None


def resolve(ref: str, *, tracking_uri: str | None = None, dst: str | Path | None = None,
            allow_pickle: bool = False) -> tuple[Path, dict]:
    """Return (local folder, verified manifest) for an adapter reference."""
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
    return folder, verify(folder, allow_pickle=allow_pickle)
