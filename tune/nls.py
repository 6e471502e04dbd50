"""The NLS sub-adapter search on Ray Tune: configurations of one trained super-adapter, each trial a
single evaluation on the held-out selection slice (no training), weighed against the sub-adapter's
parameters. What a configuration is comes from the super-adapter's method (`subadapter_space`,
`subadapter_references`, `set_subadapter`, `subadapter_params`; NLS: a rank per layer group).

- The space: one key `nls.group_<i>` per group, a choice of its values (a grid axis with
  `tune.nls.grid`).
- The method's reference configurations (NLS: SQFT's maximal, heuristic and minimal) are evaluated
  first (the searcher's `points_to_evaluate`), then `tune.num_samples` proposals: Optuna's
  multi-objective TPE, or random.
- A trial process loads the super-adapter once (NLS: as an elastic model) and keeps it (Tune reuses
  the process): a trial is `set_subadapter` and one pass over the slice.
"""

from __future__ import annotations

import itertools
import json
import math
import os
from pathlib import Path

from tune.config import TuneSpec
from tune.trainable import SCORE_PREFIX, scores

PARAMS_METRIC = "lora_params"
KEY = "nls.group_{}"


def _method(manifest_or_name):
    from workers.methods import get_method

    name = manifest_or_name if isinstance(manifest_or_name, str) else manifest_or_name["method"]
    return get_method(name)


def load_groups(folder: Path, method: str) -> list[dict]:
    """The super-adapter's groups, as its method reads them (NLS: `elastic_adapter_config.json`)."""
    return _method(method).subadapter_space(Path(folder))


def ranks_of(config: dict, n: int) -> list[int]:
    return [int(config[KEY.format(i)]) for i in range(n)]


def config_of(ranks: list[int]) -> dict:
    return {KEY.format(i): r for i, r in enumerate(ranks)}


def reference_points(groups: list[dict], method: str) -> dict[str, dict]:
    """The method's reference configurations (NLS: SQFT's maximal, heuristic, minimal), as trial configs."""
    return {v: config_of(c) for v, c in _method(method).subadapter_references(groups).items()}


def space_size(groups: list[dict]) -> int:
    return math.prod(len(g["search_space"]) for g in groups)


def param_space(groups: list[dict], grid: bool) -> dict:
    from ray import tune

    make = tune.grid_search if grid else tune.choice
    return {KEY.format(i): make(list(g["search_space"])) for i, g in enumerate(groups)}


def nls_searcher(t: TuneSpec, groups: list[dict], method: str, metric: str, mode: str, max_concurrent: int = 0):
    """Optuna's multi-objective TPE (held-out metric, LoRA parameters), or random; both evaluate the
    reference configurations first. A grid needs no searcher beyond Tune's variant generator. Each
    bounds the trials running at once itself (Tune ignores TuneConfig's bound for them)."""
    refs = [] if t.nls.grid else list(reference_points(groups, method).values())
    if t.searcher == "optuna":
        import optuna
        from ray.tune.search import ConcurrencyLimiter
        from ray.tune.search.optuna import OptunaSearch

        alg = OptunaSearch(metric=[metric, PARAMS_METRIC], mode=[mode, "min"], points_to_evaluate=refs,
                           sampler=optuna.samplers.TPESampler(seed=t.seed))
        return ConcurrencyLimiter(alg, max_concurrent=t.max_concurrent_trials or 2)
    from ray.tune.search.basic_variant import BasicVariantGenerator

    return BasicVariantGenerator(points_to_evaluate=refs or None, random_state=t.seed, max_concurrent=max_concurrent)


def num_trials(t: TuneSpec, groups: list[dict], method: str) -> int:
    """Trials the search runs: the whole grid, or the reference points plus num_samples proposals."""
    return space_size(groups) if t.nls.grid else len(reference_points(groups, method)) + t.num_samples


# a trial process keeps its loaded super-adapter, tokenizer and encoded slice for the next trial
_LOADED: dict[str, tuple] = {}


def _loaded(spec, folder: Path, method: str):
    key = json.dumps([str(folder), spec.model.model_dump(mode="json"), spec.data.model_dump(mode="json")],
                     sort_keys=True)
    if key not in _LOADED:
        from workers.data import encode, load_holdout
        from workers.models import adapter_tokenizer, load_model, load_tokenizer

        tok = adapter_tokenizer(spec.model, folder)
        model = _method(method).load(load_model(spec.model, load_tokenizer(spec.model)), folder).eval()
        _LOADED.clear()  # one super-adapter per process
        groups = load_groups(folder, method)
        examples = encode(load_holdout(spec.data), spec.data, spec.model, tok, spec.workspace_path())
        _LOADED[key] = (model, tok, examples, groups)
    return _LOADED[key]


def evaluate_ranks(config: dict, *, base: dict, folder: str, method: str) -> None:
    """The function trainable of a sub-adapter search: the super-adapter run as the trial's sub-adapter
    on the held-out slice; reports the scores and the sub-adapter's parameters."""
    import time

    import ray.tune
    import torch

    from workers.ds_config import worker_env
    from workers.evaluate import evaluate_model
    from workers.spec_view import WorkerSpec

    spec = WorkerSpec.model_validate(base)
    for k, v in worker_env(spec.train).items():
        os.environ[k] = v
    torch.set_num_threads(max(1, int(spec.train.threads_per_worker or 1)))
    t0 = time.perf_counter()
    model, tok, examples, groups = _loaded(spec, Path(folder), method)
    load_s = time.perf_counter() - t0
    ranks = ranks_of(config, len(groups))
    m = _method(method)
    m.set_subadapter(model, ranks)
    t1 = time.perf_counter()
    num_labels = len(spec.model.labels()) if spec.model.task == "seq-cls" else None
    report = evaluate_model(model, tok, examples, spec.model.task, num_labels)
    ray.tune.report({**scores(report), PARAMS_METRIC: m.subadapter_params(Path(folder), ranks),
                     "ranks": ranks, "eval_s": time.perf_counter() - t1, "load_s": load_s})


def build_nls_tuner(spec_json: dict, t: TuneSpec, task: str, folder: Path, method: str, *, storage: Path,
                    name: str, callbacks: list, max_concurrent: int):
    from ray import tune
    from ray.tune import FailureConfig, RunConfig, TuneConfig, Tuner

    from tune.search import trial_base, with_loggers
    from tune.space import reported_metric

    metric, mode = reported_metric(t, task)
    groups = load_groups(folder, method)
    base = trial_base(spec_json, t)
    trainable = tune.with_resources(tune.with_parameters(evaluate_ranks, base=base, folder=str(folder), method=method),
                                    dict(t.resources_per_trial))
    return Tuner(
        trainable,
        param_space=param_space(groups, t.nls.grid),
        tune_config=TuneConfig(num_samples=1 if t.nls.grid else num_trials(t, groups, method),
                               search_alg=nls_searcher(t, groups, method, metric, mode, max_concurrent),
                               time_budget_s=t.time_budget_s,
                               reuse_actors=True, trial_dirname_creator=lambda trial: trial.trial_id),
        run_config=RunConfig(name=name, storage_path=str(storage), callbacks=with_loggers(callbacks), verbose=0,
                             failure_config=FailureConfig(max_failures=0)),
    )


def restore_nls_tuner(path: Path, spec_json: dict, t: TuneSpec, folder: Path, method: str, callbacks: list):
    from ray import tune

    from tune.search import restore_with, trial_base

    trainable = tune.with_resources(
        tune.with_parameters(evaluate_ranks, base=trial_base(spec_json, t), folder=str(folder), method=method),
        dict(t.resources_per_trial))
    return restore_with(path, trainable, callbacks)


def pareto_front(rows: list[dict], mode: str) -> list[int]:
    """Indices of the rows no other row dominates on (metric: `mode`, params: min); rows carry "metric"
    and "params"."""
    better = (lambda a, b: a > b) if mode == "max" else (lambda a, b: a < b)
    front = []
    for i, r in enumerate(rows):
        dominated = any(
            (o["params"] <= r["params"] and not better(r["metric"], o["metric"]))
            and (o["params"] < r["params"] or better(o["metric"], r["metric"]))
            for j, o in enumerate(rows) if j != i)
        if not dominated:
            front.append(i)
    return front


def choose(rows: list[dict], front: list[int], mode: str, max_drop: float) -> int:
    """The smallest sub-adapter on the front whose metric is within `max_drop` of the best."""
    best = (max if mode == "max" else min)(rows[i]["metric"] for i in front)
    ok = [i for i in front if (rows[i]["metric"] >= best - max_drop if mode == "max"
                               else rows[i]["metric"] <= best + max_drop)]
    return min(ok, key=lambda i: (rows[i]["params"], -rows[i]["metric"] if mode == "max" else rows[i]["metric"]))


def every_configuration(groups: list[dict]) -> list[list[int]]:
    return [list(c) for c in itertools.product(*(g["search_space"] for g in groups))]


__all__ = ["PARAMS_METRIC", "SCORE_PREFIX", "build_nls_tuner", "choose", "config_of", "evaluate_ranks",
           "load_groups", "num_trials", "pareto_front", "ranks_of", "reference_points", "restore_nls_tuner"]
