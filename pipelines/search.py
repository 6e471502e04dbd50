"""`adapterflow tune SPEC`: the spec's `tune:` search on Ray Tune, tracked as a parent MLflow run with
a child run per trial, plotted, and its winner evaluated on the evaluation split and registered
through the same quality gate as a pipeline's adapter (the alias moves only when it earned it)."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console

from pipelines import tracking
from pipelines.spec import PipelineSpec, flatten
from workers.errors import DataError, ResourceError, SpecError, TrainingError

log = logging.getLogger(__name__)


@dataclass
class SearchResult:
    run_id: str
    trials: list[dict]
    counts: dict
    best: dict | None = None
    adapter_dir: Path | None = None
    report: dict = field(default_factory=dict)
    registration: tracking.Registration | None = None
    experiment_path: Path | None = None
    plots: list[str] = field(default_factory=list)


def check_search(spec: PipelineSpec) -> None:
    """Everything that would make the search fail, before any trial starts: no space, too little data
    for one batch or for a held-out slice, rungs past a trial's last step."""
    from tune.config import sparsifies
    from workers.data import load_holdout, load_train_eval
    from workers.stages import calibration_texts
    from workers.train_loop import plan_steps

    t = spec.tune
    if t is None or not t.space:
        raise SpecError("tune: the spec has no tune.space to search; add one, e.g. tune: {space: {train.lr: "
                        "{loguniform: [1.0e-4, 1.0e-2]}}}")
    data = spec.data.model_copy(update={"holdout_fraction": t.selection_fraction, "holdout_seed": t.selection_seed})
    held = load_holdout(data)
    train, _ = load_train_eval(data, spec.train.seed)
    if len(held) < 2:
        raise DataError(f"tune.selection_fraction {t.selection_fraction} of {len(train) + len(held)} training "
                        f"examples holds out {len(held)}; raise it so trials can be compared")
    if sparsifies(t.space):  # every trial calibrates Wanda on sparsify.split
        calibration_texts(spec.model_copy(update={"data": data}))
    _, total = plan_steps(len(train), spec.train)
    every = t.report_every or spec.train.checkpoint_every
    if t.scheduler == "asha" and every * t.asha.grace_period >= total:
        raise SpecError(f"tune.report_every: a trial trains {total} steps and is evaluated every {every}; ASHA's "
                        f"first rung (grace_period {t.asha.grace_period}) comes after its last step: lower "
                        "tune.report_every or raise the training budget")


def _check_resources(spec: PipelineSpec, resources: dict) -> None:
    import ray

    total = ray.cluster_resources()
    for res, amount in resources.items():
        if amount > total.get(res, 0) + 1e-9:
            raise ResourceError(f"tune.resources_per_trial asks for {amount:g} {res} but this Ray instance has "
                                f"{total.get(res, 0):g}; lower it")


def run_search(spec: PipelineSpec, spec_dict: dict, console: Console, *, resume: bool = False) -> SearchResult:
    from pipelines.search_runs import Progress, TrialRuns
    from tune.search import build_tuner, can_restore, concurrent_trials, restore_tuner, trial_resources
    from tune.space import reported_metric
    from workers.stages import check_inputs

    check_inputs(spec)
    check_search(spec)
    t = spec.tune
    uri, experiment_id, storage, name, path, parent = open_search(spec, spec_dict, console, resume)
    spec_json = spec.model_dump(mode="json", exclude={"tune"})
    resources = trial_resources(spec_json, t)
    _check_resources(spec, resources)
    import ray

    concurrent = concurrent_trials(spec_json, t, ray.cluster_resources())
    metric, mode = reported_metric(t, spec.model.task)
    callbacks = [TrialRuns(uri, experiment_id, parent),
                 Progress(console, metric, mode, None if _has_grid(t) else t.num_samples)]
    status = "FAILED"
    try:
        if resume and can_restore(path):
            console.print(f"resuming the search in {path}")
            tuner = restore_tuner(path, spec_json, t, callbacks)
        else:
            tuner = build_tuner(spec_json, t, spec.model.task, storage=storage, name=name, callbacks=callbacks,
                                max_concurrent=concurrent)
        grid = tuner.fit()
        result = _summarise(grid, parent, metric, mode, path)
        _print_summary(console, result, metric)
        if result.best is None:
            raise TrainingError(f"no trial of the search finished: {json.dumps(result.counts)}; see the failed "
                                f"trials' errors in MLflow (parent run {parent})")
        _finish(spec, result, metric, mode, console)
        status = "FINISHED"
        return result
    finally:
        tracking.end_run(parent, status)


def open_search(spec: PipelineSpec, spec_dict: dict, console: Console, resume: bool):
    """MLflow and Ray for a search: (tracking URI, experiment id, Tune storage, experiment name, its
    path, the parent run: the earlier one when a restorable search resumes)."""
    import mlflow

    from tune.search import can_restore
    from workers.stages import ensure_ray

    uri = tracking.setup(spec)
    experiment_id = mlflow.get_experiment_by_name(spec.track.experiment).experiment_id
    storage = spec.workspace_path() / "tune"
    name = f"{spec.name}-search"
    path = storage / name
    parent = _parent_run(spec, spec_dict, experiment_id, resume and can_restore(path))
    console.print(f"[bold]MLflow[/] search run {parent} in {uri}")
    dashboard = ensure_ray(spec)
    if dashboard:
        console.print(f"[bold]Ray[/] dashboard: http://{dashboard}")
    return uri, experiment_id, storage, name, path, parent


def _has_grid(t) -> bool:
    return any(d.kind == "grid" for d in t.space.values())


def _parent_run(spec: PipelineSpec, spec_dict: dict, experiment_id: str, resuming: bool) -> str:
    import mlflow

    client = mlflow.MlflowClient()
    if resuming:
        found = client.search_runs([experiment_id], f"tags.`adapterflow.search` = '{spec.name}'",
                                   order_by=["attributes.start_time DESC"], max_results=1)
        if found:
            client.update_run(found[0].info.run_id, status="RUNNING")
            return found[0].info.run_id
    run = client.create_run(experiment_id, run_name=f"{spec.name}-search",
                            tags={"adapterflow.search": spec.name, "adapterflow.method": spec.adapter.method,
                                  "adapterflow.task": spec.model.task, "adapterflow.base_model": spec.model.name})
    run_id = run.info.run_id  # written through the client: the run stays RUNNING while the search runs
    from mlflow.entities import Param

    params = flatten(spec.model_dump(mode="json", exclude={"tune"}))
    items = [Param(k, v[:6000]) for k, v in params.items()]
    for i in range(0, len(items), 100):
        client.log_batch(run_id, params=items[i:i + 100])
    client.log_dict(run_id, spec_dict, "spec.yaml")
    client.log_dict(run_id, spec.tune.model_dump(mode="json"), "search_space.json")
    return run_id


def _summarise(grid, parent: str, metric: str, mode: str, path: Path) -> SearchResult:
    """Every trial's outcome; the best among those that trained to their last step."""
    trials, counts = [], {"finished": 0, "stopped_early": 0, "failed": 0}
    errors: dict[str, int] = {}
    for r in grid:
        m = r.metrics or {}
        row = {"trial": m.get("trial_id") or Path(r.path).name, "config": r.config, "metrics": m,
               "checkpoint": r.checkpoint.path if r.checkpoint else None,
               "history": r.metrics_dataframe.to_dict("records") if r.metrics_dataframe is not None else []}
        if r.error is not None:
            row["status"] = "failed"
            why = str(r.error).strip().splitlines()[-1] if str(r.error).strip() else type(r.error).__name__
            row["error"] = why
            errors[why] = errors.get(why, 0) + 1
        elif m.get("step") is not None and m.get("step") >= m.get("total_steps", 0):
            row["status"] = "finished"
        else:
            row["status"] = "stopped_early"
        counts[row["status"]] += 1
        trials.append(row)
    done = [row for row in trials if row["status"] == "finished" and metric in row["metrics"]]
    best = None
    if done:
        best = (max if mode == "max" else min)(done, key=lambda row: row["metrics"][metric])
    counts["errors"] = errors
    return SearchResult(parent, trials, counts, best, experiment_path=path)


def _print_summary(console: Console, result: SearchResult, metric: str) -> None:
    c = result.counts
    console.print(f"search: {len(result.trials)} trials: {c['finished']} finished, {c['stopped_early']} stopped "
                  f"early, {c['failed']} failed")
    for why, n in c["errors"].items():
        console.print(f"  {n} failed: {why}", markup=False, highlight=False)
    if result.best:
        console.print(f"best (held-out {metric.removeprefix('held_out_')} "
                      f"{result.best['metrics'][metric]:.4f}): {json.dumps(result.best['config'])}",
                      markup=False, highlight=False)


def _finish(spec: PipelineSpec, result: SearchResult, metric: str, mode: str, console: Console) -> None:
    """The winner: its adapter out of its last checkpoint, evaluated on the evaluation split, logged
    with the plots and trial table to the parent run, and registered through the quality gate."""
    import mlflow

    from pipelines.run import print_report
    from pipelines.search_plots import metric_vs_sparsity, parallel_coordinates, trial_curves
    from tune.sparsity import discard_sparse_bases, trained_spec
    from workers.stages import build_artifact, evaluate_artifact

    best = result.best
    winner = PipelineSpec.model_validate(trained_spec(spec.model_dump(mode="json"), best["config"], best["metrics"]))
    winner = winner.model_copy(update={"data": winner.data.model_copy(update={
        "holdout_fraction": spec.tune.selection_fraction, "holdout_seed": spec.tune.selection_seed})})
    adapter_dir = build_artifact(winner, Path(best["checkpoint"]), spec.workspace_path() / "adapters" / result.run_id)
    report = evaluate_artifact(winner, adapter_dir)
    print_report(console, report)
    result.adapter_dir, result.report = adapter_dir, report
    figures = {"trial_curves.png": trial_curves(result.trials, metric),
               "parallel_coordinates.png": parallel_coordinates(result.trials, spec.tune, metric, mode),
               "metric_vs_sparsity.png": metric_vs_sparsity(result.trials, metric)}
    with mlflow.start_run(run_id=result.run_id):
        mlflow.log_params({f"best.{k}": json.dumps(v) if isinstance(v, (list, dict)) else str(v)
                           for k, v in best["config"].items()})
        mlflow.log_metrics({f"best_{metric}": float(best["metrics"][metric]), "trials": len(result.trials),
                            **{f"trials_{k}": float(v) for k, v in result.counts.items() if k != "errors"}})
        mlflow.log_dict({"trials": [{k: v for k, v in row.items() if k != "history"} for row in result.trials],
                         "counts": result.counts}, "trials.json")
        for fname, fig in figures.items():
            if fig is not None:
                mlflow.log_figure(fig, fname)
                result.plots.append(fname)
    tracking.log_results(result.run_id, [], report, best["metrics"])
    if spec.tune.register_winner:
        reg = tracking.log_and_register(result.run_id, adapter_dir, winner, report)
        client = mlflow.MlflowClient()
        client.set_model_version_tag(reg.name, reg.version, "adapterflow.search_run_id", result.run_id)
        client.set_model_version_tag(reg.name, reg.version, "adapterflow.trial_id", str(best["trial"]))
        client.set_model_version_tag(reg.name, reg.version, "adapterflow.trial_config", json.dumps(best["config"]))
        result.registration = reg
        verdict = "[green]moved[/]" if reg.moved else "[yellow]stays[/]"
        console.print(f"registered {reg.name} version {reg.version}; @{reg.alias} {verdict}: {reg.reason}")
    discard_sparse_bases(result.trials, best, spec.tune.keep_sparse_bases)
