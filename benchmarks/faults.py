"""Training under worker kills: the demo spec (MiniLM LoRA) on 2 Ray Train workers with ZeRO-2, run
once uninterrupted, then again with one Ray Train worker process SIGKILLed from outside at a seeded
random moment after the first checkpoint was registered (rank and time drawn per run; some land in
a checkpoint save, most between checkpoints). A run survives when it finishes the planned steps
with the uninterrupted run's final adapter (every tensor within 1e-5) and loss history. One JSON
line per run, then a summary. Goal (issue 11): all survived.

    .venv/bin/python benchmarks/faults.py [--kills 4] [--steps 40] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import tempfile
import threading
import time
from pathlib import Path

from serving_load import ROOT  # sets up the path and the quiet environment


def worker_pids() -> dict[int, int]:
    """pid -> its position among the live Ray Train worker processes (sorted by pid; not a rank)."""
    import psutil

    pids = sorted(p.info["pid"] for p in psutil.process_iter(["pid", "cmdline"])
                  if "RayTrainWorker" in " ".join(p.info["cmdline"] or []))
    return {pid: i for i, pid in enumerate(pids)}


def registered(results: Path) -> int:
    for snap in results.glob("*/checkpoint_manager_snapshot.json"):
        try:
            return int(json.loads(snap.read_text())["latest_checkpoint_result"]["metrics"]["step"])
        except (ValueError, KeyError, TypeError):
            return 0
    return 0


def killer(results: Path, delay_s: float, which: int, events: dict) -> None:
    deadline = time.monotonic() + 900
    while registered(results) < 1:
        if time.monotonic() > deadline or events.get("done"):
            return
        time.sleep(0.05)
    time.sleep(delay_s)
    pids = sorted(worker_pids())
    if events.get("done") or not pids:
        return
    victim = pids[which % len(pids)]
    os.kill(victim, signal.SIGKILL)
    events.update(killed=victim, at_step_registered=registered(results), after_s=delay_s)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kills", type=int, default=4)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    import torch
    from safetensors.torch import load_file

    from pipelines.spec import load_spec
    from workers.stages import ensure_ray, launch_training

    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory() as t:
        def spec_for(i: int):
            return load_spec(ROOT / "pipelines" / "examples" / "demo.yaml",
                             [f"workspace={Path(t) / f'ws{i}'}", "train.num_workers=2", "train.zero_stage=2",
                              f"train.max_steps={args.steps}", "train.checkpoint_every=8", "train.max_failures=1"])

        ref_spec = spec_for(0)
        ensure_ray(ref_spec)
        t0 = time.perf_counter()
        ref = launch_training(ref_spec, run_name="reference")
        ref_wall = time.perf_counter() - t0
        ref_w = load_file(str(ref.checkpoint / "adapter" / "adapter_model.safetensors"))
        ref_losses = [h["loss"] for h in ref.history]
        survived = landed = 0
        for i in range(1, args.kills + 1):
            spec = spec_for(i)
            events: dict = {}
            # within the first 70 % of the loop's length after its first checkpoint, so the kill lands
            delay = round(rng.uniform(0.0, 0.7 * ref.metrics.get("train_seconds", 10.0)), 2)
            which = rng.randrange(2)
            th = threading.Thread(target=killer, args=(spec.workspace_path() / "ray_results", delay, which, events),
                                  daemon=True)
            th.start()
            t0 = time.perf_counter()
            row = {"figure": "training faults", "run": i, "kill_after_first_checkpoint_s": delay}
            try:
                out = launch_training(spec, run_name=f"kill-{i}")
                w = load_file(str(out.checkpoint / "adapter" / "adapter_model.safetensors"))
                same = w.keys() == ref_w.keys() and all(torch.allclose(w[k], ref_w[k], atol=1e-5) for k in w)
                same_losses = len(out.history) == len(ref_losses) and all(
                    abs(a["loss"] - b) <= 1e-5 for a, b in zip(out.history, ref_losses))
                ok = bool(events.get("killed")) and same and same_losses and out.metrics["step"] == args.steps
                row.update(killed=bool(events.get("killed")), resumed_from_step=out.metrics.get("resumed_from_step"),
                           steps=out.metrics["step"], same_adapter=same, same_losses=same_losses,
                           wall_s=round(time.perf_counter() - t0, 1), reference_wall_s=round(ref_wall, 1))
            except Exception as e:  # noqa: BLE001 - a run that did not survive is a figure, not a crash
                ok = False
                row.update(killed=bool(events.get("killed")), error=f"{type(e).__name__}: {e}"[:300])
            finally:
                events["done"] = True
                th.join(30)
            landed += bool(events.get("killed"))
            survived += ok
            row["survived"] = ok if events.get("killed") else None  # a run that ended before its kill counts for none
            print(json.dumps(row), flush=True)
        print(json.dumps({"figure": "training faults summary", "runs": args.kills, "kills_landed": landed,
                          "survived": survived, "goal_all_survived": landed > 0 and survived == landed}), flush=True)


if __name__ == "__main__":
    main()
