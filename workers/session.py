"""Where the training loop reports to and resumes from, injected so one loop runs under Ray Train,
in a Tune trial or in a plain process (a test).

A session has the worker's `rank` and `world` size, `report(metrics, checkpoint_dir)` (called by
every rank at each checkpoint with the directory it wrote; the last report carries the adapter),
`checkpoint()`: a context giving the directory of the checkpoint to resume from, or None, and
`score(model, tokenizer)`: metrics of the model being trained added to every report (a search's
held-out evaluation; none by default).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path


class TrainSession:
    rank: int = 0
    world: int = 1

    def report(self, metrics: dict, checkpoint_dir: Path) -> None:
        raise NotImplementedError

    @contextlib.contextmanager
    def checkpoint(self) -> Iterator[Path | None]:
        yield None

    def score(self, model, tokenizer) -> dict:
        """Metrics of `model` at a checkpoint, reported with it (called on rank 0 only)."""
        return {}


class RayTrainSession(TrainSession):
    """Ray Train's worker context: reports and checkpoints go to the Train controller, which
    persists them and hands the last one back after a worker-group restart."""

    def __init__(self, resume_from: str | None = None):
        import ray.train

        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.resume_from = resume_from

    def report(self, metrics: dict, checkpoint_dir: Path) -> None:
        import ray.train

        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(checkpoint_dir)))

    @contextlib.contextmanager
    def checkpoint(self) -> Iterator[Path | None]:
        import ray.train

        ckpt = ray.train.get_checkpoint()
        if ckpt is None and self.resume_from:
            ckpt = ray.train.Checkpoint.from_directory(self.resume_from)
        if ckpt is None:
            yield None
            return
        with ckpt.as_directory() as d:
            yield Path(d)


class LocalSession(TrainSession):
    """One process, rank 0 of 1: reports go to a callback; resumes from a directory if given."""

    def __init__(self, on_report: Callable[[dict, Path], None] | None = None, resume_from: str | None = None):
        self.on_report = on_report
        self.resume_from = resume_from
        self.reports: list[dict] = []

    def report(self, metrics: dict, checkpoint_dir: Path) -> None:
        self.reports.append(dict(metrics))
        if self.on_report is not None:
            self.on_report(metrics, checkpoint_dir)

    @contextlib.contextmanager
    def checkpoint(self) -> Iterator[Path | None]:
        yield Path(self.resume_from) if self.resume_from else None
