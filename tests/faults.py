"""Fault tooling for the Ray workers of a test run (test tooling only; production code knows nothing
of it).

`worker_setup` is the `worker_process_setup_hook` the test session gives Ray. It wraps
`ray.train.report` in every Ray worker process; when the plan file named by
`$ADAPTERFLOW_TEST_FAULT_PLAN` holds a plan, a Ray Train rank follows it:

- `"watch": FILE`: each report appends `rank step pid` to FILE, so a test outside sees which
  process is which rank and how far it is, and can SIGKILL it itself;
- `"hold_save": {"step", "rank", "marker", "hold_s"}`: that rank, saving that step's checkpoint,
  stops after DeepSpeed has written its files and before the checkpoint is complete (its RNG state,
  the report), writes its pid to `marker` and waits `hold_s`: the window in which a test kills it
  during a checkpoint save. (The hook makes the window long enough to hit; the kill comes from the
  test.)
- `"pause_after": {"step", "rank", "marker", "seconds"}`: that rank, back from reporting that step,
  writes its pid to `marker` and waits `seconds` before its next training step: a rank that is
  alive in the loop between checkpoints, for a test to kill once Ray has registered the checkpoint.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

PLAN_ENV = "ADAPTERFLOW_TEST_FAULT_PLAN"


def _plan(plan_file: str) -> dict:
    try:
        return json.loads(Path(plan_file).read_text())
    except (OSError, ValueError):
        return {}


def _rank() -> int:
    import ray.train

    return ray.train.get_context().get_world_rank()


def _hold_saves(plan_file: str) -> None:
    """Wrap DeepSpeed's save_checkpoint once in this process (DeepSpeed is imported by the first report)."""
    import sys

    engine = sys.modules.get("deepspeed.runtime.engine")
    if engine is None or getattr(engine.DeepSpeedEngine.save_checkpoint, "_fault_hold", False):
        return
    real_save = engine.DeepSpeedEngine.save_checkpoint

    def save_checkpoint(self, save_dir, tag=None, client_state=None, *args, **kwargs):
        out = real_save(self, save_dir, tag, client_state or {}, *args, **kwargs)
        hold = _plan(plan_file).get("hold_save")
        if hold and (client_state or {}).get("step") == hold["step"] and _rank() == hold["rank"]:
            marker = Path(hold["marker"])
            if not marker.exists():
                marker.write_text(str(os.getpid()))
                time.sleep(float(hold.get("hold_s", 60)))
        return out

    save_checkpoint._fault_hold = True
    engine.DeepSpeedEngine.save_checkpoint = save_checkpoint


def worker_setup() -> None:
    plan_file = os.environ.get(PLAN_ENV)
    if not plan_file:
        return
    import ray.train

    real = ray.train.report

    def report(metrics, *args, **kwargs):
        _hold_saves(plan_file)
        out = real(metrics, *args, **kwargs)
        plan = _plan(plan_file)
        if plan.get("watch"):
            with open(plan["watch"], "a") as f:
                f.write(f"{_rank()} {metrics.get('step')} {os.getpid()}\n")
        pause = plan.get("pause_after")
        if pause and metrics.get("step") == pause["step"] and _rank() == pause["rank"]:
            marker = Path(pause["marker"])
            if not marker.exists():
                marker.write_text(str(os.getpid()))
                time.sleep(float(pause.get("seconds", 60)))
        return out

    ray.train.report = report


def write_plan(plan_file: str | Path, **plan) -> None:
    Path(plan_file).write_text(json.dumps({k: (str(v) if isinstance(v, Path) else v) for k, v in plan.items()}))


def reports(watch: str | Path) -> list[tuple[int, int, int]]:
    """(rank, step, pid) of every report so far, in order."""
    p = Path(watch)
    if not p.exists():
        return []
    return [tuple(int(x) for x in line.split()) for line in p.read_text().splitlines() if line.strip()]


def clear(plan_file: str | Path) -> None:
    Path(plan_file).unlink(missing_ok=True)
