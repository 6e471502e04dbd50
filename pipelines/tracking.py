"""MLflow tracking and registry for pipeline runs.

Embedded default: `sqlite:///<workspace>/mlflow.db` with artifacts under `<workspace>/mlartifacts`.
One writer at a time on SQLite: this driver before and after training, rank 0 during it.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from pipelines.spec import PipelineSpec, flatten
from workers.common import quiet_environment
from workers.errors import SpecError

log = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parents[1]
PYFUNC_CODE = ROOT / "workers" / "mlflow_model.py"
PIP_REQUIREMENTS = [
    "torch==2.13.0", "transformers>=5.20,<6", "peft==0.21.2", "safetensors>=0.5", "pydantic>=2.10,<3",
]


def tracking_uri(spec: PipelineSpec) -> str:
    if spec.track.tracking_uri:
        return spec.track.tracking_uri
    return f"sqlite:///{spec.workspace_path() / 'mlflow.db'}"


def _quiet_mlflow() -> None:
    quiet_environment()
    logging.getLogger("alembic").setLevel(logging.WARNING)


def setup(spec: PipelineSpec) -> str:
    """Point MLflow at the spec's store, create the experiment; return the tracking URI."""
    _quiet_mlflow()
    import mlflow

    uri = tracking_uri(spec)
    if uri.startswith("sqlite:///"):
        spec.workspace_path().mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    client = mlflow.MlflowClient()
    if client.get_experiment_by_name(spec.track.experiment) is None:
        location = None
        if uri.startswith("sqlite:///"):
            location = (spec.workspace_path() / "mlartifacts").as_uri()
        client.create_experiment(spec.track.experiment, artifact_location=location)
    mlflow.set_experiment(spec.track.experiment)
    return uri


def start_run(spec: PipelineSpec, spec_dict: dict) -> str:
    import mlflow

    exp = mlflow.get_experiment_by_name(spec.track.experiment)
    run = mlflow.MlflowClient().create_run(
        exp.experiment_id, run_name=spec.name,
        tags={"adapterflow.method": spec.adapter.method, "adapterflow.task": spec.model.task,
              "adapterflow.base_model": spec.model.name},
    )
    run_id = run.info.run_id
    params = flatten(spec.model_dump(mode="json"))
    with mlflow.start_run(run_id=run_id):
        mlflow.log_params({k: v[:6000] for k, v in params.items()})
        mlflow.log_dict(spec_dict, "spec.yaml")
    return run_id


def end_run(run_id: str, status: str = "FINISHED") -> None:
    import mlflow

    mlflow.MlflowClient().set_terminated(run_id, status=status)


def log_results(run_id: str, history: list[dict], report: dict, train_metrics: dict,
                backlog: list | None = None) -> None:
    """The run's results: evaluation scores, parameter counts, the history and loss curve, and first the
    step metrics rank 0 could not send while the tracking server was away (`backlog`: (key, value,
    timestamp, step) lists; sent as they were logged, so what did arrive is not doubled)."""
    import mlflow

    from workers.metric_sender import send

    if backlog:
        send(mlflow.MlflowClient(), run_id, [tuple(m) for m in backlog])
    with mlflow.start_run(run_id=run_id):
        scalars = {k: float(v) for k, v in report.items() if isinstance(v, (int, float))}
        mc = report.get("monte_carlo") or {}
        scalars.update({f"mc_{k}": float(v) for k, v in mc.items()
                        if isinstance(v, (int, float)) and k not in ("samples", "seed")})
        mlflow.log_metrics(scalars)
        for k in ("trainable_params", "total_params", "train_seconds", "tracking_failures", "train_tokens",
                  "tokens_per_s", "real_token_share"):
            if k in train_metrics:
                mlflow.log_metric(k, float(train_metrics[k]))
        if "batching" in train_metrics:
            mlflow.set_tag("batching", train_metrics["batching"])
        mlflow.log_dict(report, "evaluation.json")
        mlflow.log_dict({"history": history}, "train_history.json")
        if history:
            mlflow.log_figure(loss_curve(history), "loss_curve.png")


def unreachable(uri: str, run_id: str, adapter_dir: Path, error: Exception, **results):
    """The error for a tracking server that stayed away after training: the results it missed are
    written beside the adapter, and the message says where both are."""
    from workers.errors import TrackingError

    saved = Path(adapter_dir).with_name(f"{Path(adapter_dir).name}.results.json")
    saved.write_text(json.dumps({"run_id": run_id, "tracking_uri": uri, **results}, indent=1, default=str))
    return TrackingError(
        f"MLflow at {uri} did not answer after training ({type(error).__name__}: {str(error)[:300]}).\n"
        f"Nothing trained is lost: the adapter is in {adapter_dir} (serve it: adapterflow serve {adapter_dir}),\n"
        f"and the results run {run_id} did not get (evaluation, step metrics, history) are in {saved}.\n"
        "Start the tracking server again, or check track.tracking_uri, and rerun to register."
    )


def loss_curve(history: list[dict]):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([h["step"] for h in history], [h["loss"] for h in history], lw=1)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


@dataclass
class Registration:
    name: str
    version: str
    alias: str
    moved: bool
    reason: str
    model_uri: str


def log_and_register(run_id: str, adapter_dir: Path, spec: PipelineSpec, report: dict) -> Registration:
    """Log the adapter as an MLflow Model, register a version, and move the alias if it earned it."""
    import mlflow

    name = spec.registered_model_name()
    metric, greater = spec.track.selection(spec.model.task)
    if metric not in report:
        raise SpecError(f"track.selection_metric {metric!r} is not in the evaluation report "
                       f"({', '.join(k for k, v in report.items() if isinstance(v, (int, float)))})")
    with mlflow.start_run(run_id=run_id):
        version = _log_version(adapter_dir, spec.model, name)
    client = mlflow.MlflowClient()
    value = float(report[metric])
    client.set_model_version_tag(name, version, "selection_metric", metric)
    client.set_model_version_tag(name, version, metric, repr(value))
    moved, reason = _decide_alias(client, name, spec.track.alias, metric, greater, value, version)
    if moved:
        client.set_registered_model_alias(name, spec.track.alias, version)
    return Registration(name, version, spec.track.alias, moved, reason, f"models:/{name}/{version}")


def _log_version(adapter_dir: Path, model, name: str) -> str:
    """Log the adapter as the active run's MLflow Model and register a version of `name`, pinning its
    manifest's sha256 and the operator's base (`model`, a ModelSpec) as version tags: resolving it
    later checks both (an edited manifest or file in the artifact store is refused). The model's
    `model_config` records both too, for a pyfunc load that no registry answers (the registry's
    tags win where there is one: the MLmodel file sits in the artifact store)."""
    import mlflow

    from workers.artifact import MANIFEST
    from workers.common import sha256_file
    from workers.store import BASE_TAG, MANIFEST_TAG, base_record

    base = base_record(model)
    digest = sha256_file(Path(adapter_dir) / MANIFEST)
    info = mlflow.pyfunc.log_model(
        name="adapter",
        python_model=str(PYFUNC_CODE),
        artifacts={"adapter": str(adapter_dir)},
        code_paths=[str(ROOT / "workers")],
        pip_requirements=PIP_REQUIREMENTS,
        model_config={"base": base, "manifest_sha256": digest},
        registered_model_name=name,
    )
    client = mlflow.MlflowClient()
    version = str(info.registered_model_version)
    client.set_model_version_tag(name, version, MANIFEST_TAG, digest)
    client.set_model_version_tag(name, version, BASE_TAG, json.dumps(base, sort_keys=True))
    return version


def register_imported(adapter_dir: Path, manifest: dict, name: str, tracking_uri: str,
                      alias: str | None = None) -> Registration:
    """Register an imported adapter (`adapterflow import --register`) in the store at `tracking_uri`:
    a run of the experiment `imported` logs it, a version of `name` pins it; `alias` moves only when
    asked (an imported adapter has no evaluation to earn it)."""
    _quiet_mlflow()
    import mlflow

    from workers.config import ModelSpec

    model = ModelSpec.model_validate({**manifest["model"], "task": manifest["task"]})
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    client = mlflow.MlflowClient()
    if client.get_experiment_by_name("imported") is None:
        location = None
        if tracking_uri.startswith("sqlite:///"):
            location = (Path(tracking_uri[len("sqlite:///"):]).parent / "mlartifacts").as_uri()
        client.create_experiment("imported", artifact_location=location)
    mlflow.set_experiment("imported")
    with mlflow.start_run(run_name=f"import-{name}"):
        mlflow.log_params({"method": manifest["method"], "task": manifest["task"], "base": model.name,
                           "imported_from": manifest.get("imported_from", str(adapter_dir))})
        version = _log_version(adapter_dir, model, name)
    if alias:
        client.set_registered_model_alias(name, alias, version)
    reason = f"@{alias} set to version {version}" if alias else "no alias set (--alias NAME sets one)"
    return Registration(name, version, alias or "", bool(alias), reason, f"models:/{name}/{version}")


def _decide_alias(client, name, alias, metric, greater, value, version) -> tuple[bool, str]:
    from mlflow.exceptions import MlflowException

    try:
        holder = client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return True, f"no version held @{alias}; version {version} takes it ({metric}={value:.4f})"
    held = holder.tags.get(metric)
    held_value = float(held) if held is not None else client.get_run(holder.run_id).data.metrics.get(metric)
    if held_value is None:
        return True, f"version {holder.version} @{alias} has no {metric}; version {version} takes it"
    better = value >= held_value if greater else value <= held_value
    sign = ">=" if greater else "<="
    if better:
        return True, (f"version {version} {metric}={value:.4f} {sign} {held_value:.4f} of version "
                      f"{holder.version}: @{alias} moves to {version}")
    return False, (f"version {version} {metric}={value:.4f} is worse than {held_value:.4f} of version "
                   f"{holder.version}: @{alias} stays on {holder.version}")
