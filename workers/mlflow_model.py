"""MLflow pyfunc model of an adapter ("models from code": nothing is pickled).

`mlflow.pyfunc.load_model("models:/NAME@ALIAS").predict(["a sentence", ...])` (a list of texts or
prompts) returns, for a
sequence-classification adapter, a DataFrame with the decided label and one probability column per
class; for a causal-LM adapter, the completions as a list of strings.

Loading checks the adapter as `workers.store.resolve` does: its manifest against the sha256 pinned
at registration, its base the operator's (see `pinned_base`).
"""

import json
import logging
from pathlib import Path

import mlflow
from mlflow.pyfunc import PythonModel

from workers.errors import AdapterIntegrityError

log = logging.getLogger(__name__)


def _as_list(model_input) -> list:
    try:
        import pandas as pd

        if isinstance(model_input, pd.DataFrame):
            col = next((c for c in ("text", "prompt", "inputs") if c in model_input.columns),
                       model_input.columns[0])
            return model_input[col].tolist()
        if isinstance(model_input, pd.Series):
            return model_input.tolist()
    except ImportError:  # pandas comes with mlflow; keep plain lists working without it
        pass
    if isinstance(model_input, str):
        return [model_input]
    return list(model_input)


def _logged_with(folder: Path) -> dict:
    """The MLmodel file of the model holding `folder` (its run and logged-model ids)."""
    import yaml

    for root in list(folder.parents)[:3]:
        if (root / "MLmodel").is_file():
            return yaml.safe_load((root / "MLmodel").read_text()) or {}
    return {}


def _registered(folder: Path):
    """The registry's version of this model, when a registry is configured and knows it."""
    from mlflow.environment_variables import MLFLOW_REGISTRY_URI, MLFLOW_TRACKING_URI
    from mlflow.exceptions import MlflowException

    from workers.store import version_of_logged_model

    meta = _logged_with(folder)
    if not (meta.get("run_id") and meta.get("model_id")) or not (
            MLFLOW_TRACKING_URI.defined or MLFLOW_REGISTRY_URI.defined):
        return None
    try:
        return version_of_logged_model(meta["run_id"], meta["model_id"], mlflow.get_registry_uri())
    except MlflowException as exc:
        log.warning("%s: the registry cannot be asked (%s); checked against the model's own record", folder, exc)
        return None


def pinned_base(folder: Path, config: dict) -> dict:
    """The base this model is served on, its manifest checked first. Authoritative: the registry's
    version tags, which the operator's pipeline wrote (the MLmodel file lives in the artifact store,
    where it can be edited). Without a registry that knows the model: the manifest sha256 and base
    recorded in `model_config` at log time, and then never with remote code."""
    from workers.artifact import MANIFEST
    from workers.common import sha256_file
    from workers.store import BASE_TAG, check_pinned

    version = _registered(folder)
    if version is not None:
        check_pinned(version, f"models:/{version.name}/{version.version}", folder)
        if version.tags.get(BASE_TAG):
            return json.loads(version.tags[BASE_TAG])
    else:
        pinned = config.get("manifest_sha256")
        if pinned is None:
            raise AdapterIntegrityError(
                f"{folder}: this MLflow model records no manifest sha256 (logged by an older adapterflow) and no "
                "registry that knows it is configured; re-register it with this version of adapterflow, or load "
                "it through its registry (set the tracking URI, then models:/NAME@ALIAS)")
        if sha256_file(folder / MANIFEST) != pinned:
            raise AdapterIntegrityError(
                f"{folder}: its {MANIFEST} differs from the one logged with the model (sha256 {pinned[:16]}...): "
                "the artifact was changed after it was logged; re-register it")
    base = config.get("base")
    if not base:
        raise AdapterIntegrityError(f"{folder}: no base model recorded; pass mlflow.pyfunc.load_model(..., "
                                    "model_config={'base': {'name': MODEL}})")
    if base.get("trust_remote_code"):
        raise AdapterIntegrityError(
            f"{folder}: the base in the model's own record asks for trust_remote_code; only the registry's "
            "record of the operator's base can: refused. Load it through its registry (models:/NAME@ALIAS)")
    return base


class AdapterModel(PythonModel):
    def load_context(self, context):
        from workers.artifact import verify
        from workers.inference import Engine
        from workers.models import base_fingerprint
        from workers.trust import check_against_base, refuse_remote_code, serving_spec

        folder = Path(context.artifacts["adapter"])
        manifest = verify(folder)
        refuse_remote_code(manifest, folder)
        spec = serving_spec(manifest, pinned_base(folder, context.model_config or {}), folder)
        check_against_base(manifest, spec, base_fingerprint(spec), folder)  # before any base is built
        self.task = manifest["task"]
        self.engine = Engine(spec)
        self.engine.add_adapter("adapter", folder, manifest)

    def predict(self, context, model_input: list[str], params: dict | None = None):
        params = params or {}
        inputs = _as_list(model_input)
        if self.task == "seq-cls":
            import pandas as pd

            rows = self.engine.classify("adapter", inputs)
            return pd.DataFrame(
                [{"label": r["label"], **{f"prob_{k}": v for k, v in r["probabilities"].items()}}
                 for r in rows]
            )
        return [
            self.engine.complete("adapter", p, max_tokens=int(params.get("max_tokens", 64)))["text"]
            for p in inputs
        ]


mlflow.models.set_model(AdapterModel())
