"""`adapterflow` command line. Heavy libraries load only inside the command that needs them."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from typer.core import TyperGroup

from workers.errors import AdapterflowError, UserError

console = Console(soft_wrap=True)  # commands and URLs stay whole for copy-paste
err_console = Console(stderr=True)
_debug = False


def fail(message: str, code: int = 2):
    """Print an error (one problem per line, never wrapped mid-line) and exit with `code`."""
    lines = message.splitlines() or [""]
    err_console.print(f"error: {lines[0]}", style="red", markup=False, highlight=False, soft_wrap=True)
    for line in lines[1:]:
        err_console.print(line, markup=False, highlight=False, soft_wrap=True)
    raise typer.Exit(code)


class _Commands(TyperGroup):
    """Every command's errors end here: a user error prints its message (exit 2), any other
    platform error its message (exit 1); `--debug` adds the traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except AdapterflowError as exc:
            if _debug:
                err_console.print_exception(show_locals=False)
            fail(str(exc), 2 if isinstance(exc, UserError) else 1)


app = typer.Typer(cls=_Commands, add_completion=False, no_args_is_help=True, pretty_exceptions_show_locals=False,
                  help="Train, track and serve parameter-efficient adapters on Ray.")


@app.callback()
def _options(debug: Annotated[bool, typer.Option("--debug", help="Show the traceback of an error.")] = False) -> None:
    global _debug
    _debug = debug

SetOpt = Annotated[Optional[list[str]], typer.Option(
    "--set", help="Override a spec key: --set train.lr=1e-4 (repeatable; value parsed as YAML).")]


def _load(spec_path: Path, overrides: list[str] | None):
    from pipelines.spec import load_spec_dict, parse_spec

    data = load_spec_dict(spec_path, overrides or [])
    return parse_spec(data, source=str(spec_path)), data


def _store_uri(tracking_uri: str | None) -> str | None:
    """Where models:/ references resolve: --tracking-uri, else $MLFLOW_TRACKING_URI, else the
    embedded store a pipeline run from this folder writes (.adapterflow/mlflow.db)."""
    if tracking_uri or os.environ.get("MLFLOW_TRACKING_URI"):
        return tracking_uri
    default = Path.cwd() / ".adapterflow" / "mlflow.db"
    return f"sqlite:///{default}" if default.is_file() else None


def _quiet() -> None:
    from workers.common import quiet_environment

    quiet_environment()
    logging.basicConfig(level=os.environ.get("ADAPTERFLOW_LOG", "WARNING"))


@app.command()
def up(num_cpus: Annotated[Optional[int], typer.Option(help="CPUs the head offers (default: this machine's).")] = None,
       warm_workers: Annotated[int, typer.Option(help="Training processes kept warm (torch, transformers, PEFT, "
                                                  "DeepSpeed imported; the last base model loaded); 0: none.")] = 2,
       dashboard: Annotated[bool, typer.Option(help="Run the Ray dashboard on loopback.")] = True) -> None:
    """Start a persistent local Ray head with warm training workers: later `train`, `run` and `tune` commands
    on this machine connect to it (unless a spec names ray_address) instead of starting Ray each time."""
    import time

    _quiet()
    import ray

    from workers import cluster, warm

    t0 = time.perf_counter()
    state = cluster.up(num_cpus=num_cpus, dashboard=dashboard)
    if state.get("already_running"):
        console.print(f"a Ray head is already up at {state['address']} (adapterflow down stops it)")
        return
    console.print(f"[bold]Ray[/] head at {state['address']} ({state['num_cpus']} CPUs) in "
                  f"{time.perf_counter() - t0:.1f} s" + (f"; dashboard {state['dashboard_url']}" if dashboard else ""))
    if warm_workers:
        with console.status(f"starting {warm_workers} warm workers..."):
            t1 = time.perf_counter()
            ray.init(address=cluster.head_address(), logging_level=logging.WARNING, log_to_driver=False)
            cluster.update_state(warm_workers=warm_workers)
            try:
                infos = warm.start(warm_workers)
            finally:
                ray.shutdown()
        console.print(f"{len(infos)} warm workers ready in {time.perf_counter() - t1:.1f} s (pids "
                      f"{', '.join(str(i['pid']) for i in infos)})")
    console.print("train, run and tune on this machine now connect to it; `adapterflow down` stops it")


@app.command()
def down() -> None:
    """Stop the Ray head `adapterflow up` started (and everything running on it)."""
    from workers import cluster

    state = cluster.down()
    console.print("no Ray head was up" if state is None else f"stopped the Ray head at {state['address']}")


@app.command()
def status() -> None:
    """Whether the head of `adapterflow up` runs, and its warm workers (exit code 1 when it does not run)."""
    from workers import cluster

    state = cluster.running()
    if state is None:
        console.print("no Ray head is up (adapterflow up starts one)")
        raise typer.Exit(1)
    console.print(f"Ray head at {state['address']}, {state['num_cpus']} CPUs, up since "
                  f"{time_of(state['started'])}; {state.get('warm_workers', 0)} warm workers"
                  + (f"; dashboard {state['dashboard_url']}" if state.get("dashboard_url") else ""))


def time_of(ts: float) -> str:
    import time

    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


@app.command()
def validate(spec: Path, set_: SetOpt = None) -> None:
    """Check a spec without running it."""
    s, _ = _load(spec, set_)
    console.print(f"[green]ok[/]: {spec} ({s.adapter.method} on {s.model.name}, task {s.model.task})")


@app.command()
def schema(markdown: Annotated[bool, typer.Option("--markdown", help="The spec reference as Markdown "
                                                  "(docs/spec-reference.md) instead of JSON schema.")] = False) -> None:
    """Print the spec's JSON schema (or the Markdown spec reference)."""
    if markdown:
        from pipelines.reference import markdown as reference

        print(reference(), end="")
        return
    from pipelines.spec import json_schema

    print(json_schema())


@app.command()
def train(spec: Path, set_: SetOpt = None,
          no_register: Annotated[bool, typer.Option(help="Log the run but register nothing.")] = False,
          json_out: Annotated[Optional[Path], typer.Option("--json", help="Write a run summary here (metrics, "
                                                           "timings, where the wall went).")] = None,
          ) -> None:
    """Train, evaluate, log to MLflow and register the adapter (no serving)."""
    from workers import timeline

    timeline.start_process_timeline()
    timeline.mark("cli_imported")
    _quiet()
    from pipelines.run import train_and_register

    timeline.mark("run_imported")
    s, data = _load(spec, set_)
    timeline.mark("spec_parsed")
    res = train_and_register(s, data, console, register=not no_register)
    console.print(f"adapter: {res.adapter_dir}")
    if json_out:
        json_out.write_text(json.dumps({
            "run_id": res.run_id, "adapter_dir": str(res.adapter_dir), "report": res.report, "timings": res.timings,
            "train_metrics": res.train_metrics, "history": res.history,
            "registration": vars(res.registration) if res.registration else None,
            "timeline": {"driver": timeline.marks(), "workers": res.worker_timelines},
        }, indent=2, default=str))


@app.command(name="tune")
def tune_(spec: Path, set_: SetOpt = None,
          resume: Annotated[bool, typer.Option(help="Resume the spec's search where its driver stopped (finished "
                                               "trials are not run again).")] = False,
          json_out: Annotated[Optional[Path], typer.Option("--json", help="Write a search summary here.")] = None,
          ) -> None:
    """Run the spec's `tune:` search on Ray Tune: trials selected on a held-out slice of the training data, a
    parent MLflow run with a child run per trial and plots, the winner evaluated and registered."""
    _quiet()
    from pipelines.search import run_search

    s, data = _load(spec, set_)
    if s.tune is None:
        fail(f"{spec}: the spec has no tune: section to search; add tune.space (see docs/user-guide.md, Searches)")
    if s.tune.nls is not None:
        from pipelines.nls_search import run_nls_search

        res = run_nls_search(s, data, console, resume=resume)
        console.print(f"Pareto front: {res.pareto_csv} and {res.pareto_png}")
    else:
        res = run_search(s, data, console, resume=resume)
    console.print(f"adapter: {res.adapter_dir}")
    if json_out:
        summary = {"run_id": res.run_id, "counts": res.counts, "best": res.best and {
            "trial": res.best["trial"], "config": res.best["config"],
            "metrics": {k: v for k, v in res.best["metrics"].items() if isinstance(v, (int, float))}},
            "evaluation": {k: v for k, v in res.report.items() if isinstance(v, (int, float))},
            "registered": res.registration and res.registration.model_uri, "plots": res.plots,
            "trials": [{"trial": t["trial"], "status": t["status"], "config": t["config"], "error": t.get("error")}
                       for t in res.trials]}
        if s.tune.nls is not None:
            summary.update(chosen=res.chosen, front=[r for r in res.rows if r["on_front"]],
                           pareto_csv=str(res.pareto_csv), pareto_png=str(res.pareto_png),
                           super_adapter=str(res.super_adapter), super_adapter_run_id=res.super_run_id,
                           references={k: {m: v for m, v in rep.items() if isinstance(v, (int, float))}
                                       for k, rep in res.references.items()})
        json_out.write_text(json.dumps(summary, indent=2, default=str))


@app.command()
def dashboards(spec: Annotated[Optional[Path], typer.Argument(help="A spec (its workspace); default .adapterflow.")] = None,
               set_: SetOpt = None,
               start: Annotated[bool, typer.Option(help="Start the MLflow UI and TensorBoard on loopback until "
                                                  "Ctrl-C.")] = False,
               port: Annotated[int, typer.Option(help="The MLflow UI's port (TensorBoard takes the next).")] = 5000,
               ) -> None:
    """Where to watch runs and searches: the MLflow UI on the workspace's store, TensorBoard on the searches'
    trial event files, and the Ray dashboard while Ray runs."""
    from pipelines import dashboards as boards

    if spec is not None:
        from pipelines.tracking import tracking_uri

        s, _ = _load(spec, set_)
        workspace, uri = s.workspace_path(), tracking_uri(s)
    else:
        workspace = (Path.cwd() / ".adapterflow").resolve()
        uri = f"sqlite:///{workspace / 'mlflow.db'}"
    planned = boards.plan(workspace, uri, port)
    for b in planned:
        console.print(f"{b.name + ':':<13}{b.url}" + (f"   ({b.note})" if b.note else ""), markup=False,
                      highlight=False)
        if b.command:
            console.print(f"{'':<13}{b.shell()}", markup=False, highlight=False)
    console.print("Ray:         the dashboard URL `adapterflow run/train/tune` prints while Ray runs "
                  "(http://127.0.0.1:8265 for a local instance)")
    if start:
        procs = boards.start(planned, console)
        console.print("Ctrl-C stops them.")
        boards.serve_until_stopped(procs, console)


@app.command()
def run(spec: Path, set_: SetOpt = None,
        keep_serving: Annotated[bool, typer.Option(help="Keep the deployment up until Ctrl-C.")] = False,
        json_out: Annotated[Optional[Path], typer.Option("--json", help="Write a run summary here.")] = None,
        ) -> None:
    """train -> evaluate -> register -> deploy -> sample requests -> stop."""
    _quiet()
    from pipelines.run import run_pipeline

    s, data = _load(spec, set_)
    res = run_pipeline(s, data, console, keep_serving=keep_serving)
    t = res.timings
    console.print("time: " + ", ".join(f"{k} {v:.1f}s" for k, v in t.items()))
    if json_out:
        json_out.write_text(json.dumps({
            "run_id": res.run_id, "report": res.report, "timings": t, "samples": res.samples,
            "registration": vars(res.registration) if res.registration else None,
            "train_metrics": res.train_metrics,
        }, indent=2, default=str))


@app.command()
def sparsify(spec: Path, set_: SetOpt = None) -> None:
    """Wanda-prune the spec's base model (sparsify.*) into a sparse base with a sparsity report."""
    _quiet()
    from rich.table import Table

    from pipelines.sparsify import run_sparsify

    s, _ = _load(spec, set_)
    with console.status(f"Wanda {s.sparsify.pattern} on {s.model.name}..."):
        out, report = run_sparsify(s)
    table = Table(title=f"sparsity per layer ({s.sparsify.pattern}"
                        + (f", ratio {s.sparsify.ratio:g})" if s.sparsify.pattern == "unstructured" else ")"))
    table.add_column("layer")
    table.add_column("sparsity", justify="right")
    for name, info in report["layers"].items():
        table.add_row(name, f"{info['sparsity']:.4f}")
    table.add_row("[bold]total[/]", f"[bold]{report['total']['sparsity']:.4f}[/]")
    console.print(table)
    console.print(f"sparse model: {out}  (use it with --set model.name={out})")


@app.command()
def merge(adapter: Annotated[str, typer.Argument(help="An adapter folder or MLflow URI (models:/NAME@ALIAS).")],
          output: Annotated[Path, typer.Option("--output", "-o", help="Folder for the merged model.")],
          tracking_uri: Annotated[Optional[str], typer.Option(help="MLflow URI for models:/ references.")] = None,
          base: Annotated[Optional[str], typer.Option(
              help="The base model to merge into (default: the one recorded at registration; an adapter "
                   "folder needs it).")] = None,
          ) -> None:
    """Merge a mergeable adapter into its base and save the full model (safetensors; a QA-SparsePEFT
    adapter gives one packed INT4 sparse model)."""
    _quiet()
    from workers.merge import merge_adapter
    from workers.store import registered_base, resolve

    uri = _store_uri(tracking_uri)
    folder, manifest = resolve(adapter, tracking_uri=uri)
    base_model = {"name": base} if base is not None else registered_base(adapter, uri)
    if base_model is None:
        fail(f"{adapter}: name the base model with --base MODEL (an adapter's own manifest never chooses the "
             "base it is merged into)")
    report = merge_adapter(folder, manifest, output, base=base_model)
    console.print(f"merged {manifest['method']} adapter into {manifest['base_model']['name']}: {output} "
                  f"({report['nonzeros_added']} non-zeros added to Linear weights)")


@app.command(name="import")
def import_(
    folder: Annotated[Path, typer.Argument(help="An adapter folder written by stock PEFT (save_pretrained) or "
                                           "peft-sparta.")],
    base: Annotated[str, typer.Option(help="The base model it was trained on (folder, hub id or package:MODULE).")],
    task: Annotated[Optional[str], typer.Option(help="seq-cls or causal-lm, when the folder does not say it.")] = None,
    set_: SetOpt = None,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Write the artifact here (default: "
                                                   "in the folder itself, which gains adapterflow.json).")] = None,
    register: Annotated[bool, typer.Option("--register", help="Also register it in MLflow (a new version of "
                                           "--name), its manifest and base pinned.")] = False,
    name: Annotated[Optional[str], typer.Option(help="Registered model name (default: the folder's name).")] = None,
    alias: Annotated[Optional[str], typer.Option(help="With --register: point this alias at the new version.")] = None,
    tracking_uri: Annotated[Optional[str], typer.Option(
        help="MLflow store for --register (default: $MLFLOW_TRACKING_URI, else .adapterflow/mlflow.db here).")] = None,
) -> None:
    """Make a stock PEFT adapter (LoRA, aLoRA, IA3, PVeRA) or a peft-sparta one an adapterflow adapter:
    checked against its base, completed with what it does not say (--task, --set model.id2label=...),
    given a manifest (pickled files converted into an --output copy where the method can); with
    --register, registered in MLflow so `adapterflow serve models:/NAME/N` serves it."""
    _quiet()
    from pipelines.spec import apply_override
    from workers.importer import import_adapter

    data: dict = {"model": {"name": base}}
    for assignment in set_ or []:
        if not assignment.startswith("model."):
            fail(f"--set {assignment!r}: import takes model.* keys only (labels, prompt_format, pad_token, ...)")
        apply_override(data, assignment)
    if alias and not register:
        fail("--alias needs --register")
    out, manifest = import_adapter(folder, data["model"], task=task, output=output)
    console.print(f"imported {manifest['method']} adapter ({manifest['task']}) for {base}: {out}")
    if not register:
        console.print(f"  serve it: adapterflow serve {out} --base {base}")
        return
    from pipelines.tracking import register_imported

    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        store = Path.cwd() / ".adapterflow"
        store.mkdir(exist_ok=True)
        uri = f"sqlite:///{store / 'mlflow.db'}"
    reg = register_imported(out, manifest, name or Path(folder).resolve().name, uri, alias=alias)
    console.print(f"registered {reg.model_uri} in {uri} ({reg.reason})")
    console.print(f"  serve it: adapterflow serve {reg.model_uri}" + (f" --tracking-uri {uri}" if tracking_uri else ""))


@app.command(name="extract-subadapter")
def extract_subadapter(
    adapter: Annotated[str, typer.Argument(help="An NLS super-adapter: folder or MLflow URI (models:/NAME@ALIAS).")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder for the sub-adapter.")],
    version: Annotated[str, typer.Option(
        help="maximal, heuristic, minimal, or one rank per group: 32,24,16,...")] = "heuristic",
    tracking_uri: Annotated[Optional[str], typer.Option(help="MLflow URI for models:/ references.")] = None,
) -> None:
    """Cut a LoRA sub-adapter out of an NLS super-adapter (stock PEFT loads it)."""
    _quiet()
    from workers.methods import method_for_manifest
    from workers.store import resolve

    try:
        choice = [int(x) for x in version.split(",")] if version[:1].isdigit() else version
    except ValueError:
        fail(f"--version {version!r}: ranks must be integers (e.g. 32,24,16)")
    folder, manifest = resolve(adapter, tracking_uri=_store_uri(tracking_uri))
    method = method_for_manifest(manifest)
    if not method.subadapters:
        fail(f"{adapter} is a {method.name} adapter, which has no sub-adapters to extract")
    summary = method.extract_subadapter(folder, manifest, output, choice, source=adapter)
    console.print(f"{version} sub-adapter: ranks {summary['ranks']} over {summary['groups']} groups, "
                  f"{summary['lora_params']:,} LoRA parameters -> {output}")


@app.command(name="check-sparsity")
def check_sparsity(model_dir: Path, every_layer: Annotated[bool, typer.Option(help="List every layer.")] = False) -> None:
    """Report the zeros of every 2-D weight of a saved model (embeddings excluded)."""
    from rich.table import Table

    from workers.merge import sparsity_of

    if not model_dir.is_dir():
        fail(f"{model_dir} is not a folder")
    rep = sparsity_of(model_dir)
    table = Table(title=f"sparsity of {model_dir}")
    table.add_column("weight")
    table.add_column("sparsity", justify="right")
    if every_layer:
        for k, v in rep["layers"].items():
            table.add_row(k, f"{v['sparsity']:.4f}")
    table.add_row("[bold]total[/]", f"[bold]{rep['total']['sparsity']:.4f}[/]")
    console.print(table)


@app.command()
def serve(targets: Annotated[list[str], typer.Argument(
              help="A spec file, or adapters: MLflow URIs (models:/NAME@ALIAS) or folders, each optionally "
                   "NAME=REF for the name clients use.")],
          set_: SetOpt = None,
          name: Annotated[Optional[str], typer.Option(help="Adapter name clients use (one adapter).")] = None,
          host: Annotated[Optional[str], typer.Option()] = None,
          port: Annotated[Optional[int], typer.Option()] = None,
          tracking_uri: Annotated[Optional[str], typer.Option(help="MLflow URI for models:/ references.")] = None,
          base: Annotated[Optional[str], typer.Option(
              help="The base model the replica builds (folder, hub id or package:MODULE). A spec gives it; "
                   "a registered adapter has it recorded; an adapter folder needs it.")] = None,
          ) -> None:
    """Serve adapters over HTTP until Ctrl-C (one base model; the adapters share it)."""
    _quiet()
    import time

    from pipelines import tracking
    from serve.deploy import deploy
    from workers.stages import ensure_ray

    first = targets[0]
    if first.endswith((".yaml", ".yml")) and Path(first).is_file():
        if len(targets) > 1:
            fail("give a spec alone (list more adapters under serve.adapters), or adapters without a spec")
        s, _ = _load(Path(first), set_)
        adapters = {name or s.name: f"models:/{s.registered_model_name()}@{s.track.alias}", **s.serve.adapters}
        uri = tracking_uri or tracking.tracking_uri(s)
        sv = s.serve
        base_model = s.model.model_dump(mode="json") if base is None else {"name": base}
        ensure_ray(s)
    else:
        from pipelines.spec import PipelineSpec  # noqa: F401  (keeps the import cost in one place)
        from serve.config import ServeSpec

        if name and len(targets) > 1:
            fail("--name names one adapter; with several, write NAME=REF for each")
        adapters = {}
        for target in targets:
            named = "=" in target and not target.startswith("models:/")
            label, _, ref = target.partition("=") if named else ("", "", target)
            label = label or name or Path(ref.rstrip("/")).name.split("@")[0] or "adapter"
            if label in adapters:
                fail(f"two adapters are named {label!r}; write NAME=REF to tell them apart")
            adapters[label] = ref
        uri = _store_uri(tracking_uri)
        sv = ServeSpec()
        base_model = {"name": base} if base is not None else None
        folders = [ref for ref in adapters.values() if not ref.startswith("models:/")]
        if base_model is None and folders:
            fail(f"{folders[0]}: name the base model with --base MODEL (an adapter's own manifest never chooses "
                 "the base a server builds)")
        import ray

        from workers import cluster

        ray.init(address=cluster.head_address(), logging_level=logging.WARNING)
    url = deploy(adapters, base=base_model, tracking_uri=uri, spec=sv, host=host or sv.host, port=port or sv.port)
    listing = ", ".join(f"{k!r} ({v})" for k, v in adapters.items())
    console.print(f"serving {listing} at {url}  (Ctrl-C stops)")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:  # on a Ray head that outlives this command (adapterflow up) the app would keep its CPUs
        from serve.deploy import shutdown

        shutdown(sv.app_name)


AddressOpt = Annotated[Optional[str], typer.Option(
    "--address", help="The Ray cluster's job API, http://HEAD:8265 (default: $ADAPTERFLOW_RAY_ADDRESS).")]


@app.command()
def submit(spec: Path, set_: SetOpt = None, address: AddressOpt = None,
           command: Annotated[str, typer.Option(help="What the job runs: run, train or tune.")] = "run",
           env: Annotated[Optional[list[str]], typer.Option(
               "--env", help="Pass this environment variable's value to the job (repeatable).")] = None,
           secret_env: Annotated[Optional[list[str]], typer.Option(
               "--secret-env", help="Pass this variable's value as a secret: never shown by the Jobs API "
               "(repeatable).")] = None,
           no_wait: Annotated[bool, typer.Option("--no-wait", help="Print the job id and return.")] = False,
           follow: Annotated[bool, typer.Option("--follow", help="Stream the job's logs until it ends.")] = False,
           ) -> None:
    """Submit a pipeline (run, train or tune) to a Ray cluster as a Ray job: the spec is validated here first."""
    from pipelines import jobs

    if no_wait and follow:
        fail("--no-wait and --follow: choose one")
    job = jobs.submit(spec, set_, address=address, command=command, env=env, secret_env=secret_env)
    console.print(f"submitted job {job.job_id} to {job.address}", markup=False, highlight=False)
    if no_wait:
        console.print(f"adapterflow jobs logs {job.job_id} --follow --address {job.address}", markup=False,
                      highlight=False)
        return
    c = jobs.client(job.address)
    write = (lambda text: print(text, end="", flush=True)) if follow else None
    try:
        final = jobs.follow(c, job.job_id, write) if follow else jobs.wait(c, job.job_id)
    except KeyboardInterrupt:
        fail(f"job {job.job_id} keeps running on the cluster; adapterflow jobs stop {job.job_id} --address "
             f"{job.address} stops it", 130)
    _job_end(job.job_id, final, job.address)


def _job_end(job_id: str, final: str, address: str) -> None:
    if final != "SUCCEEDED":
        fail(f"job {job_id} {final} (adapterflow jobs logs {job_id} --address {address})", 1)
    console.print(f"job {job_id} SUCCEEDED", markup=False, highlight=False)


jobs_app = typer.Typer(cls=_Commands, no_args_is_help=True, help="The Ray jobs of a cluster: list, status, logs, stop.")
app.add_typer(jobs_app, name="jobs")


@jobs_app.command("list")
def jobs_list(address: AddressOpt = None) -> None:
    """Every job the cluster knows: id, status, entrypoint."""
    from pipelines import jobs

    for row in jobs.list_jobs(jobs.client(address)):
        console.print(f"{row['job_id']}  {row['status']:<9}  {row['entrypoint']}", markup=False, highlight=False)


@jobs_app.command("status")
def jobs_status(job_id: str, address: AddressOpt = None) -> None:
    """A job's status and message (exit code 1 when it FAILED or was STOPPED)."""
    from pipelines import jobs

    info = jobs.status(jobs.client(address), job_id)
    console.print(f"{job_id}: {info['status']}" + (f" ({info['message']})" if info["message"] else ""),
                  markup=False, highlight=False)
    if info["status"] in ("FAILED", "STOPPED"):
        raise typer.Exit(1)


@jobs_app.command("logs")
def jobs_logs(job_id: str, address: AddressOpt = None,
              follow: Annotated[bool, typer.Option("--follow", help="Stream until the job ends.")] = False) -> None:
    """A job's driver logs."""
    from pipelines import jobs

    c = jobs.client(address)
    if follow:
        jobs.follow(c, job_id, lambda text: print(text, end="", flush=True))
    else:
        print(jobs.logs(c, job_id), end="")


@jobs_app.command("stop")
def jobs_stop(job_id: str, address: AddressOpt = None) -> None:
    """Stop a running job and wait until it has stopped."""
    from pipelines import jobs

    console.print(f"{job_id}: {jobs.stop(jobs.client(address), job_id)}", markup=False, highlight=False)


def main() -> None:
    """The console script. After the command it runs the exit handlers (Ray's disconnect, logging's
    flush) and leaves without tearing the interpreter down module by module: with MLflow, Ray and
    matplotlib loaded that teardown alone took seconds on 2 busy cores, after all work was done."""
    import atexit
    import sys

    try:
        app()
        code = 0
    except SystemExit as exc:
        code = exc.code
    if isinstance(code, str):
        print(code, file=sys.stderr)
        code = 1
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code or 0)


if __name__ == "__main__":
    main()
