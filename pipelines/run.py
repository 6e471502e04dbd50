"""Stage orchestration: train -> evaluate -> register -> deploy -> sample requests -> stop."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.table import Table

from pipelines import tracking
from pipelines.progress import training_progress
from pipelines.spec import PipelineSpec
from workers import cluster, timeline
from workers.stages import build_artifact, check_inputs, ensure_ray, evaluate, launch_training

log = logging.getLogger(__name__)


@dataclass
class RunResult:
    run_id: str
    adapter_dir: Path
    report: dict
    registration: tracking.Registration | None
    train_metrics: dict
    history: list[dict]
    timings: dict = field(default_factory=dict)
    url: str | None = None
    samples: list[dict] = field(default_factory=list)
    worker_timelines: dict[int, dict] = field(default_factory=dict)


def train_and_register(spec: PipelineSpec, spec_dict: dict, console: Console, *,
                       register: bool = True) -> RunResult:
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    # on the head `adapterflow up` keeps, connecting costs little and the checks run on a warm worker;
    # otherwise check first, so a wrong path fails before Ray starts
    connect_first = spec.ray_address is None and cluster.head_address() is not None
    dashboard = ensure_ray(spec) if connect_first else None
    if connect_first:
        timeline.mark("ray_ready")
    check_inputs(spec)
    timeline.mark("inputs_checked")
    uri = tracking.setup(spec)
    timeline.mark("mlflow_setup")
    run_id = tracking.start_run(spec, spec_dict)
    timeline.mark("mlflow_run_started")
    console.print(f"[bold]MLflow[/] run {run_id} in {uri}")
    console.print(f"  look: mlflow ui --backend-store-uri {uri}")
    if not connect_first:
        dashboard = ensure_ray(spec)
        timeline.mark("ray_ready")
    if dashboard:
        console.print(f"[bold]Ray[/] dashboard: http://{dashboard}")
    timings["setup_s"] = time.perf_counter() - t0
    status = "FAILED"
    try:
        label = (f"training {spec.adapter.method} on {spec.train.num_workers or 'local'} worker(s), "
                 f"ZeRO-{spec.train.zero_stage}")
        with training_progress(console, label) as board:
            t = time.perf_counter()
            outcome = launch_training(spec, mlflow_cfg={"tracking_uri": uri, "run_id": run_id,
                                                                    "flush_s": spec.track.flush_timeout_s}, progress=board)
            timings["train_s"] = time.perf_counter() - t
        m = outcome.metrics
        console.print(f"trained {m.get('step')} steps, final loss {m.get('loss', float('nan')):.4f}, "
                      f"{m.get('trainable_params')} trainable of {m.get('total_params')} parameters")
        adapter_dir = build_artifact(spec, outcome.checkpoint,
                                     spec.workspace_path() / "adapters" / run_id)
        timeline.mark("artifact_built")
        with console.status("evaluating..."):
            t = time.perf_counter()
            report = evaluate(spec, adapter_dir)
            timings["eval_s"] = time.perf_counter() - t
        timeline.mark("evaluated")
        print_report(console, report)
        backlog = outcome.metrics.pop("tracking_backlog", [])
        if outcome.metrics.get("tracking_failures"):
            console.print(f"[yellow]MLflow[/] did not answer {outcome.metrics['tracking_failures']} write(s) during "
                          f"training; {len(backlog)} step metrics held back are sent now")
        try:
            tracking.log_results(run_id, outcome.history, report, outcome.metrics, backlog=backlog)
        except Exception as e:
            raise tracking.unreachable(uri, run_id, adapter_dir, e, history=outcome.history, report=report,
                                       backlog=backlog) from e
        timeline.mark("results_logged")
        reg = None
        if register:
            t = time.perf_counter()
            reg = tracking.log_and_register(run_id, adapter_dir, spec, report)
            timings["register_s"] = time.perf_counter() - t
            timeline.mark("registered")
            verdict = "[green]moved[/]" if reg.moved else "[yellow]stays[/]"
            console.print(f"registered {reg.name} version {reg.version}; @{reg.alias} {verdict}: {reg.reason}")
        status = "FINISHED"
        return RunResult(run_id, adapter_dir, report, reg, outcome.metrics, outcome.history, timings,
                         worker_timelines=outcome.timelines)
    finally:
        try:
            tracking.end_run(run_id, status)
        except Exception as e:  # noqa: BLE001 - the store is away: the error that ended the run says what to do
            log.warning("could not mark MLflow run %s %s: %s", run_id, status, e)
        timeline.mark("run_ended")


def print_report(console: Console, report: dict) -> None:
    keys = [k for k in ("accuracy", "balanced_accuracy", "mcc", "f1", "eval_loss", "perplexity") if k in report]
    table = Table(title=f"evaluation on {report.get('split')} ({report.get('n')} examples)")
    for k in keys:
        table.add_column(k, justify="right")
    table.add_row(*(f"{report[k]:.4f}" for k in keys))
    console.print(table)
    if "confusion_matrix" in report:
        labels = report.get("id2label", {})
        cm = Table(title="confusion matrix (rows: true, columns: predicted)")
        cm.add_column("")
        for i in range(len(report["confusion_matrix"])):
            cm.add_column(labels.get(str(i), str(i)), justify="right")
        for i, row in enumerate(report["confusion_matrix"]):
            cm.add_row(labels.get(str(i), str(i)), *map(str, row))
        console.print(cm)


def sample_requests(url: str, adapter: str, spec: PipelineSpec, headers: dict | None = None) -> list[dict]:
    import httpx

    samples = spec.serve.samples or (["Once upon a time"] if spec.model.task == "causal-lm" else [])
    if not samples:
        return []
    with httpx.Client(base_url=url, timeout=120, headers=headers) as client:
        if spec.model.task == "seq-cls":
            r = client.post("/v1/classify", json={"adapter": adapter, "inputs": samples})
            r.raise_for_status()
            return [{"input": s, **res} for s, res in zip(samples, r.json()["results"])]
        out = []
        for s in samples:
            r = client.post("/v1/completions", json={"model": adapter, "prompt": s, "temperature": 0,
                                                     "max_tokens": spec.serve.max_new_tokens})
            r.raise_for_status()
            out.append({"input": s, "completion": r.json()["choices"][0]["text"]})
        return out


def print_samples(console: Console, samples: list[dict], positive: str | None = None) -> None:
    if not samples:
        return
    table = Table(title="sample requests")
    if "probabilities" in samples[0]:
        labels = list(samples[0]["probabilities"])
        pos = positive if positive in labels else labels[-1]
        table.add_column(f"P({pos})", justify="right")
        table.add_column("label")
        table.add_column("input")
        for s in samples:
            table.add_row(f"{s['probabilities'][pos] * 100:.0f}%", s["label"], s["input"])
    else:
        table.add_column("prompt")
        table.add_column("completion")
        for s in samples:
            table.add_row(s["input"], s["completion"])
    console.print(table)


def run_pipeline(spec: PipelineSpec, spec_dict: dict, console: Console, *, keep_serving: bool = False) -> RunResult:
    from serve.deploy import deploy, shutdown

    t0 = time.perf_counter()
    result = train_and_register(spec, spec_dict, console)
    reg = result.registration
    adapter = spec.name
    t = time.perf_counter()
    with console.status(f"deploying {reg.model_uri} on Ray Serve..."):
        url = deploy({adapter: reg.model_uri, **spec.serve.adapters}, base=spec.model.model_dump(mode="json"),
                     tracking_uri=tracking.tracking_uri(spec), spec=spec.serve)
    result.timings["deploy_s"] = time.perf_counter() - t
    result.url = url
    console.print(f"[bold]serving[/] adapter {adapter!r} ({reg.model_uri}) at {url}")
    headers = None
    if spec.serve.api_key_env:
        import os

        headers = {"Authorization": f"Bearer {os.environ[spec.serve.api_key_env]}"}
    result.samples = sample_requests(url, adapter, spec, headers)
    labels = spec.model.labels() if spec.model.task == "seq-cls" else {}
    print_samples(console, result.samples, positive=labels.get(1))
    result.timings["total_s"] = time.perf_counter() - t0
    if keep_serving:
        console.print("serving until Ctrl-C ...")
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
    shutdown(spec.serve.app_name)
    return result
