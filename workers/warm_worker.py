"""What a warm worker process runs (workers.warm has the driver's side): heavy imports and a first
DeepSpeed engine at start, then leases, one run at a time, each with a `WarmSession`.

The actor class is a plain class (`WarmWorker`); `workers.warm` makes it a Ray actor, so its logic is
testable without Ray.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import threading
import time
from pathlib import Path

from workers.common import FORWARDED_ENV, QUIET_ENV
from workers.errors import TrainingError
from workers.session import TrainSession

PRELOAD = ("torch", "transformers", "peft", "deepspeed", "mlflow")
COMPLETE = "adapterflow_complete.json"  # written into a checkpoint once every rank has written its part
LEASE_TTL_S = 120.0  # a lease no call used expires (its driver died between leasing and training)


def fingerprint() -> str:
    """What a warm worker must share with the driver: the `workers` package it imports (paths, sizes,
    mtimes), the interpreter, and the environment a run forwards."""
    root = Path(__file__).resolve().parent
    h = hashlib.sha256(f"{sys.executable}|{root}".encode())
    for f in sorted(root.rglob("*.py")):
        st = f.stat()
        h.update(f"{f.relative_to(root)}:{st.st_size}:{st.st_mtime_ns};".encode())
    h.update(json.dumps(worker_env(), sort_keys=True).encode())
    return h.hexdigest()[:16]


def worker_env() -> dict[str, str]:
    env = {k: os.environ[k] for k in (*QUIET_ENV, *FORWARDED_ENV) if k in os.environ}
    env.update(DS_ACCELERATOR="cpu", TOKENIZERS_PARALLELISM="false")
    return env


class WarmSession(TrainSession):
    """One rank of a warm run: checkpoints stay where the ranks wrote them (one shared folder); each
    report waits for every rank, then rank 0 marks the checkpoint complete."""

    def __init__(self, rank: int, world: int, rendezvous: tuple[str, int], resume_from: str | None = None):
        self.rank, self.world, self.rendezvous = rank, world, tuple(rendezvous)
        self.resume_from = resume_from
        self.last: tuple[dict, str] | None = None

    def report(self, metrics: dict, checkpoint_dir: Path) -> None:
        import torch.distributed as dist

        if self.world > 1:
            dist.barrier()
        if self.rank == 0:
            (Path(checkpoint_dir) / COMPLETE).write_text(json.dumps(metrics, default=str))
        self.last = (dict(metrics), str(checkpoint_dir))

    @contextlib.contextmanager
    def checkpoint(self):
        yield Path(self.resume_from) if self.resume_from else None


def latest_complete(run_dir: Path) -> Path | None:
    found = sorted(d for d in Path(run_dir).glob("checkpoint_*") if (d / COMPLETE).is_file())
    return found[-1] if found else None


class WarmWorker:
    """The actor (see `_actor_class`): heavy imports at start, then runs on lease."""

    def __init__(self):
        import importlib

        t0 = time.time()
        for name in PRELOAD:
            importlib.import_module(name)
        from workers.models import quiet_transformers

        quiet_transformers()
        _first_engine()
        self.started, self.import_s = t0, time.time() - t0
        self.fp = fingerprint()
        self._lock = threading.Lock()
        self._lease: tuple[str, float] | None = None  # (token, expiry)
        self._busy = False
        self.runs = 0

    def info(self) -> dict:
        return {"pid": os.getpid(), "fingerprint": self.fp, "import_s": round(self.import_s, 2), "busy": self._busy,
                "leased": self._lease is not None, "runs": self.runs}

    def acquire(self, token: str, fp: str) -> str:
        with self._lock:
            if self._busy or (self._lease is not None and self._lease[1] > time.monotonic()):
                return "busy"
            if fp != self.fp:
                return "stale"
            self._lease = (token, time.monotonic() + LEASE_TTL_S)
            return "ok"

    def release(self, token: str) -> None:
        with self._lock:
            if self._lease is not None and self._lease[0] == token:
                self._lease = None

    @contextlib.contextmanager
    def _use(self, token: str):
        with self._lock:
            if self._lease is None or self._lease[0] != token:
                raise TrainingError("a warm worker was called without its lease (it expired): run again")
            self._busy = True
        try:
            yield
        finally:
            with self._lock:
                self._busy = False
                self._lease = (token, time.monotonic() + LEASE_TTL_S)
            self.runs += 1

    def rendezvous(self) -> tuple[str, int]:
        import socket

        import ray

        ip = ray.util.get_node_ip_address()
        with socket.socket() as s:
            s.bind((ip, 0))
            return ip, s.getsockname()[1]

    def train(self, token: str, config: dict, rank: int, world: int, rendezvous: tuple[str, int]) -> dict:
        from workers.train_loop import run_training

        with self._use(token):
            session = WarmSession(rank, world, rendezvous, config.get("resume_from"))
            run_training(config, session)
            metrics, ckpt = session.last if session.last else ({}, None)
            return {"metrics": metrics, "checkpoint": ckpt, "pid": os.getpid()}

    def evaluate(self, token: str, spec_json: dict, adapter_dir: str, holdout: bool, threads: int) -> dict:
        from workers.spec_view import WorkerSpec
        from workers.stages import evaluate_artifact

        with self._use(token):
            return evaluate_artifact(WorkerSpec.model_validate(spec_json), Path(adapter_dir), threads, holdout=holdout)

    def precheck(self, token: str, spec_json: dict) -> None:
        from workers.spec_view import WorkerSpec
        from workers.stages import precheck_adapter

        with self._use(token):
            precheck_adapter(WorkerSpec.model_validate(spec_json))


def _first_engine() -> None:
    """A throw-away DeepSpeed engine (ZeRO-2, gloo, one process, one step): the first engine of a process
    imports and builds what every later one reuses (seconds), so no run pays it."""
    import deepspeed
    import torch

    from workers.train_loop import process_group

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    config = {"train_batch_size": 1, "train_micro_batch_size_per_gpu": 1, "steps_per_print": 10**9,
              "zero_optimization": {"stage": 2}, "zero_allow_untested_optimizer": True}
    with process_group("gloo"):
        engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters()), config=config)
        engine.backward(engine(torch.ones(1, 4)).sum())
        engine.step()
