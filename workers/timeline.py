"""Where a run's wall goes: named wall-clock marks, per process.

A mark is `(name, time.time())`, so the driver's and the workers' marks on one machine line up on one
axis. The driver keeps its marks in this module; a Train worker writes its own into the final
checkpoint (`timeline_rank<R>.json`) where the driver reads them. `phases` turns a list of marks into
the seconds between consecutive ones. Marking costs a list append: it is always on.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

_MARKS: list[tuple[str, float]] = []
FILE = "timeline_rank{rank}.json"
HEAVY_MODULES = ("torch", "transformers", "peft", "deepspeed", "mlflow", "ray")


def process_started() -> float | None:
    """When this process was created (wall clock), or None where that cannot be read."""
    try:
        import psutil

        return float(psutil.Process().create_time())
    except Exception:  # noqa: BLE001 - psutil is optional: the first mark is then the origin
        return None


def mark(name: str, into: list | None = None) -> float:
    now = time.time()
    (_MARKS if into is None else into).append((name, now))
    return now


def marks() -> list[tuple[str, float]]:
    return list(_MARKS)


def reset() -> None:
    _MARKS.clear()


def start_process_timeline(into: list | None = None) -> list:
    """Begin a timeline with this process's creation time (when it can be read)."""
    target = _MARKS if into is None else into
    started = process_started()
    if started is not None and not any(n == "process_start" for n, _ in target):
        target.insert(0, ("process_start", started))
    return target


def loaded_heavy_modules() -> list[str]:
    """Which of the heavy libraries this process has already imported."""
    return [m for m in HEAVY_MODULES if m in sys.modules]


def phases(timeline: list[tuple[str, float]]) -> dict[str, float]:
    """Seconds from each mark to the next, named by the later mark (`a -> b` is named `b`)."""
    out: dict[str, float] = {}
    for (_, t0), (name, t1) in zip(timeline, timeline[1:]):
        out[name] = round(out.get(name, 0.0) + (t1 - t0), 3)
    return out


def write(directory: Path, rank: int, timeline: list, extra: dict | None = None) -> None:
    data = {"marks": [[n, t] for n, t in timeline], **(extra or {})}
    (Path(directory) / FILE.format(rank=rank)).write_text(json.dumps(data))


def read_all(directory: Path) -> dict[int, dict]:
    """Every rank's timeline a checkpoint holds, by rank."""
    out = {}
    for f in sorted(Path(directory).glob("timeline_rank*.json")):
        data = json.loads(f.read_text())
        data["marks"] = [tuple(m) for m in data["marks"]]
        out[int(f.stem.removeprefix("timeline_rank"))] = data
    return out
