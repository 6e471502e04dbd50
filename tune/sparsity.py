"""Sparsity sweeps: what a trial reports about its sparsity, and the sparse base it trains on.

- A method set by a sparsity (SpaRTA's `adapter.sparsity`, declared by the method's
  `adapter_sparsity`) makes every trial report it as `adapter_sparsity`.
- A space with `sparsify.*` keys (`tune.config.sparsifies`) makes every trial Wanda-sparsify the base
  with its sampled values into `<workspace>/sparse/<search>/<trial id>` (the `workers` stage
  `adapterflow sparsify` runs), then train on that folder (`model.name`). The trial reports the
  measured sparsity of the pruned layers as `base_sparsity` and the folder as `sparse_base`; the
  winner is rebuilt, evaluated and registered on it, so its manifest pins the sparse base it was
  trained on, which stays in the workspace.

Every trial also reports `trainable_params` (the training loop does).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from tune.config import sparsifies

ADAPTER_SPARSITY = "adapter_sparsity"
BASE_SPARSITY = "base_sparsity"
SPARSE_BASE = "sparse_base"
SPARSITY_METRICS = (BASE_SPARSITY, ADAPTER_SPARSITY)


def sparse_root(workspace: Path, experiment: str) -> Path:
    """Where a search's trials write their sparse bases."""
    return Path(workspace) / "sparse" / experiment


def prepare(spec, data: dict, config: dict):
    """(the spec the trial trains, the sparsity metrics it reports with every result). `data` is the
    trial's spec as JSON data; with `sparsify.*` values in `config` the base is sparsified first."""
    from workers.methods import method_of
    from workers.spec_view import WorkerSpec

    extra: dict = {}
    if sparsifies(config):
        import ray.tune
        import torch

        ctx = ray.tune.get_context()
        out = sparse_root(spec.workspace_path(), ctx.get_experiment_name()) / ctx.get_trial_id()
        torch.set_num_threads(spec.train.threads_per_worker or max(1, int(spec.train.worker_resources().get("CPU", 1))))
        from workers.stages import sparsify_base

        report = sparsify_base(spec, out, reuse=True)  # a resumed trial keeps the base it made
        data = {**data, "model": {**data["model"], "name": str(out)}}
        spec = WorkerSpec.model_validate(data)
        extra = {BASE_SPARSITY: float(report["total"]["sparsity"]), SPARSE_BASE: str(out)}
    level = method_of(spec.adapter).adapter_sparsity(spec.adapter)
    if level is not None:
        extra[ADAPTER_SPARSITY] = float(level)
    return spec, extra


def trained_spec(base: dict, config: dict, metrics: dict) -> dict:
    """The spec (as JSON data) a finished trial trained: `base` with its sampled values, on the sparse
    base it made, if it made one."""
    from tune.trainable import trial_spec

    data = trial_spec(base, config)
    if metrics.get(SPARSE_BASE):
        data["model"]["name"] = metrics[SPARSE_BASE]
    return data


def discard_sparse_bases(trials: list[dict], best: dict, keep: str) -> list[Path]:
    """After a search with `tune.keep_sparse_bases: winner`: the sparse bases of this search's other
    trials (failed ones too) removed; the winner's, and those of earlier searches of the same name
    (their registered winners pin them), stay. Returns the folders removed."""
    winner = best["metrics"].get(SPARSE_BASE)
    if keep == "all" or not winner:
        return []
    root = Path(winner).parent
    gone = [root / str(row["trial"]) for row in trials if str(row["trial"]) != Path(winner).name]
    gone = [d for d in gone if d.is_dir()]
    for d in gone:
        shutil.rmtree(d, ignore_errors=True)
    return gone
