"""`adapterflow tune SPEC` with `tune.nls`: the NLS sub-adapter search. One trained super-adapter (given,
or trained first with the selection slice held out), its rank configurations evaluated on the held-out
slice by Ray Tune trials (no training), the Pareto front of held-out metric against LoRA parameters
written as CSV and PNG, and the chosen sub-adapter extracted (plain LoRA that stock PEFT loads),
evaluated on the evaluation split and registered with its lineage through the quality gate."""

from __future__ import annotations

import csv
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.table import Table

from pipelines import tracking
from pipelines.search import SearchResult, _check_resources, open_search
from pipelines.spec import PipelineSpec
from workers.errors import SpecError, TrainingError

SUPER_TAG = "adapterflow.super_adapter"
SUPER_RUN_TAG = "adapterflow.super_adapter_run_id"


@dataclass
class NlsResult(SearchResult):
    rows: list[dict] = field(default_factory=list)  # one per distinct configuration evaluated
    chosen: dict | None = None
    super_adapter: Path | None = None
    super_run_id: str | None = None
    pareto_csv: Path | None = None
    pareto_png: Path | None = None
    references: dict = field(default_factory=dict)  # version -> its evaluation-split report
    timings: dict = field(default_factory=dict)  # super_adapter_s (0 when given), search_s, finish_s


def run_nls_search(spec: PipelineSpec, spec_dict: dict, console: Console, *, resume: bool = False) -> NlsResult:
    import ray

    from pipelines.search_runs import Progress, TrialRuns
    from tune.nls import build_nls_tuner, load_groups, num_trials, restore_nls_tuner
    from tune.search import can_restore, concurrent_trials
    from tune.space import reported_metric
    from workers.stages import check_inputs

    check_inputs(spec)
    check_nls(spec)
    t = spec.tune
    uri, experiment_id, storage, name, path, parent = open_search(spec, spec_dict, console, resume)
    resuming = resume and can_restore(path)
    status = "FAILED"
    timings = {}
    try:
        t0 = time.perf_counter()
        folder, super_run, method = _super_adapter(spec, spec_dict, console, parent, resuming)
        timings["super_adapter_s"] = time.perf_counter() - t0
        _check_resources(spec, t.resources_per_trial)
        spec_json = spec.model_dump(mode="json", exclude={"tune"})
        metric, mode = reported_metric(t, spec.model.task)
        groups = load_groups(folder, method)
        check_grid(t, groups)
        total = num_trials(t, groups, method)
        console.print(f"NLS search over {len(groups)} groups ({_space_text(groups)}): {total} configurations")
        callbacks = [TrialRuns(uri, experiment_id, parent),
                     Progress(console, metric, mode, total, columns=("ranks", "lora_params"))]
        if resuming:
            console.print(f"resuming the search in {path}")
            tuner = restore_nls_tuner(path, spec_json, t, folder, method, callbacks)
        else:
            tuner = build_nls_tuner(spec_json, t, spec.model.task, folder, method, storage=storage, name=name,
                                    callbacks=callbacks,
                                    max_concurrent=concurrent_trials(spec_json, t, ray.cluster_resources()))
        t0 = time.perf_counter()
        grid = tuner.fit()
        timings["search_s"] = time.perf_counter() - t0
        result = _collect(grid, parent, metric, mode, groups, method, path, t.nls.max_drop)
        result.super_adapter, result.super_run_id, result.timings = folder, super_run, timings
        if not result.rows:
            raise TrainingError(f"no configuration of the NLS search was evaluated: {json.dumps(result.counts)}; see "
                                f"the failed trials' errors in MLflow (parent run {parent})")
        t0 = time.perf_counter()
        _finish(spec, result, metric, mode, console)
        timings["finish_s"] = time.perf_counter() - t0
        status = "FINISHED"
        return result
    finally:
        tracking.end_run(parent, status)


MAX_GRID = 4096


def check_nls(spec: PipelineSpec) -> None:
    """Before anything runs: a held-out slice to select on; a given super-adapter that exists."""
    from workers.data import load_holdout
    from workers.errors import DataError

    t = spec.tune
    held = load_holdout(spec.data.model_copy(update={"holdout_fraction": t.selection_fraction,
                                                     "holdout_seed": t.selection_seed}))
    if len(held) < 2:
        raise DataError(f"tune.selection_fraction {t.selection_fraction} holds out {len(held)} training examples; "
                        "raise it so configurations can be compared")
    ref = t.nls.super_adapter
    if ref and not ref.startswith(("models:/", "runs:/")) and not Path(ref).expanduser().is_dir():
        raise SpecError(f"tune.nls.super_adapter: {ref!r} is not a folder; give a super-adapter folder or models:/NAME/N")


def check_grid(t, groups: list[dict]) -> None:
    from tune.nls import space_size

    if t.nls.grid and space_size(groups) > MAX_GRID:
        raise SpecError(f"tune.nls.grid: the super-adapter's space has {space_size(groups)} configurations (more than "
                        f"{MAX_GRID}); sample them instead: grid: false with tune.num_samples and searcher: optuna")


def _space_text(groups: list[dict]) -> str:
    spaces = {json.dumps(g["search_space"]) for g in groups}
    return f"ranks {spaces.pop()} each" if len(spaces) == 1 else "ranks per group as in the elastic config"


def _super_adapter(spec: PipelineSpec, spec_dict: dict, console: Console, parent: str,
                   resuming: bool) -> tuple[Path, str | None, str]:
    """The super-adapter's verified folder, the MLflow run that trained it (when known) and its method."""
    import mlflow

    from workers.methods import get_method, methods
    from workers.store import registered_version, resolve

    client = mlflow.MlflowClient()
    tags = client.get_run(parent).data.tags
    t = spec.tune
    if resuming and tags.get(SUPER_TAG):
        ref, run_id = tags[SUPER_TAG], tags.get(SUPER_RUN_TAG)
    elif t.nls.super_adapter:
        ref = t.nls.super_adapter
        version = registered_version(ref, tracking.tracking_uri(spec)) if ref.startswith("models:/") else None
        run_id = version.run_id if version is not None else None
    else:
        ref, run_id = _train_super_adapter(spec, spec_dict, console, parent)
    dst = spec.workspace_path() / "tune" / f"{spec.name}-search" / "super_adapter" if ref.startswith(
        ("models:/", "runs:/")) else None
    folder, manifest = resolve(ref, tracking_uri=tracking.tracking_uri(spec), dst=dst)
    method = get_method(manifest["method"])
    if not method.subadapters:
        able = ", ".join(sorted(n for n, m in methods().items() if m.subadapters))
        raise SpecError(f"tune.nls.super_adapter {ref!r} is a {method.name} adapter, which has no sub-adapters to "
                        f"search; train one with a method that has ({able})")
    method.subadapter_space(folder)  # its space is readable
    held = manifest.get("holdout") or {}
    if t.nls.super_adapter and (held.get("fraction"), held.get("seed")) != (t.selection_fraction, t.selection_seed):
        console.print(f"[yellow]warning:[/] {ref} was not trained with this search's selection slice held out "
                      f"(tune.selection_fraction {t.selection_fraction}, seed {t.selection_seed}): selection may "
                      "favour configurations that fit examples it trained on; leave tune.nls.super_adapter out to "
                      "train one that holds it out")
        client.set_tag(parent, "adapterflow.selection_slice_seen_in_training", "possibly")
    client.set_tag(parent, SUPER_TAG, ref)
    if run_id:
        client.set_tag(parent, SUPER_RUN_TAG, run_id)
    return folder, run_id, method.name


def _train_super_adapter(spec: PipelineSpec, spec_dict: dict, console: Console, parent: str) -> tuple[str, str]:
    """Train the spec's NLS adapter with the selection slice held out, as its own MLflow run under the
    search's parent run (not registered: the search registers the sub-adapter it chooses)."""
    import mlflow

    from pipelines.run import train_and_register

    t = spec.tune
    trained = spec.model_copy(update={"data": spec.data.model_copy(update={
        "holdout_fraction": t.selection_fraction, "holdout_seed": t.selection_seed}), "tune": None})
    console.print("[bold]training the NLS super-adapter[/] (the selection slice held out)")
    res = train_and_register(trained, {k: v for k, v in spec_dict.items() if k != "tune"}, console, register=False)
    mlflow.MlflowClient().set_tag(res.run_id, "mlflow.parentRunId", parent)
    return str(res.adapter_dir), res.run_id


def _collect(grid, parent: str, metric: str, mode: str, groups: list[dict], method: str, path: Path,
             max_drop: float) -> NlsResult:
    from tune.nls import PARAMS_METRIC, choose, pareto_front, ranks_of, reference_points

    refs = {tuple(ranks_of(c, len(groups))): v for v, c in reference_points(groups, method).items()}
    trials, rows, seen = [], [], set()
    counts = {"finished": 0, "stopped_early": 0, "failed": 0}
    errors: dict[str, int] = {}
    for r in grid:
        m = r.metrics or {}
        ranks = ranks_of(r.config, len(groups))
        row = {"trial": m.get("trial_id") or Path(r.path).name, "config": r.config, "metrics": m, "history": []}
        if r.error is not None or metric not in m:
            why = str(r.error).strip().splitlines()[-1] if r.error is not None and str(r.error).strip() else "no result"
            row.update(status="failed", error=why)
            errors[why] = errors.get(why, 0) + 1
        else:
            row["status"] = "finished"
            if tuple(ranks) not in seen:
                seen.add(tuple(ranks))
                rows.append({"trial": row["trial"], "ranks": ranks, "params": int(m[PARAMS_METRIC]),
                             "metric": float(m[metric]), "reference": refs.get(tuple(ranks), "")})
        counts[row["status"]] += 1
        trials.append(row)
    counts["errors"] = errors
    result = NlsResult(parent, trials, counts, experiment_path=path, rows=rows)
    if rows:
        front = set(pareto_front(rows, mode))
        for i, row in enumerate(rows):
            row["on_front"] = i in front
        chosen = rows[choose(rows, sorted(front), mode, max_drop)]
        chosen["chosen"] = True
        result.chosen = chosen
        result.best = next(t for t in trials if t["trial"] == chosen["trial"])
    return result


def write_front(rows: list[dict], metric: str, csv_path: Path) -> None:
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    with csv_path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["trial", "ranks", "lora_params", metric, "on_front", "reference", "chosen"])
        for r in sorted(rows, key=lambda r: r["params"]):
            w.writerow([r["trial"], " ".join(map(str, r["ranks"])), r["params"], f"{r['metric']:.6f}",
                        int(r["on_front"]), r["reference"], int(bool(r.get("chosen")))])


def front_plot(rows: list[dict], metric: str, mode: str):
    """Held-out metric against LoRA parameters: every configuration, the front as a line, SQFT's
    reference configurations and the chosen one labelled."""
    from pipelines.search_plots import _plt

    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.scatter([r["params"] for r in rows], [r["metric"] for r in rows], s=18, c="#9aa5b1",
               label="configurations")
    front = sorted((r for r in rows if r["on_front"]), key=lambda r: r["params"])
    ax.plot([r["params"] for r in front], [r["metric"] for r in front], "-o", c="#1f77b4", ms=5, label="Pareto front")
    for r in rows:
        if r["reference"]:
            ax.annotate(r["reference"], (r["params"], r["metric"]), textcoords="offset points", xytext=(4, 6),
                        fontsize=8)
            ax.scatter([r["params"]], [r["metric"]], s=40, marker="s", facecolors="none", edgecolors="#d62728")
        if r.get("chosen"):
            ax.scatter([r["params"]], [r["metric"]], s=140, marker="*", c="#ff7f0e", label="chosen", zorder=3)
    ax.set_xlabel("LoRA parameters of the sub-adapter")
    label = metric.replace("held_out_", "held-out ")
    ax.set_ylabel(label + (" (higher is better)" if mode == "max" else " (lower is better)"))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def _finish(spec: PipelineSpec, result: NlsResult, metric: str, mode: str, console: Console) -> None:
    import mlflow

    from pipelines.run import print_report
    from workers.artifact import read_manifest
    from workers.methods import get_method
    from workers.stages import evaluate_artifact

    t = spec.tune
    rows = result.rows
    out = result.experiment_path
    result.pareto_csv = out / "pareto_front.csv"
    write_front(rows, metric, result.pareto_csv)
    fig = front_plot(rows, metric, mode)
    result.pareto_png = out / "pareto_front.png"
    fig.savefig(result.pareto_png, dpi=110)
    _print_front(console, rows, metric)
    chosen = result.chosen
    manifest = read_manifest(result.super_adapter)
    source = result.super_run_id and f"runs:/{result.super_run_id}" or t.nls.super_adapter or str(result.super_adapter)
    sub_dir = spec.workspace_path() / "adapters" / result.run_id
    evaluated = {}
    method = get_method(manifest["method"])
    winner = None
    for label, ranks in [("chosen", chosen["ranks"])] + [(r["reference"], r["ranks"]) for r in rows if r["reference"]]:
        target = sub_dir if label == "chosen" else out / "references" / label
        method.extract_subadapter(result.super_adapter, manifest, target, ranks, source=source)
        winner = winner or _sub_spec(spec, read_manifest(target))
        evaluated[label] = evaluate_artifact(winner, target)
    result.adapter_dir, result.report = sub_dir, evaluated["chosen"]
    result.references = {k: v for k, v in evaluated.items() if k != "chosen"}
    console.print(f"chosen sub-adapter: ranks {chosen['ranks']}, {chosen['params']} LoRA parameters, held-out "
                  f"{metric.removeprefix('held_out_')} {chosen['metric']:.4f}")
    print_report(console, result.report)
    with mlflow.start_run(run_id=result.run_id):
        mlflow.log_params({"best.ranks": json.dumps(chosen["ranks"]), "best.lora_params": chosen["params"]})
        sel = spec.track.selection(spec.model.task)[0]
        mlflow.log_metrics({f"best_{metric}": chosen["metric"], "best_lora_params": float(chosen["params"]),
                            "trials": len(result.trials), "front_size": float(sum(r["on_front"] for r in rows)),
                            **{f"trials_{k}": float(v) for k, v in result.counts.items() if k != "errors"},
                            **{f"{v}_{sel}": float(rep[sel]) for v, rep in result.references.items() if sel in rep}})
        mlflow.log_artifact(str(result.pareto_csv))
        mlflow.log_figure(fig, "pareto_front.png")
        mlflow.log_dict({"rows": rows, "counts": result.counts,
                         "references": result.references}, "trials.json")
    result.plots.append("pareto_front.png")
    tracking.log_results(result.run_id, [], result.report, chosen and {"lora_params": chosen["params"]})
    if t.register_winner:
        reg = tracking.log_and_register(result.run_id, sub_dir, winner, result.report)
        client = mlflow.MlflowClient()
        for k, v in {"adapterflow.search_run_id": result.run_id, "adapterflow.nls_ranks": json.dumps(chosen["ranks"]),
                     "adapterflow.lora_params": str(chosen["params"]), SUPER_TAG: source,
                     SUPER_RUN_TAG: result.super_run_id or ""}.items():
            client.set_model_version_tag(reg.name, reg.version, k, v)
        result.registration = reg
        verdict = "[green]moved[/]" if reg.moved else "[yellow]stays[/]"
        console.print(f"registered {reg.name} version {reg.version}; @{reg.alias} {verdict}: {reg.reason}")


def _sub_spec(spec: PipelineSpec, sub_manifest: dict) -> PipelineSpec:
    """The spec a sub-adapter is evaluated and registered under: the search's, with the adapter section
    its manifest records (NLS: the LoRA it is, with its rank and alpha patterns)."""
    data = spec.model_dump(mode="json", exclude={"tune"})
    data["adapter"] = dict(sub_manifest["adapter"])
    return PipelineSpec.model_validate(data)


def _print_front(console: Console, rows: list[dict], metric: str) -> None:
    table = Table(title="Pareto front (held-out selection slice)")
    for col in ("ranks", "LoRA params", metric.removeprefix("held_out_"), "reference", ""):
        table.add_column(col)
    for r in sorted((r for r in rows if r["on_front"]), key=lambda r: r["params"]):
        table.add_row(" ".join(map(str, r["ranks"])), str(r["params"]), f"{r['metric']:.4f}", r["reference"],
                      "chosen" if r.get("chosen") else "")
    console.print(table)
