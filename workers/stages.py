"""The training stages every entry point reuses (`adapterflow run/train/sparsify`, Tune trials,
tests): start Ray, check the inputs before any work, Wanda-sparsify the base, launch training on Ray
Train, turn the final checkpoint into an adapter artifact, evaluate it.

A stage takes a job spec: any object with `name`, `workspace_path()`, `ray_address`, `plugins`,
`model`, `data`, `adapter`, `train` and `sparsify` (the pipeline spec, or
`workers.spec_view.WorkerSpec`).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from workers import timeline
from workers.common import quiet_environment
from workers.errors import DataError, ResourceError, TrainingError

log = logging.getLogger(__name__)


def ensure_ray(spec):
    """Connect to the spec's cluster, else to the local head `adapterflow up` started (workers.cluster),
    else start an embedded local Ray instance; return the dashboard URL."""
    import ray

    from workers import cluster

    timeline.mark("import_ray")
    env = quiet_environment()
    if ray.is_initialized():
        return None
    address = spec.ray_address or cluster.head_address()
    ctx = ray.init(
        address=address,
        runtime_env={"env_vars": env},
        logging_level=logging.WARNING,
        log_to_driver=os.environ.get("ADAPTERFLOW_WORKER_LOGS", "0") == "1",
    )
    return getattr(ctx, "dashboard_url", None)


def check_inputs(spec) -> None:
    """Fail before any work starts when the base model or the data cannot be found (local paths
    and packages are checked here; hub ids are checked by the workers that download them)."""
    from workers.data import load_split, looks_local
    from workers.models import resolve_model_path

    resolve_model_path(spec.model.name)
    if Path(spec.data.path).expanduser().exists() or looks_local(spec.data.path):
        if not load_split(spec.data, spec.data.train_split):
            raise DataError(f"data.path {spec.data.path!r}: split {spec.data.train_split!r} is missing or empty")
    if not _on_warm_worker("precheck", _worker_json(spec)):
        precheck_adapter(spec)


def _worker_json(spec) -> dict:
    return spec.model_dump(mode="json", include={"name", "workspace", "plugins", "model", "data", "adapter", "train"})


def _on_warm_worker(method: str, *args):
    """`method` run on a warm worker of the `adapterflow up` head this driver is connected to (a process
    that has imported torch, transformers and PEFT already); False when there is none free to run it."""
    from workers import warm

    if warm.pool_size() == 0:
        return False
    result = warm.call(method, *args)
    return False if warm.not_warm(result) else (True if result is None else result)


def precheck_adapter(spec) -> None:
    """Adapter parameters that depend on the model's shapes (e.g. sparsity bounds, a quantization
    group size) checked by the method on a weightless (meta-device) copy of the model, before Ray
    starts. A model whose config cannot be read here (a hub id not cached) is checked by the workers."""
    from workers.methods import method_of
    from workers.models import meta_model

    model = meta_model(spec.model)
    if model is not None:
        method_of(spec.adapter).precheck(model, spec.adapter, spec.model.task)


def preflight(spec, wait_s: float = 20.0) -> None:
    """On a fixed-size (local) cluster, refuse a job that would wait forever for resources."""
    import ray

    t = spec.train
    if spec.ray_address is not None or t.num_workers == 0:
        return  # a real cluster may autoscale; local mode needs no workers
    need = {k: v * t.num_workers for k, v in t.worker_resources().items()}
    deadline = time.monotonic() + wait_s
    while True:  # actors that are shutting down (a deleted Serve app) free resources shortly
        total, free = ray.cluster_resources(), ray.available_resources()
        if all(free.get(r, 0) + 1e-9 >= a for r, a in need.items()) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    for res, amount in need.items():
        if amount > total.get(res, 0) + 1e-9:
            raise ResourceError(
                f"training needs {amount:g} {res} ({t.num_workers} workers x "
                f"{amount / t.num_workers:g}) but this Ray instance has {total.get(res, 0):g}; lower "
                "train.num_workers or train.resources_per_worker"
            )
        if amount > free.get(res, 0) + 1e-9:
            raise ResourceError(
                f"training needs {amount:g} {res} but only {free.get(res, 0):g} of "
                f"{total.get(res, 0):g} are free (a Serve app or another job holds the rest): stop it "
                "(`serve shutdown`) or lower train.resources_per_worker"
            )


SPARSITY_REPORT = "sparsity_report.json"


def calibration_texts(spec) -> list[str]:
    """The inputs (`data.input_template`) of `sparsify.split` that calibrate Wanda."""
    from workers.data import input_template, load_calibration, render

    sp = spec.sparsify
    records = load_calibration(spec.data, sp.split)
    if not records:
        raise DataError(f"sparsify.split {sp.split!r} is missing or empty in {spec.data.path!r}")
    tmpl = input_template(spec.data)
    return [render(tmpl, r) for r in records]


def sparsify_base(spec, out: Path, *, reuse: bool = False) -> dict:
    """Wanda-prune the spec's base model (`sparsify.*`, calibrated on `calibration_texts`) and save it
    to `out` as a model folder (safetensors, tokenizer, `sparsity_report.json`); return the report.
    With `reuse`, a folder already holding this base sparsified with these settings is kept as it is
    (a resumed trial)."""
    settings = spec.sparsify.model_dump(mode="json", exclude={"output"})
    if reuse and (out / SPARSITY_REPORT).is_file():
        report = json.loads((out / SPARSITY_REPORT).read_text())
        if report.get("base_model") == spec.model.name and report.get("settings") == settings:
            return report
    import torch

    from workers.models import load_model, load_tokenizer, resolve_model_path
    from workers.wanda import Pattern, calibration_batches, sparsify

    sp = spec.sparsify
    pattern = Pattern.parse(sp.pattern, sp.ratio)
    texts = calibration_texts(spec)
    tok = load_tokenizer(spec.model)
    model = load_model(spec.model, tok)
    calib = calibration_batches(tok, texts, sp.seq_len, sp.n_samples)
    torch.manual_seed(spec.train.seed)
    report = sparsify(model, calib, pattern)
    report["calibration"] = {"chunks": sum(len(b["input_ids"]) for b in calib), "seq_len": sp.seq_len,
                             "split": sp.split}
    report["base_model"] = spec.model.name
    report["settings"] = settings
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    src = Path(resolve_model_path(spec.model.name))
    if src.is_dir():  # keep the base's extra tokenizer files (e.g. SentencePiece model)
        for f in src.glob("tokenizer.model"):
            shutil.copy2(f, out / f.name)
    (out / SPARSITY_REPORT).write_text(json.dumps(report, indent=2))
    return report


@dataclass
class TrainOutcome:
    checkpoint: Path
    metrics: dict
    history: list[dict] = field(default_factory=list)
    wall_seconds: float = 0.0
    timelines: dict[int, dict] = field(default_factory=dict)  # each rank's marks (workers.timeline)


def launch_training(spec, *, mlflow_cfg: dict | None = None, run_name: str | None = None,
                    resume_from: str | None = None, progress=None) -> TrainOutcome:
    """Train on Ray Train (`train.num_workers` DeepSpeed workers; 0 = local mode, in-process) and
    return the final checkpoint, its metrics and the loss history. `progress`: a progress board
    (workers/progress.py) rank 0 posts to. On an `adapterflow up` head, a job that fits its warm
    workers trains there (workers.warm) instead."""
    from workers.ds_config import worker_env
    from workers.train_loop import HISTORY_FILE, train_loop_per_worker

    t = spec.train
    run_name = run_name or f"{spec.name}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    storage = spec.workspace_path() / "ray_results"
    config = {"spec": spec.model_dump(mode="json"), "mlflow": mlflow_cfg, "resume_from": resume_from,
              "progress": progress}
    if t.num_workers >= 1:
        outcome = _train_warm(spec, config, storage / run_name)
        if outcome is not None:
            return outcome
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    timeline.mark("import_ray_train")
    if t.num_workers == 0:  # local mode: Ray does not persist checkpoints, the loop does
        config["checkpoint_root"] = str(storage / run_name / "local")
        for k, v in worker_env(t).items():
            os.environ.setdefault(k, v)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=config,
        torch_config=TorchConfig(backend=t.resolved_backend()),
        scaling_config=ScalingConfig(
            num_workers=t.num_workers, use_gpu=t.use_gpu, resources_per_worker=t.worker_resources()
        ),
        run_config=RunConfig(
            name=run_name,
            storage_path=str(storage),
            checkpoint_config=CheckpointConfig(num_to_keep=t.keep),
            failure_config=FailureConfig(max_failures=t.max_failures),
            worker_runtime_env={"env_vars": worker_env(t)},
        ),
    )
    preflight(spec)
    timeline.mark("trainer_built")
    start = time.perf_counter()
    result = trainer.fit()
    wall = time.perf_counter() - start
    timeline.mark("fit")
    if result.checkpoint is None:
        raise TrainingError(f"training run {run_name} ended without a checkpoint: {result.error}")
    path = Path(result.checkpoint.path)
    history = json.loads((path / HISTORY_FILE).read_text()) if (path / HISTORY_FILE).is_file() else []
    return TrainOutcome(path, dict(result.metrics or {}), history, wall, timeline.read_all(path))


def _train_warm(spec, config: dict, run_dir: Path) -> TrainOutcome | None:
    """The run on the warm workers of an `adapterflow up` head (workers.warm), or None (Ray Train runs it)."""
    from workers import warm
    from workers.train_loop import HISTORY_FILE

    if not warm.fits(spec):
        return None
    preflight(spec)
    timeline.mark("trainer_built")
    start = time.perf_counter()
    result = warm.train(spec, config, run_dir)
    if result is None:
        log.info("the warm workers are busy: training on Ray Train workers")
        return None
    wall = time.perf_counter() - start
    timeline.mark("fit")
    if result["checkpoint"] is None:
        raise TrainingError(f"training run {run_dir.name} ended without a checkpoint")
    path = Path(result["checkpoint"])
    history = json.loads((path / HISTORY_FILE).read_text()) if (path / HISTORY_FILE).is_file() else []
    return TrainOutcome(path, dict(result["metrics"]), history, wall, timeline.read_all(path))


def latest_local_checkpoint(spec, run_name: str) -> Path | None:
    """The newest checkpoint a local-mode run (num_workers: 0) wrote, to resume it."""
    root = spec.workspace_path() / "ray_results" / run_name / "local"
    found = sorted(root.glob("checkpoint_*"))
    return found[-1] if found else None


def build_artifact(spec, checkpoint: Path, dst: Path) -> Path:
    """Copy the adapter out of the final checkpoint and write its manifest."""
    from workers.artifact import write_manifest
    from workers.data import input_template
    from workers.models import base_fingerprint
    from workers.train_loop import FINAL_ADAPTER_DIR

    src = checkpoint / FINAL_ADAPTER_DIR
    if not src.is_dir():
        raise TrainingError(f"{checkpoint}: final checkpoint has no '{FINAL_ADAPTER_DIR}' folder")
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst)
    for readme in dst.glob("README.md"):
        readme.unlink()  # PEFT's model card template: not part of the artifact
    model = spec.model.model_dump(mode="json")
    if spec.model.task == "seq-cls":
        model["id2label"] = {str(k): v for k, v in spec.model.labels().items()}
        model["num_labels"] = len(model["id2label"])
    extra = {"adapter": spec.adapter.model_dump(mode="json"),
             "input_template": input_template(spec.data), "max_length": spec.data.max_length}
    if spec.data.holdout_fraction:  # the slice of the training split it never trained on
        extra["holdout"] = {"fraction": spec.data.holdout_fraction, "seed": spec.data.holdout_seed}
    if spec.plugins:
        extra["plugins"] = list(spec.plugins)  # what a replica imports to know the method
    write_manifest(dst, method=spec.adapter.method, model=model, base_sha256=base_fingerprint(spec.model),
                   extra=extra)
    return dst


def evaluate(spec, adapter_dir: Path, *, holdout: bool = False) -> dict:
    """`evaluate_artifact` on a warm worker of the `adapterflow up` head when there is one free (this
    process then needs no torch), else here."""
    report = _on_warm_worker("evaluate", _worker_json(spec), str(adapter_dir), holdout, os.cpu_count() or 1)
    return report if report else evaluate_artifact(spec, adapter_dir, holdout=holdout)


def evaluate_artifact(spec, adapter_dir: Path, threads: int | None = None, *, holdout: bool = False) -> dict:
    """Evaluate a saved adapter on the spec's eval split (or, with `holdout`, on the held-out selection
    slice of its training split) with the same code a replica runs."""
    import torch

    from workers.data import encode, load_holdout, load_train_eval
    from workers.evaluate import evaluate_model
    from workers.methods import method_of
    from workers.models import adapter_tokenizer, load_model, load_tokenizer

    if threads:
        torch.set_num_threads(threads)
    evals = load_holdout(spec.data) if holdout else load_train_eval(spec.data, spec.train.seed)[1]
    if not evals:
        raise DataError(
            f"data: no evaluation split {spec.data.eval_split!r} in {spec.data.path!r}; set "
            "data.eval_split or data.eval_fraction"
        )
    method = method_of(spec.adapter)
    tok = adapter_tokenizer(spec.model, adapter_dir)
    model = method.load(load_model(spec.model, load_tokenizer(spec.model)), Path(adapter_dir))
    examples = encode(evals, spec.data, spec.model, tok, spec.workspace_path())
    num_labels = len(spec.model.labels()) if spec.model.task == "seq-cls" else None
    report = evaluate_model(model, tok, examples, spec.model.task, num_labels)
    report["split"] = "selection" if holdout else spec.data.eval_split if spec.data.eval_split else "held-out"
    samples = method.monte_carlo_samples(spec.adapter)
    if samples:  # Monte-Carlo evaluation: mean and 95 % interval of every output
        from workers.montecarlo import mc_report

        report["monte_carlo"] = mc_report(model, tok, examples, spec.model.task, samples, spec.train.seed, method)
    if spec.model.task == "seq-cls":
        report["id2label"] = {str(k): v for k, v in spec.model.labels().items()}
    return report
