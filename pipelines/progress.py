"""A training run's progress in the terminal while Ray Train runs: a bar fed by the run's progress
board (`workers/progress.py`, posted by rank 0 at every `train.log_every` steps) with steps of total,
the training loss, examples per second and the time left at the rate the workers train."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

from rich.console import Console


def describe(state: dict) -> dict:
    """The bar's fields from the board's latest post: steps done and total, loss, throughput, ETA."""
    step, total = state.get("step"), state.get("total_steps")
    out = {"completed": step or 0, "total": total, "loss": "-", "rate": "-", "eta": "-"}
    if state.get("loss") is not None:
        out["loss"] = f"{state['loss']:.4f}"
    if state.get("examples_per_s") is not None:
        out["rate"] = f"{state['examples_per_s']:.1f}"
    done = (step or 0) - state.get("start_step", 0)
    took = state.get("posted_at", 0) - state.get("started_at", 0)
    if total and step is not None and done > 0 and took > 0:
        left = (total - step) * took / done
        out["eta"] = f"{int(left // 60)}:{int(left % 60):02d}"
    return out


@contextlib.contextmanager
def training_progress(console: Console, label: str, every_s: float = 0.5) -> Iterator[object]:
    """Print `label`, then show the bar while the body trains (80 columns wide is enough); yields the
    board to hand to `launch_training(progress=...)`."""
    import ray
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from workers.progress import board as new_board

    board = new_board()
    console.print(label)
    bar = Progress(TextColumn("{task.description}"), BarColumn(bar_width=16), MofNCompleteColumn(),
                   TextColumn("steps  loss {task.fields[loss]}  {task.fields[rate]} ex/s"), TimeElapsedColumn(),
                   TextColumn("ETA {task.fields[eta]}"), console=console, refresh_per_second=4, transient=False)
    task = bar.add_task("starting", total=None, loss="-", rate="-", eta="-")
    stop = threading.Event()

    def refresh() -> None:
        try:
            state = ray.get(board.read.remote(), timeout=10)
        except (ray.exceptions.RayError, TimeoutError):
            return
        if state.get("posts"):
            fields = describe(state)
            bar.update(task, description="training", **fields)

    def poll() -> None:
        while not stop.wait(every_s):
            refresh()

    thread = threading.Thread(target=poll, name="training-progress", daemon=True)
    with bar:
        thread.start()
        try:
            yield board
        finally:
            stop.set()
            thread.join(timeout=15)
            refresh()
            ray.kill(board)
