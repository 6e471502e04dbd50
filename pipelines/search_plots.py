"""The search's plots, logged to its parent run: each trial's held-out metric along its training
steps, the space in parallel coordinates coloured by the metric, and (a sparsity sweep) the metric
against the trials' sparsity with their trainable-parameter counts."""

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


def _count(n: float) -> str:
    return f"{n / 1e6:.3g}M" if n >= 1e6 else f"{n / 1e3:.3g}k" if n >= 1e3 else f"{int(n)}"


def metric_vs_sparsity(trials: list[dict], metric: str):
    """Held-out metric against the sparsity the search varied (the base's measured Wanda sparsity, else
    the adapter's), with the trials' trainable-parameter counts: one line per count when trials share
    one (e.g. a Wanda ratio x rank grid), else one line with each point labelled by its count (a SpaRTA
    sweep, where the count follows the sparsity). None when no sparsity varies across the trials."""
    from matplotlib.ticker import FuncFormatter, NullLocator

    from tune.sparsity import BASE_SPARSITY, SPARSITY_METRICS

    scored = [row for row in trials if metric in row["metrics"] and row["status"] != "failed"]
    key = next((k for k in SPARSITY_METRICS if len({row["metrics"].get(k) for row in scored} - {None}) > 1), None)
    if key is None:
        return None
    scored = sorted((row for row in scored if key in row["metrics"]), key=lambda row: row["metrics"][key])
    groups: dict = {}
    for row in scored:
        groups.setdefault(row["metrics"].get("trainable_params"), []).append(row)
    shared = len(groups) < len(scored)
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    series = sorted(groups.items(), key=lambda kv: kv[0] or 0) if shared else [(None, scored)]
    for i, (count, rows) in enumerate(series):
        xs = [row["metrics"][key] for row in rows]
        ys = [row["metrics"][metric] for row in rows]
        label = f"{_count(count)} trainable parameters" if shared and count is not None else None
        ax.plot(xs, ys, color=f"C{i}", lw=1, alpha=0.6)
        for x, y, row in zip(xs, ys, rows):
            done = row["status"] == "finished"
            ax.scatter([x], [y], color=f"C{i}", facecolors=None if done else "none", zorder=3, label=label)
            label = None
            if not shared and row["metrics"].get("trainable_params") is not None:
                ax.annotate(_count(row["metrics"]["trainable_params"]), (x, y), textcoords="offset points",
                            xytext=(4, 4), fontsize=7)
    xs = sorted({row["metrics"][key] for row in scored})
    if 0 < xs[0] and xs[-1] < 1 and xs[-1] > 0.95:
        ax.set_xscale("logit")  # levels such as 0.99 .. 0.9995 (SpaRTA) spread out
        ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xticks(xs)
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.4g}"))
    ax.set_xlabel("base sparsity (Wanda, measured)" if key == BASE_SPARSITY
                  else "adapter sparsity (share of all weights left untrained)")
    ax.set_ylabel(metric.replace("held_out_", "held-out "))
    ax.grid(alpha=0.3)
    if shared:
        ax.legend(fontsize=7, loc="best")
    hollow = "; hollow: stopped early" if any(row["status"] != "finished" for row in scored) else ""
    ax.set_title(f"held-out metric vs sparsity ({'lines' if shared else 'labels'}: trainable parameters{hollow})",
                 fontsize=9)
    fig.tight_layout()
    return fig
