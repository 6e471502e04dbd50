"""Start-up benchmark (issue 10, "trials that start fast"): where the wall of a short run goes.

(a) `adapterflow train pipelines/examples/stories_instruct.yaml` (LoRA r=8 on q/v, global batch 8,
    2 Ray Train workers, ZeRO-2, --no-register), run as a new user runs it: a fresh `adapterflow`
    process. Cold: no Ray running (the CLI starts an embedded instance and stops it). Warm: after
    `adapterflow up` (a persistent local Ray head with a pool of warm worker processes). Figures: wall,
    training-loop seconds (the loop's own `train_seconds`), their ratio (goal <= 2.0 warm), and the
    breakdown from the run's timeline (driver marks and each rank's marks, `workers.timeline`).
(b) a 16-trial search of single-process trials (pipelines/examples/tune_hpo.yaml with
    tune.num_samples=16): per-trial overhead = trial wall (its MLflow child run, opened when Tune starts
    the trial and closed when it ends, both by the driver) - its training and evaluation seconds (what
    the trial reports), median over the trials (goal <= 3 s), and the search's wall.

The machine is shared: ratios are within one run; cold and warm runs are interleaved.

    python benchmarks/startup.py [--part a|b|all] [--rounds 2] [--trials 16]

Prints one JSON line per figure.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from workers.common import quiet_environment  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing from a hub at run time
quiet_environment()

COMMAND = ["train", "pipelines/examples/stories_instruct.yaml", "--set", "adapter.r=8", "--set", "adapter.alpha=16",
           "--set", "adapter.target_modules=[q_proj,v_proj]", "--set", "train.global_batch_size=8",
           "--set", "train.lr=1e-3", "--set", "data.max_length=256", "--no-register"]


def _cli(*args: str, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    proc = subprocess.run([sys.executable, "-m", "pipelines.cli", *args], cwd=ROOT, env=full_env,
                          capture_output=True, text=True)
    if check and proc.returncode:
        sys.exit(f"adapterflow {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def breakdown(summary: dict, t_start: float, t_end: float) -> dict:
    """Seconds per phase: the driver's marks, rank 0's marks inside the `fit` phase, the exit."""
    from workers.timeline import phases

    driver = [("launched", t_start), *[(n, t) for n, t in summary["timeline"]["driver"]]]
    out = {"driver": phases(driver)}
    out["driver"]["exit"] = round(t_end - driver[-1][1], 3)
    workers = summary["timeline"]["workers"]
    rank0 = workers.get("0") or workers.get(0)
    if rank0:
        marks = [tuple(m) for m in rank0["marks"]]
        fit_start = dict(driver).get("trainer_built")
        started = dict(marks).get("process_start")
        if fit_start and started is not None and started < fit_start:  # a warm worker: it predates the run
            out["rank0_process_started_before_run_s"] = round(fit_start - started, 1)
            marks = [m for m in marks if m[0] != "process_start"]
        if fit_start:  # from the driver's launch to the worker process's creation (or its first mark)
            marks = [("trainer_built", fit_start), *marks]
        out["rank0"] = phases(marks)
        out["rank0_preloaded"] = rank0.get("preloaded")
        fit_end = dict(driver).get("fit")
        if fit_end:
            out["rank0"]["to_fit_end"] = round(fit_end - marks[-1][1], 3)
    return out


def train_once(label: str, workspace: Path) -> dict:
    out = workspace / f"{label}-{time.time_ns()}.json"
    args = [*COMMAND, "--set", f"workspace={workspace}", "--json", str(out)]
    t0 = time.time()
    _cli(*args)
    t1 = time.time()
    summary = json.loads(out.read_text())
    m = summary["train_metrics"]
    train, reports = float(m["train_seconds"]), float(m.get("report_seconds", 0.0))
    loop = train + reports  # the loop's wall, as the issue measured it on main (its reports' waits included)
    wall = t1 - t0
    return {"figure": f"a_{label}", "wall_s": round(wall, 2), "train_loop_s": round(loop, 2),
            "ratio": round(wall / loop, 3), "report_wait_s": round(reports, 2),
            "ratio_without_report_waits": round(wall / train, 3), "breakdown": breakdown(summary, t0, t1)}


def part_a(rounds: int) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory(prefix="af-startup-") as tmp:
        ws = Path(tmp)
        status = _cli("status", check=False)
        if status.returncode == 0:
            sys.exit("a warm Ray head is already running (adapterflow status): stop it (adapterflow down) so the cold "
                     "runs are cold")
        for r in range(rounds):
            rows.append(train_once("cold", ws))
            _emit(rows[-1], r)
            t0 = time.time()
            _cli("up")
            up_s = time.time() - t0
            try:
                first = train_once("warm_first", ws)  # the first run after `up` (the pool may still be warming)
                first["up_s"] = round(up_s, 2)
                rows.append(first)
                _emit(first, r)
                rows.append(train_once("warm", ws))
                _emit(rows[-1], r)
            finally:
                _cli("down")
    return rows


def _emit(row: dict, round_: int | None = None) -> None:
    if round_ is not None:
        row = {**row, "round": round_ + 1}
    print(json.dumps(row), flush=True)


def part_b(trials: int) -> dict:
    import mlflow
    from rich.console import Console

    from pipelines.search import run_search
    from pipelines.spec import load_spec_dict, parse_spec

    with tempfile.TemporaryDirectory(prefix="af-startup-tune-") as tmp:
        data = load_spec_dict(ROOT / "pipelines/examples/tune_hpo.yaml",
                              [f"tune.num_samples={trials}", f"workspace={tmp}", "tune.register_winner=false"])
        data["data"]["path"] = str(ROOT / data["data"]["path"])
        spec = parse_spec(data)
        t0 = time.time()
        res = run_search(spec, data, Console(file=open(os.devnull, "w")))
        wall = time.time() - t0
        client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{spec.workspace_path() / 'mlflow.db'}")
        exp = client.get_experiment_by_name(spec.track.experiment)
        children = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{res.run_id}'")
        tune_time = {str(t["trial"]): t["metrics"].get("time_total_s") for t in res.trials}
        per_trial = []
        for run in sorted(children, key=lambda r: r.info.start_time):
            m = run.data.metrics
            trial = run.data.tags.get("adapterflow.trial_id", "")
            trial_wall = (run.info.end_time - run.info.start_time) / 1000  # the driver's view, Tune's callbacks
            # training excludes the time reports waited for Tune's driver (the loop measures it apart)
            busy = m.get("train_seconds", 0.0) + m.get("eval_seconds", 0.0)
            row = {"trial": trial, "wall_s": trial_wall, "train_s": m.get("train_seconds", 0.0),
                   "eval_s": m.get("eval_seconds", 0.0), "report_wait_s": m.get("report_seconds", 0.0),
                   "overhead_s": trial_wall - busy}
            row["overhead_if_report_waits_count_as_training_s"] = row["overhead_s"] - row["report_wait_s"]
            inside = tune_time.get(trial)
            if inside is not None:  # split: in the trial's process (setup, report waits) / around it (Tune)
                row["in_trainable_s"] = inside - busy
                row["around_trainable_s"] = trial_wall - inside
            per_trial.append(row)
    overheads = sorted(t["overhead_s"] for t in per_trial)
    later = per_trial[2:]  # the first trial of each of the (2) reused actors pays the process's imports
    return {"figure": "b_search", "trials": len(per_trial), "counts": {k: v for k, v in res.counts.items() if k != "errors"},
            "search_wall_s": round(wall, 1),
            "overhead_median_s": round(statistics.median(overheads), 3),
            "overhead_if_report_waits_count_as_training_median_s": _median(per_trial,
                                                                           "overhead_if_report_waits_count_as_training_s"),
            "report_wait_median_s": _median(per_trial, "report_wait_s"),
            "overhead_min_max_s": [round(overheads[0], 3), round(overheads[-1], 3)],
            "first_two_trials_overhead_s": [round(t["overhead_s"], 2) for t in per_trial[:2]],
            "later_trials_in_trainable_median_s": _median(later, "in_trainable_s"),
            "later_trials_around_trainable_median_s": _median(later, "around_trainable_s"),
            "trial_wall_median_s": round(statistics.median(t["wall_s"] for t in per_trial), 3),
            "train_plus_eval_median_s": round(statistics.median(t["train_s"] + t["eval_s"] for t in per_trial), 3),
            "per_trial": [{k: round(v, 3) if isinstance(v, float) else v for k, v in t.items()} for t in per_trial]}


def _median(rows: list[dict], key: str) -> float | None:
    values = [r[key] for r in rows if key in r]
    return round(statistics.median(values), 3) if values else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--part", choices=["a", "b", "all"], default="all")
    ap.add_argument("--rounds", type=int, default=2, help="(a) cold/warm rounds, interleaved")
    ap.add_argument("--trials", type=int, default=16, help="(b) trials in the search")
    args = ap.parse_args()
    if args.part in ("a", "all"):
        rows = part_a(args.rounds)
        cold = [r for r in rows if r["figure"] == "a_cold"]
        warm = [r for r in rows if r["figure"] == "a_warm"]
        print(json.dumps({"figure": "a_summary", "goal": "warm wall / training-loop s <= 2.0",
                          "cold_ratio_median": statistics.median(r["ratio"] for r in cold),
                          "warm_ratio_median": statistics.median(r["ratio"] for r in warm),
                          "cold_wall_median_s": statistics.median(r["wall_s"] for r in cold),
                          "warm_wall_median_s": statistics.median(r["wall_s"] for r in warm),
                          "met": statistics.median(r["ratio"] for r in warm) <= 2.0}), flush=True)
    if args.part in ("b", "all"):
        row = part_b(args.trials)
        row["goal"] = "median per-trial overhead <= 3 s"
        row["met"] = row["overhead_median_s"] <= 3.0
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
