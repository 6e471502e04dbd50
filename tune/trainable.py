"""What one trial runs: the spec with the trial's sampled values, trained by the same `workers`
stages as `adapterflow train`, scored on the held-out selection slice of the training split.

- Single-process trials (`train.num_workers: 0`): the training loop runs in the trial's own process
  with a session that reports every checkpoint to Tune together with its held-out scores, so ASHA
  can stop a trial between two reports (and Tune resumes a trial from its last checkpoint).
- Trials with Ray Train workers (`train.num_workers >= 1`): the trial launches a `TorchTrainer`
  (DeepSpeed workers) and reports once at the end. The trial itself holds no resources; its
  workers do. Only FIFO runs such trials (ASHA stopping them hangs on Ray 2.60, ray-project/ray#54305).

A sparsity sweep's trial first sparsifies its base and reports its sparsity (`tune.sparsity`).
"""

from __future__ import annotations

import contextlib
import copy
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from workers.common import set_key_path
from workers.session import TrainSession

SCORE_PREFIX = "held_out_"


def trial_spec(base: dict, config: dict) -> dict:
    """The spec (as JSON data) a trial trains: `base` with the trial's values (`config`: key path ->
    value) set."""
    spec = copy.deepcopy(base)
    for path, value in config.items():
        set_key_path(spec, path, value)
    return spec


def scores(report: dict) -> dict:
    """An evaluation report's scalar metrics, named as trials report them."""
    return {f"{SCORE_PREFIX}{k}": float(v) for k, v in report.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "n"}


class TrialSession(TrainSession):
    """A single-process trial: every checkpoint goes to Tune with the held-out scores of the model
    at that point; a restored trial resumes from Tune's checkpoint."""

    def __init__(self, spec, extra: dict | None = None):
        self.spec = spec
        self.extra = dict(extra or {})  # reported with every result (a sweep's sparsity)
        self._examples = None

    def report(self, metrics: dict, checkpoint_dir: Path) -> None:
        import ray.tune

        ray.tune.report({**metrics, **self.extra}, checkpoint=ray.tune.Checkpoint.from_directory(str(checkpoint_dir)))

    @contextlib.contextmanager
    def checkpoint(self) -> Iterator[Path | None]:
        import ray.tune

        ckpt = ray.tune.get_checkpoint()
        if ckpt is None:
            yield None
            return
        with ckpt.as_directory() as d:
            yield Path(d)

    def score(self, model, tokenizer) -> dict:
        from workers.data import encode, load_holdout
        from workers.evaluate import evaluate_model

        spec = self.spec
        if self._examples is None:
            self._examples = encode(load_holdout(spec.data), spec.data, spec.model, tokenizer,
                                    spec.workspace_path())
        num_labels = len(spec.model.labels()) if spec.model.task == "seq-cls" else None
        return scores(evaluate_model(model, tokenizer, self._examples, spec.model.task, num_labels))


def run_trial(config: dict, *, base: dict) -> None:
    """The function trainable: `config` holds the trial's sampled values, `base` the validated spec."""
    from tune.sparsity import prepare
    from workers.ds_config import worker_env
    from workers.spec_view import WorkerSpec

    data = trial_spec(base, config)
    spec = WorkerSpec.model_validate(data)
    for k, v in worker_env(spec.train).items():
        os.environ[k] = v  # this trial's threads, also in a reused process
    spec, extra = prepare(spec, data, config)
    if spec.train.num_workers == 0:
        _single_process(spec, extra)
    else:
        _with_train_workers(spec, extra)


def _single_process(spec, extra: dict) -> None:
    from workers.train_loop import run_training

    with tempfile.TemporaryDirectory(prefix="af-trial-") as root:  # Tune keeps what is reported
        run_training({"spec": spec.model_dump(mode="json"), "mlflow": None, "checkpoint_root": root},
                     TrialSession(spec, extra))


def _with_train_workers(spec, extra: dict) -> None:
    import ray.tune

    from workers.stages import build_artifact, evaluate_artifact, launch_training

    trial = ray.tune.get_context().get_trial_id()
    outcome = launch_training(spec, run_name=f"{spec.name}-trial-{trial}")
    with tempfile.TemporaryDirectory(prefix="af-trial-") as tmp:
        adapter = build_artifact(spec, outcome.checkpoint, Path(tmp) / "adapter")
        held_out = scores(evaluate_artifact(spec, adapter, holdout=True))
    ray.tune.report({**outcome.metrics, **held_out, **extra},
                    checkpoint=ray.tune.Checkpoint.from_directory(str(outcome.checkpoint)))
