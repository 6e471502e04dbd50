"""A `tune:` section in Ray Tune's terms: the search space, the searcher and the scheduler."""

from __future__ import annotations

from tune.config import TuneSpec
from tune.trainable import SCORE_PREFIX


def param_space(spec: TuneSpec) -> dict:
    """Key path -> Ray Tune domain (the trial's config holds the sampled value under the key path)."""
    from ray import tune

    out = {}
    for path, d in spec.space.items():
        kind = d.kind
        if kind == "choice":
            out[path] = tune.choice(d.choice)
        elif kind == "grid":
            out[path] = tune.grid_search(d.grid)
        elif kind == "uniform":
            out[path] = tune.uniform(*d.uniform)
        elif kind == "loguniform":
            out[path] = tune.loguniform(*d.loguniform)
        else:
            out[path] = tune.randint(*d.randint)
    return out


def reported_metric(spec: TuneSpec, task: str) -> tuple[str, str]:
    """(the metric trials report, as Tune sees it, and its mode)."""
    metric, mode = spec.selection(task)
    return f"{SCORE_PREFIX}{metric}", mode


def searcher(spec: TuneSpec, max_concurrent: int = 0):
    """The search algorithm proposing configurations (the metric and mode come from the TuneConfig).
    Random and grid proposals hold at most `max_concurrent` trials running (0: no bound) themselves:
    Tune ignores TuneConfig.max_concurrent_trials for them."""
    from ray.tune.search import ConcurrencyLimiter

    if spec.searcher == "random":
        from ray.tune.search.basic_variant import BasicVariantGenerator

        return BasicVariantGenerator(random_state=spec.seed, max_concurrent=max_concurrent)
    if spec.searcher == "optuna":
        import optuna
        from ray.tune.search.optuna import OptunaSearch

        alg = OptunaSearch(sampler=optuna.samplers.TPESampler(seed=spec.seed))
    else:
        from ray.tune.search.hyperopt import HyperOptSearch

        alg = HyperOptSearch(random_state_seed=spec.seed)
    # a model-based searcher learns from finished trials: propose a few at a time
    return ConcurrencyLimiter(alg, max_concurrent=spec.max_concurrent_trials or 2)


def scheduler(spec: TuneSpec):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    if spec.scheduler == "fifo":
        return FIFOScheduler()
    a = spec.asha
    return ASHAScheduler(time_attr="training_iteration", max_t=a.max_t, grace_period=a.grace_period,
                         reduction_factor=a.reduction_factor)
