"""Faults injected from outside production code (test tooling only).

`worker_setup` is the `worker_process_setup_hook` the test session gives Ray: in every Ray worker
process it wraps `ray.train.report`. When the plan file named by `$ADAPTERFLOW_TEST_FAULT_PLAN`
holds a plan `{"step", "rank", "delay_s", "marker"}` and this process is that rank reporting that
step, it writes the marker, waits `delay_s` (the controller registers the checkpoint meanwhile) and
SIGKILLs its own process, as an out-of-memory kill or a lost node would.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

PLAN_ENV = "ADAPTERFLOW_TEST_FAULT_PLAN"


def worker_setup() -> None:
    plan_file = os.environ.get(PLAN_ENV)
    if not plan_file:
        return
    import ray.train

    real = ray.train.report

    def report(metrics, *args, **kwargs):
        out = real(metrics, *args, **kwargs)
        try:
            plan = json.loads(Path(plan_file).read_text())
        except (OSError, ValueError):
            return out
        marker = Path(plan["marker"])
        rank = ray.train.get_context().get_world_rank()
        if metrics.get("step") == plan["step"] and rank == plan["rank"] and not marker.exists():
            marker.write_text(f"killed rank {rank} after step {plan['step']}\n")
            time.sleep(float(plan.get("delay_s", 0)))
            os.kill(os.getpid(), signal.SIGKILL)
        return out

    ray.train.report = report


def plan_kill(plan_file: str | Path, *, step: int, rank: int, marker: str | Path, delay_s: float = 5.0) -> None:
    Path(plan_file).write_text(json.dumps({"step": step, "rank": rank, "marker": str(marker), "delay_s": delay_s}))


def clear(plan_file: str | Path) -> None:
    Path(plan_file).unlink(missing_ok=True)
