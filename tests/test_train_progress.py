"""Training progress in the terminal: rank 0 posts step of total, loss and throughput to the run's
progress board (a Ray actor) at every train.log_every steps, and the driver's bar shows them with the
time left while the run trains, not only a spinner."""

import io
import re
import time

import pytest

from helpers import spec_for


def test_the_bar_follows_the_workers_steps_loss_throughput_and_eta(tiny_llama, toy_data, tmp_path, ray_session):
    from rich.console import Console

    from pipelines.progress import training_progress
    from workers.stages import launch_training

    spec = spec_for(tiny_llama, toy_data, tmp_path, epochs=2, log_every=2)  # local mode: 2 epochs of 16 steps
    console = Console(file=io.StringIO(), force_terminal=True, width=200, record=True)
    with training_progress(console, "training lora", every_s=0.05) as board:
        out = launch_training(spec, run_name="progress", progress=board)
        state = ray_session.get(board.read.remote())
    total = out.metrics["total_steps"]
    assert state["step"] == state["total_steps"] == total == 32
    assert state["posts"] == 1 + total // 2  # the start, then every log_every steps
    assert state["loss"] == pytest.approx(out.history[-1]["loss"]) and state["examples_per_s"] > 0

    text = console.export_text()
    shown = [(int(a), int(b)) for a, b in re.findall(r"(\d+)/(\d+) steps", text)]
    assert shown[-1] == (total, total), shown
    assert f"loss {out.history[-1]['loss']:.4f}" in text and " ex/s" in text and "ETA 0:00" in text, text[-800:]
    # the board is gone with the run (ray.kill is asynchronous: a call made just after it may still be served)
    deadline = time.monotonic() + 60
    with pytest.raises(ray_session.exceptions.RayActorError):
        while time.monotonic() < deadline:
            ray_session.get(board.read.remote(), timeout=30)
            time.sleep(0.2)


def test_eta_is_the_time_left_at_the_rate_the_workers_trained():
    from pipelines.progress import describe

    state = {"step": 30, "total_steps": 130, "start_step": 10, "started_at": 100.0, "posted_at": 140.0,
             "loss": 0.51234, "examples_per_s": 12.345}
    fields = describe(state)  # 20 steps in 40 s, 100 left: 200 s
    assert fields == {"completed": 30, "total": 130, "loss": "0.5123", "rate": "12.3", "eta": "3:20"}
    assert describe({"step": 0, "total_steps": 10})["eta"] == "-"


def test_the_bar_redraws_as_posts_arrive(ray_session):
    """The driver's side alone, posts made by hand: the bar shows each one while the body still runs."""
    import time

    from rich.console import Console

    from pipelines.progress import training_progress

    console = Console(file=io.StringIO(), force_terminal=True, width=200, record=True)

    def shows(fragment: str) -> bool:
        deadline = time.monotonic() + 30
        while fragment not in console.export_text(clear=False):
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True

    with training_progress(console, "training", every_s=0.05) as board:
        assert shows("starting")
        now = time.time()
        board.post.remote({"step": 0, "total_steps": 10, "start_step": 0, "started_at": now})
        board.post.remote({"step": 4, "loss": 0.75, "examples_per_s": 8.0, "epoch": 0.4, "posted_at": now + 8})
        assert shows("4/10 steps  loss 0.7500  8.0 ex/s")
        assert shows("ETA 0:12")  # 4 steps in 8 s, 6 left
