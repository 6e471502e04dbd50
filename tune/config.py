"""The `tune` section of a pipeline spec: what `adapterflow tune SPEC` searches and how.

A search space maps spec key paths to distributions:

    tune:
      space:
        train.lr: {loguniform: [1.0e-4, 1.0e-2]}
        adapter.r: {choice: [4, 8, 16]}
        adapter.target_modules: {choice: [[query, value], [query, key, value]]}

Every trial trains the spec with its sampled values and is scored on a held-out slice of the
training split (`tune.selection_fraction`), never on the evaluation split, which only the winner
is evaluated on. A space with `sparsify.*` keys makes a sparsity sweep: each trial first
Wanda-sparsifies the base with its sampled values, then trains on that sparse base. No torch here:
validating a spec stays cheap.
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import Field, model_validator

from workers.common import StrictModel

SPARSIFY_KEYS = "sparsify."


def sparsifies(paths) -> bool:
    """The sparsity-sweep rule: trials Wanda-sparsify their base, then train on it, when the space
    (or a trial's sampled values) holds any `sparsify.*` key."""
    return any(p.startswith(SPARSIFY_KEYS) for p in paths)


DISTRIBUTIONS = ("choice", "grid", "uniform", "loguniform", "randint")
DISTRIBUTIONS_HELP = ("one of {choice: [v, ...]}, {grid: [v, ...]}, {uniform: [lo, hi]}, "
                      "{loguniform: [lo, hi]}, {randint: [lo, hi]} (hi excluded)")


class Distribution(StrictModel):
    """One key's distribution: exactly one of the fields."""

    choice: list[Any] | None = Field(None, description="Sample one of these values.")
    grid: list[Any] | None = Field(None, description="Try every value (a grid axis; num_samples repeats the grid).")
    uniform: tuple[float, float] | None = Field(None, description="A float in [lo, hi].")
    loguniform: tuple[float, float] | None = Field(None, description="A float in [lo, hi], uniform in log space.")
    randint: tuple[int, int] | None = Field(None, description="An integer in [lo, hi).")

    @model_validator(mode="after")
    def _one(self):
        given = [k for k in DISTRIBUTIONS if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"a distribution is {DISTRIBUTIONS_HELP}; got {', '.join(given) or 'none'}")
        kind = given[0]
        if kind in ("choice", "grid") and not getattr(self, kind):
            raise ValueError(f"{kind}: needs at least one value")
        if kind in ("uniform", "loguniform", "randint"):
            lo, hi = getattr(self, kind)
            if not lo < hi:
                raise ValueError(f"{kind}: [lo, hi] needs lo < hi, got [{lo}, {hi}]")
            if kind == "loguniform" and lo <= 0:
                raise ValueError(f"loguniform: bounds must be > 0, got [{lo}, {hi}]")
        return self

    @property
    def kind(self) -> str:
        return next(k for k in DISTRIBUTIONS if getattr(self, k) is not None)

    def candidates(self) -> list[Any]:
        """Values that stand for the distribution when a spec is checked: every listed value, or
        the bounds of a range."""
        kind = self.kind
        if kind in ("choice", "grid"):
            return list(getattr(self, kind))
        lo, hi = getattr(self, kind)
        return [lo, hi - 1] if kind == "randint" else [lo, hi]

    def size(self) -> float:
        """How many distinct values it can take (inf for a continuous range)."""
        kind = self.kind
        if kind in ("choice", "grid"):
            return len(getattr(self, kind))
        if kind == "randint":
            return self.randint[1] - self.randint[0]
        return math.inf


class AshaSpec(StrictModel):
    grace_period: int = Field(1, gt=0, description="Held-out evaluations every trial gets before it can be stopped.")
    reduction_factor: float = Field(2.0, gt=1, description="Keep 1/reduction_factor of the trials at each rung.")
    max_t: int = Field(100, gt=0, description="Evaluations after which a trial is stopped in any case.")


class NlsSearchSpec(StrictModel):
    """An NLS sub-adapter search: rank configurations of one trained super-adapter, evaluated only (no
    training), on two objectives: the held-out metric and the sub-adapter's LoRA parameters."""

    super_adapter: str | None = Field(
        None, description="The trained NLS super-adapter: a folder, models:/NAME/N or models:/NAME@ALIAS. Null: "
        "train the spec's NLS adapter first, with the selection slice held out of its training.",
    )
    grid: bool = Field(
        False, description="Evaluate every rank configuration (the product of the groups' spaces) instead of "
        "sampling tune.num_samples of them.",
    )
    max_drop: float = Field(
        0.01, ge=0, description="The chosen sub-adapter: the smallest on the Pareto front whose held-out metric is "
        "within max_drop of the best one's (0: the best, whatever its size).",
    )


class TuneSpec(StrictModel):
    space: dict[str, Distribution] = Field(
        default_factory=dict,
        description="Spec key path -> distribution, " + DISTRIBUTIONS_HELP + ". Every trial trains the spec "
        "with its sampled values; with sparsify.* keys each trial first Wanda-sparsifies the base with its values "
        "and trains on that sparse base (a sparsity sweep).",
    )
    metric: str | None = Field(
        None, description="Metric trials are selected on, measured on the held-out selection slice (default: "
        "accuracy for seq-cls, eval_loss for causal-lm).",
    )
    mode: Literal["max", "min"] | None = Field(
        None, description="Whether a larger metric is better (default: min for losses and perplexity, else max).",
    )
    selection_fraction: float = Field(
        0.1, gt=0, lt=1, description="Seeded share of the training split held out of every trial's training "
        "and used to select; the evaluation split is used only for the winner.",
    )
    selection_seed: int = Field(0, description="Seed of the held-out selection slice (the same for every trial).")
    num_samples: int = Field(8, gt=0, description="Trials to sample (with grid axes: repetitions of the grid).")
    searcher: Literal["random", "optuna", "hyperopt"] = Field(
        "random", description="How configurations are proposed: random (and grid axes), optuna (TPE) or hyperopt (TPE).",
    )
    scheduler: Literal["fifo", "asha"] = Field(
        "fifo", description="fifo runs every trial to its end; asha stops trials whose held-out metric "
        "trails at a rung (single-process trials only: train.num_workers: 0).",
    )
    asha: AshaSpec = Field(default_factory=AshaSpec, description="ASHA's rungs, in held-out evaluations.")
    report_every: int | None = Field(
        None, gt=0, description="Optimizer steps between a trial's held-out evaluations (ASHA's rungs); "
        "default: the spec's train.checkpoint_every.",
    )
    max_concurrent_trials: int | None = Field(
        None, gt=0, description="Trials running at once (default: as many as the resources allow).",
    )
    time_budget_s: float | None = Field(
        None, gt=0, description="Stop starting and running trials after this many seconds; finished trials count.",
    )
    resources_per_trial: dict[str, float] = Field(
        default_factory=lambda: {"CPU": 1.0},
        description="Ray resources of a single-process trial (train.num_workers: 0). A trial that launches "
        "Ray Train workers requests nothing itself: its workers hold train.resources_per_worker.",
    )
    nls: NlsSearchSpec | None = Field(
        None, description="Search the rank configurations of an NLS super-adapter instead of training trials "
        "(its space is the super-adapter's elastic_adapter_config.json; SQFT's maximal, heuristic and minimal "
        "configurations are always evaluated too). searcher: optuna is multi-objective TPE (metric vs LoRA "
        "parameters); random samples; nls.grid tries every configuration.",
    )
    seed: int = Field(0, description="Seeds the searcher's proposals.")
    keep_sparse_bases: Literal["winner", "all"] = Field(
        "winner", description="With sparsify.* keys in the space, every trial Wanda-sparsifies its base into "
        "<workspace>/sparse/<name>-search/<trial id> and trains on it; after the search `winner` keeps only the "
        "winner's sparse base (the one its registered adapter pins), `all` keeps every trial's.",
    )
    register_winner: bool = Field(
        True, description="Register the winner; its alias moves only when it beats the holder (track.alias).",
    )

    @model_validator(mode="after")
    def _check(self):
        if self.nls is not None:
            if self.space:
                raise ValueError("tune.space: an NLS search's space is the super-adapter's elastic_adapter_config.json; "
                                 "remove tune.space (or tune.nls for a training search)")
            if self.scheduler != "fifo":
                raise ValueError("tune.scheduler: NLS trials are single evaluations, nothing to stop early; use fifo")
            if self.searcher == "hyperopt":
                raise ValueError("tune.searcher: hyperopt has one objective; an NLS search weighs the metric against "
                                 "the sub-adapter's size: use optuna (multi-objective TPE) or random")
            if self.nls.grid and self.searcher != "random":
                raise ValueError("tune.nls.grid: every configuration is evaluated; set searcher: random (the default)")
            return self
        if self.searcher != "random" and any(d.kind == "grid" for d in self.space.values()):
            raise ValueError(f"tune.space: grid axes need searcher: random; {self.searcher} proposes "
                             "its own points (use choice instead)")
        if f"{SPARSIFY_KEYS}output" in self.space:
            raise ValueError("tune.space.sparsify.output: cannot be searched; each trial writes its sparse base to "
                             "<workspace>/sparse/<name>-search/<trial id>: remove it from tune.space")
        if self.searcher != "random" and not self.space:
            raise ValueError(f"tune.searcher: {self.searcher} needs a non-empty tune.space")
        return self

    def selection(self, task: str) -> tuple[str, str]:
        """(metric, mode) trials are selected on."""
        metric = self.metric or ("accuracy" if task == "seq-cls" else "eval_loss")
        mode = self.mode or ("min" if metric.endswith(("loss", "perplexity")) else "max")
        return metric, mode
