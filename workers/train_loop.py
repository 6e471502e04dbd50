"""The per-worker training loop: a DeepSpeed engine over the adapter method's model.

Every rank builds the same model (same seed), wraps it with the adapter method, and trains through
a DeepSpeed engine. Every `checkpoint_every` steps each rank writes its part of a DeepSpeed
checkpoint (adapter weights, optimizer partition, scheduler, step, RNG) into a directory it reports
to its session (`workers.session`): under Ray Train, Ray merges the ranks' files into one checkpoint
and, on restart, hands the last one back so training continues at the exact step. The last report
carries the adapter (the method's files) and the loss history.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import shutil
import tempfile
import time
from pathlib import Path

from workers import timeline
from workers.errors import DataError, SpecError

log = logging.getLogger(__name__)

STATE_TAG = "state"
FINAL_ADAPTER_DIR = "adapter"
HISTORY_FILE = "history.json"


def _rng_state() -> dict:
    import numpy as np
    import torch

    return {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": np.random.get_state(),
    }


def _save_rng(directory: Path, rank: int) -> None:
    import numpy as np
    import torch
    from safetensors.torch import save_file

    st = _rng_state()
    save_file({"torch": st["torch"]}, str(directory / f"rng_rank{rank}.safetensors"))
    py = st["python"]
    np_state = st["numpy"]
    (directory / f"rng_rank{rank}.json").write_text(
        json.dumps(
            {
                "python": [py[0], list(py[1]), py[2]],
                "numpy": [np_state[0], np.asarray(np_state[1]).tolist(), *map(float, np_state[2:])],
            }
        )
    )
    del torch


def _load_rng(directory: Path, rank: int) -> None:
    import numpy as np
    import torch
    from safetensors.torch import load_file

    f = directory / f"rng_rank{rank}.safetensors"
    if not f.is_file():
        log.warning("checkpoint has no RNG state for rank %d; continuing with a fresh RNG", rank)
        return
    torch.set_rng_state(load_file(str(f))["torch"])
    data = json.loads((directory / f"rng_rank{rank}.json").read_text())
    py = data["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = data["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), int(n[2]), int(n[3]), float(n[4])))


@contextlib.contextmanager
def process_group(backend: str, rank: int = 0, world: int = 1, rendezvous: tuple[str, int] | None = None):
    """Ray Train sets up torch.distributed on its workers. Elsewhere (local mode, a warm worker of
    `workers.warm`) make the group here: 1 process, or `world` processes of one machine meeting at
    `rendezvous` (rank 0's address and port), with the launcher variables DeepSpeed checks, and take
    both down afterwards so the next run in this process starts clean."""
    import socket

    import torch.distributed as dist

    if dist.is_initialized():
        yield
        return
    if rendezvous is None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            rendezvous = ("127.0.0.1", s.getsockname()[1])
    addr, port = rendezvous
    env = {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_WORLD_SIZE": str(world),
           "MASTER_ADDR": addr, "MASTER_PORT": str(port)}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    dist.init_process_group(backend, init_method=f"tcp://{addr}:{port}", rank=rank, world_size=world)
    try:
        yield
    finally:
        import deepspeed.comm.comm as ds_comm

        # through DeepSpeed when it wrapped the group, so it drops its cached groups too
        if ds_comm.cdb is not None and dist.is_initialized():
            ds_comm.destroy_process_group()
        elif dist.is_initialized():
            dist.destroy_process_group()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def linear_schedule(total_steps: int, warmup_steps: int):
    def fn(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return fn


def plan_steps(n_examples: int, train, unit: str = "training examples") -> tuple[int, int]:
    """(steps per epoch, total steps) for `n_examples` (or packed rows) under the spec's train section."""
    per_epoch = n_examples // train.global_batch_size
    if per_epoch == 0:
        raise DataError(
            f"{n_examples} {unit} is fewer than one global batch ({train.global_batch_size})"
        )
    total = max(1, math.floor(train.epochs * per_epoch))
    if train.max_steps:
        total = min(total, train.max_steps) if train.epochs else train.max_steps
    return per_epoch, total


def build_trainable(spec, seed: int):
    """Tokenizer + base model with a fresh adapter attached: what every rank trains."""
    import torch
    from transformers import set_seed

    from workers.methods import attach
    from workers.models import load_model, load_tokenizer

    set_seed(seed)
    tok = load_tokenizer(spec.model)
    # loaded afresh for every run, also in a process that trains run after run (a Tune actor, a warm
    # worker): from the page cache that is faster than copying a kept model (0.05 s against 0.2-2 s
    # for MiniLM here), and no run can see weights another trained
    model = load_model(spec.model, tok)
    torch.manual_seed(seed)
    model = attach(model, spec.adapter, spec.model.task, tokenizer=tok, prompt_format=spec.model.prompt_format)
    return tok, model


def param_groups(model, train, method) -> list[dict]:
    """The optimizer's parameter groups: the adapter at train.lr, the head (as the method tells
    it) at train.head_lr."""
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if train.head_lr is None:
        return [{"params": [p for _, p in trainable], "lr": train.lr}]
    head = [p for n, p in trainable if method.is_head_parameter(n, model)]
    body = [p for n, p in trainable if not method.is_head_parameter(n, model)]
    if not head:
        raise SpecError("train.head_lr is set but the model has no trainable task head (seq-cls only)")
    return [{"params": body, "lr": train.lr}, {"params": head, "lr": train.head_lr}]


def _gathered(engine, stage: int):
    import contextlib

    if stage != 3:
        return contextlib.nullcontext()
    import deepspeed

    params = [p for p in engine.module.parameters() if p.requires_grad]
    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)


def train_loop_per_worker(config: dict) -> None:
    """Entry point Ray Train runs on every worker (and in-process in local mode)."""
    from workers.config import TrainSpec
    from workers.ds_config import worker_env
    from workers.session import RayTrainSession

    train = TrainSpec.model_validate(config["spec"]["train"])
    for k, v in worker_env(train).items():
        os.environ.setdefault(k, v)
    run_training(config, RayTrainSession(config.get("resume_from")))


def run_training(config: dict, session) -> None:
    """The training loop on one worker: `config` holds the spec (as JSON data), the MLflow run to
    log step metrics to, and the local checkpoint root (None under Ray Train, which persists
    reported checkpoints itself); `session` is where it reports and resumes from."""
    tl = timeline.start_process_timeline([])
    timeline.mark("loop_entry", tl)
    preloaded = timeline.loaded_heavy_modules()
    import torch

    timeline.mark("import_torch", tl)
    from workers.spec_view import WorkerSpec

    spec = WorkerSpec.model_validate(config["spec"])
    train = spec.train
    threads = train.threads_per_worker or max(1, int(train.worker_resources().get("CPU", 1)))
    torch.set_num_threads(threads)
    with process_group(train.resolved_backend(), session.rank, session.world, getattr(session, "rendezvous", None)):
        timeline.mark("process_group", tl)
        _train(config, spec, session, tl, preloaded)


def _train(config: dict, spec, session, tl: list, preloaded: list[str]) -> None:
    import transformers  # noqa: F401  (each heavy import timed on its own)

    timeline.mark("import_transformers", tl)
    import peft  # noqa: F401

    timeline.mark("import_peft", tl)
    import deepspeed
    import torch
    import torch.distributed as dist

    timeline.mark("import_deepspeed", tl)
    from workers.batching import Batches, TokenCount
    from workers.data import encode, load_train_eval
    from workers.ds_config import build_ds_config
    from workers.methods import method_of
    from workers.progress import Poster

    train, rank, world = spec.train, session.rank, session.world
    method = method_of(spec.adapter)
    tok, model = build_trainable(spec, train.seed)
    timeline.mark("model_built", tl)
    train_records, _ = load_train_eval(spec.data, train.seed)
    examples = encode(train_records, spec.data, spec.model, tok, spec.workspace_path())
    timeline.mark("data_tokenized", tl)
    batches = Batches(examples, spec, model, world)
    per_epoch, total_steps = plan_steps(len(batches.units), train, batches.unit)
    trainable, total_params = method.count_parameters(model)

    params = param_groups(model, train, method)
    if train.offload != "none":
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        optimizer = DeepSpeedCPUAdam(params, lr=train.lr, weight_decay=train.weight_decay)
    else:
        optimizer = torch.optim.AdamW(params, lr=train.lr, weight_decay=train.weight_decay)
    warmup = int(train.warmup_ratio * total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, linear_schedule(total_steps, warmup))
    ds_config = build_ds_config(train, world)
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config
    )
    timeline.mark("deepspeed_init", tl)

    start_step, history, resumed_from = 0, [], -1
    with session.checkpoint() as d:
        if d is not None:
            _, client = engine.load_checkpoint(
                str(d), tag=STATE_TAG, load_module_strict=False, load_optimizer_states=True,
                load_lr_scheduler_states=True,
            )
            start_step = resumed_from = int(client["step"])
            history = list(client.get("history", []))
            _load_rng(Path(d), rank)
            if rank == 0:
                log.info("resumed from checkpoint at step %d", start_step)

    tracker = _Tracker(config.get("mlflow"), rank)
    progress = Poster(config.get("progress"), rank)
    progress.post(step=start_step, total_steps=total_steps, started_at=time.time(), start_step=start_step)
    pad_id = tok.pad_token_id
    engine.train()
    timeline.mark("loop_start", tl)
    t0 = time.perf_counter()
    score_s = 0.0  # time spent scoring the model at checkpoints (a search's held-out evaluation)
    report_s = 0.0  # time reports waited (Ray Train persisting a checkpoint, Tune's driver taking a result)
    window_start, window_steps = t0, 0
    tokens = TokenCount(world)
    for step in range(start_step, total_steps):
        loss_sum = torch.zeros(())
        for batch in batches.micro_batches(step, rank, pad_id):
            tokens.add(batch)
            out = engine(**batch)
            engine.backward(out.loss)
            engine.step()
            loss_sum += out.loss.detach().float()
        loss = loss_sum / train.grad_accum
        if world > 1:
            dist.all_reduce(loss)
            loss /= world
        done = step + 1
        window_steps += 1
        record = {"step": done, "loss": float(loss), "lr": float(scheduler.get_last_lr()[0]),
                  "epoch": step / per_epoch}
        history.append(record)
        if done % train.log_every == 0 or done == total_steps:
            now = time.perf_counter()
            record["examples_per_s"] = window_steps * train.global_batch_size / (now - window_start)
            record.update(tokens.window(now - window_start))
            window_start, window_steps = now, 0
            tracker.log(history[-train.log_every:])
            progress.post(step=done, loss=record["loss"], examples_per_s=record["examples_per_s"],
                          epoch=record["epoch"])
        last = done == total_steps
        if done % train.checkpoint_every == 0 or last:
            if last:
                timeline.mark("loop_end", tl)
            metrics = {"step": done, "loss": float(loss), "trainable_params": trainable,
                       "total_params": total_params, "total_steps": total_steps}
            with _checkpoint_dir(config.get("checkpoint_root"), done, rank, train.keep) as tmpdir:
                engine.save_checkpoint(
                    str(tmpdir), tag=STATE_TAG, client_state={"step": done, "history": history},
                    exclude_frozen_parameters=True,
                )
                _save_rng(tmpdir, rank)
                if last:
                    with _gathered(engine, train.zero_stage):
                        if rank == 0:
                            method.save(engine.module, tmpdir / FINAL_ADAPTER_DIR, spec.adapter)
                    metrics["resumed_from_step"] = resumed_from
                    metrics.update(tracker.close())  # before the last report: the driver sends any backlog
                    timeline.mark("final_saved", tl)
                if rank == 0:
                    (tmpdir / HISTORY_FILE).write_text(json.dumps(history))
                    s0 = time.perf_counter()
                    scores = session.score(engine.module, tok)
                    if scores:  # evaluated the model being trained: back to training mode
                        metrics.update(scores)
                        engine.train()
                        score_s += time.perf_counter() - s0
                        metrics["eval_seconds"] = score_s
                # the loop's wall so far without scoring and the waits of earlier reports (in every
                # report: a stopped trial has one too); train_seconds + report_seconds is the loop's wall
                metrics["train_seconds"] = time.perf_counter() - t0 - score_s - report_s
                if last:
                    metrics.update(tokens.totals(metrics["train_seconds"]), batching=batches.mode)
                metrics["report_seconds"] = report_s
                if last:
                    timeline.write(tmpdir, rank, tl, {"preloaded": preloaded})
                r0 = time.perf_counter()
                session.report(metrics, tmpdir)
                report_s += time.perf_counter() - r0
    tracker.close()  # a run with no steps left (resumed at its end)


@contextlib.contextmanager
def _checkpoint_dir(root: str | None, step: int, rank: int, keep: int):
    """Where a rank writes a checkpoint: a temp dir Ray persists, or (local mode, where Ray does
    not persist) `root/checkpoint_<step>` with only the newest `keep` kept."""
    if root is None:
        with tempfile.TemporaryDirectory(prefix=f"af-ckpt-{rank}-") as tmp:
            yield Path(tmp)
        return
    base = Path(root)
    d = base / f"checkpoint_{step:07d}"
    d.mkdir(parents=True, exist_ok=True)
    yield d
    if rank == 0:  # ranks of one machine share the folder: one of them prunes
        for old in sorted(base.glob("checkpoint_*"))[:-keep]:
            shutil.rmtree(old, ignore_errors=True)


class _Tracker:
    """Rank 0 logs step metrics to the pipeline's MLflow run (the only writer during training), through
    a sender that never stops the loop when the tracking server is away (workers.metric_sender)."""

    def __init__(self, cfg: dict | None, rank: int):
        self.sender = None
        if cfg and rank == 0:
            from mlflow import MlflowClient

            from workers.metric_sender import MetricSender

            self.sender = MetricSender(MlflowClient(tracking_uri=cfg["tracking_uri"]), cfg["run_id"])
            self.flush_s = float(cfg.get("flush_s", 30.0))

    def log(self, records: list[dict]) -> None:
        if self.sender is not None:
            self.sender.log(records)

    def close(self) -> dict:
        """Final metrics about the sending: what is still unsent (the driver sends it) and how often
        the store failed."""
        if self.sender is None:
            return {}
        sender, self.sender = self.sender, None
        backlog = sender.close(self.flush_s)
        out = {"tracking_failures": sender.failures}
        if backlog:
            out["tracking_backlog"] = [list(m) for m in backlog]
        return out
