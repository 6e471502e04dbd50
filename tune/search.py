"""The Ray Tune search of a spec's `tune:` section: one trial per sampled configuration, run by
`tune.trainable.run_trial`, selected on the held-out slice of the training split."""

from __future__ import annotations

import math
from pathlib import Path

from tune.config import TuneSpec
from tune.space import param_space, reported_metric, scheduler, searcher
from tune.trainable import run_trial


def trial_base(spec_json: dict, t: TuneSpec) -> dict:
    """What every trial starts from: the spec with the held-out selection slice set aside, the
    evaluation rhythm (ASHA's rungs) and a single-process trial's threads set."""
    import copy

    base = copy.deepcopy(spec_json)
    base["data"]["holdout_fraction"] = t.selection_fraction
    base["data"]["holdout_seed"] = t.selection_seed
    if t.report_every:
        base["train"]["checkpoint_every"] = t.report_every
    if base["train"]["num_workers"] == 0 and not base["train"].get("threads_per_worker"):
        base["train"]["threads_per_worker"] = max(1, int(t.resources_per_trial.get("CPU", 1)))
    return base


# what a trial that launches Ray Train workers holds itself (Tune needs some resource): next to nothing
DRIVER_CPU = 0.01


def trial_resources(spec_json: dict, t: TuneSpec) -> dict:
    """A single-process trial holds its own resources; one that launches Ray Train workers holds next to
    none (its workers hold train.resources_per_worker), so trials and their workers fit together."""
    return dict(t.resources_per_trial) if spec_json["train"]["num_workers"] == 0 else {"CPU": DRIVER_CPU}


def concurrent_trials(spec_json: dict, t: TuneSpec, cluster: dict) -> int:
    """Trials that can run at once on `cluster` (Ray's resources): the spec's, else what fits."""
    if t.max_concurrent_trials:
        return t.max_concurrent_trials
    train = spec_json["train"]
    if train["num_workers"] == 0:
        need = {k: v for k, v in t.resources_per_trial.items() if v > 0}
    else:
        per = train.get("resources_per_worker") or {"CPU": 1.0, **({"GPU": 1.0} if train.get("use_gpu") else {})}
        need = {k: v * train["num_workers"] for k, v in per.items() if v > 0}
        need["CPU"] = need.get("CPU", 0) + DRIVER_CPU
    fits = [math.floor(cluster.get(k, 0) / v + 1e-9) for k, v in need.items()]
    return max(1, min(fits) if fits else 1)


# Checkpoints kept per trial. Tune forces an experiment snapshot (trial states, checkpoints, searcher)
# once a trial has reported `num_to_keep` checkpoints since the last one: with 1, every report is in
# the snapshot when the next event comes, so a search whose driver is killed resumes each trial from
# its last report. With 2 the snapshot can trail by a report (measured: a trial killed after its first
# report started again from step 0, a finished one trained its last steps again).
KEEP = 1


def build_tuner(spec_json: dict, t: TuneSpec, task: str, *, storage: Path, name: str, callbacks: list,
                max_concurrent: int):
    import os

    from ray import tune
    from ray.tune import CheckpointConfig, FailureConfig, RunConfig, TuneConfig, Tuner

    # every held-out evaluation is a checkpoint, and each one snapshots the experiment (see KEEP):
    # Tune's warning about frequent state snapshots is expected
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    metric, mode = reported_metric(t, task)
    trainable = tune.with_resources(tune.with_parameters(run_trial, base=trial_base(spec_json, t)),
                                    trial_resources(spec_json, t))
    return Tuner(
        trainable,
        param_space=param_space(t),
        tune_config=TuneConfig(metric=metric, mode=mode, num_samples=t.num_samples,
                               search_alg=searcher(t, max_concurrent), scheduler=scheduler(t),
                               # a SearchGenerator (random, grid) bounds itself; Tune would ignore this with a warning
                               max_concurrent_trials=None if t.searcher == "random" else max_concurrent,
                               time_budget_s=t.time_budget_s, reuse_actors=True,
                               trial_dirname_creator=lambda trial: trial.trial_id),
        run_config=RunConfig(name=name, storage_path=str(storage), callbacks=with_loggers(callbacks), verbose=0,
                             failure_config=FailureConfig(max_failures=0),
                             checkpoint_config=CheckpointConfig(num_to_keep=KEEP)),
    )


def with_loggers(callbacks: list) -> list:
    """The search's callbacks and the logger that writes each trial's TensorBoard event file (Tune adds
    its CSV and JSON loggers itself)."""
    from tune.loggers import TrialEventFiles

    return [*callbacks, TrialEventFiles()]


def restore_tuner(path: Path, spec_json: dict, t: TuneSpec, callbacks: list):
    """A search whose driver stopped, resumed: finished trials stay finished, unfinished ones go on
    from their last checkpoint, failed ones stay failed.

    Tune restores the RunConfig from the experiment's `tuner.pkl`, written when the search started,
    callbacks included: those carry the first driver's tracking URI, parent run and console. This
    driver's `callbacks` take their place (they find what the first driver logged by themselves)."""
    from ray import tune

    trainable = tune.with_resources(tune.with_parameters(run_trial, base=trial_base(spec_json, t)),
                                    trial_resources(spec_json, t))
    return restore_with(path, trainable, callbacks)


def restore_with(path: Path, trainable, callbacks: list):
    """`Tuner.restore` of the experiment at `path` with this driver's callbacks (see restore_tuner)."""
    from ray.tune import Tuner

    tuner = Tuner.restore(str(path), trainable=trainable, resume_unfinished=True, resume_errored=False)
    # no public way to set them on restore (ray-project/ray#41364; Ray is pinned to 2.60). Through a
    # Ray Client (ray://) connection the tuner runs remotely: the restored callbacks stay.
    if getattr(tuner, "_local_tuner", None) is not None:
        tuner._local_tuner.get_run_config().callbacks = with_loggers(callbacks)
    return tuner


def can_restore(path: Path) -> bool:
    from ray.tune import Tuner

    return Path(path).is_dir() and Tuner.can_restore(str(path))
