"""Learning-rate sweep on a held-out slice of the TRAINING split (never the evaluation set).

For each learning rate: train the spec with `data.eval_split: null` and `data.eval_fraction`
(a seeded slice of train held out), evaluate on that slice, print one JSON line.

    python benchmarks/lr_sweep.py pipelines/examples/sparta.yaml --lr 1e-3 3e-3 1e-2 [--set k=v ...]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from workers.common import quiet_environment  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing from a hub at run time
quiet_environment()


def sweep(spec, lrs: list[float], holdout: float = 0.25, workspace: Path | None = None) -> list[dict]:
    """Train and evaluate `spec` at each learning rate on a held-out slice of its training split."""
    from workers.stages import build_artifact, ensure_ray, evaluate_artifact, launch_training

    ensure_ray(spec)
    rows = []
    for lr in lrs:
        tmp = Path(tempfile.mkdtemp(prefix="af-sweep-", dir=workspace))
        s = spec.model_copy(deep=True)
        s.data.eval_split = None
        s.data.eval_fraction = holdout
        s.train.lr = lr
        s.workspace = str(tmp)
        t0 = time.perf_counter()
        out = launch_training(s, run_name=f"sweep-{spec.adapter.method}-{lr:g}")
        report = evaluate_artifact(s, build_artifact(s, out.checkpoint, tmp / "adapter"))
        row = {"sweep": spec.name, "method": spec.adapter.method, "lr": lr, "held_out": report["n"],
               "seconds": round(time.perf_counter() - t0, 1)}
        row.update({k: round(report[k], 4) for k in ("accuracy", "balanced_accuracy", "mcc", "eval_loss")
                    if k in report})
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def main(argv=None) -> None:
    from pipelines.spec import load_spec

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("spec")
    ap.add_argument("--lr", type=float, nargs="+", required=True)
    ap.add_argument("--holdout", type=float, default=0.25)
    ap.add_argument("--set", action="append", default=[], dest="overrides")
    args = ap.parse_args(argv)
    spec = load_spec(args.spec, args.overrides).with_absolute_paths()
    sweep(spec, args.lr, args.holdout)


if __name__ == "__main__":
    main()
