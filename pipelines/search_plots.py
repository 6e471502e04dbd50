"""The search's plots, logged to its parent run: each trial's held-out metric along its training
steps, and the space in parallel coordinates coloured by the metric."""

from __future__ import annotations

import math


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def trial_curves(trials: list[dict], metric: str):
    """Held-out metric against optimizer step, one line per trial (a stopped trial's line ends early)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    drawn = 0
    for row in trials:
        points = [(h["step"], h[metric]) for h in row["history"] if metric in h and h.get(metric) == h.get(metric)]
        if points:
            xs, ys = zip(*points)
            ax.plot(xs, ys, marker="o", ms=3, lw=1, alpha=0.8,
                    ls="-" if row["status"] == "finished" else "--", label=str(row["trial"])[-5:])
            drawn += 1
    if not drawn:
        plt.close(fig)
        return None
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(metric.replace("held_out_", "held-out "))
    ax.grid(alpha=0.3)
    if drawn <= 16:
        ax.legend(fontsize=6, ncol=2, title="trial (dashed: stopped early)", title_fontsize=7)
    fig.tight_layout()
    return fig


def _axis(values: list, kind: str) -> tuple[list[float], list[str]]:
    """Values of one key mapped to [0, 1] (a log axis for loguniform; categories in listed order)."""
    if kind in ("choice", "grid") or not all(isinstance(v, (int, float)) for v in values):
        cats = []
        for v in values:
            if repr(v) not in cats:
                cats.append(repr(v))
        span = max(1, len(cats) - 1)
        return [cats.index(repr(v)) / span for v in values], cats
    xs = [math.log10(v) for v in values] if kind == "loguniform" else [float(v) for v in values]
    lo, hi = min(xs), max(xs)
    return [(x - lo) / (hi - lo) if hi > lo else 0.5 for x in xs], [f"{min(values):.3g}", f"{max(values):.3g}"]


def parallel_coordinates(trials: list[dict], tune_spec, metric: str, mode: str):
    """One axis per searched key and one for the metric; a line per trial that reported it."""
    scored = [row for row in trials if metric in row["metrics"]]
    keys = list(tune_spec.space)
    if not scored or not keys:
        return None
    plt = _plt()
    columns, labels = [], []
    for key in keys:
        xs, ticks = _axis([row["config"].get(key) for row in scored], tune_spec.space[key].kind)
        columns.append(xs)
        labels.append(f"{key}\n{ticks[0]} .. {ticks[-1]}")
    values = [row["metrics"][metric] for row in scored]
    ys, _ = _axis(values, "uniform")
    columns.append(ys)
    labels.append(f"{metric.replace('held_out_', 'held-out ')}\n{min(values):.3f} .. {max(values):.3f}")
    cmap = plt.get_cmap("viridis")
    fig, ax = plt.subplots(figsize=(1.8 * len(columns) + 2, 4))
    for i, row in enumerate(scored):
        shade = ys[i] if mode == "max" else 1 - ys[i]
        ax.plot(range(len(columns)), [c[i] for c in columns], color=cmap(shade), lw=1.5 if row["status"] == "finished"
                else 0.8, alpha=0.9, ls="-" if row["status"] == "finished" else "--")
    ax.set_xticks(range(len(columns)), labels, fontsize=7)
    ax.set_yticks([])
    for x in range(len(columns)):
        ax.axvline(x, color="grey", lw=0.5)
    ax.set_title("trials (bright: better; dashed: stopped early)", fontsize=9)
    fig.tight_layout()
    return fig
