"""`adapterflow run` end to end on a real 2-worker Ray Train job with DeepSpeed ZeRO-2, MLflow on
SQLite with its registry, and Ray Serve; workers SIGKILLed from outside mid-run (one during a checkpoint
save); an alias that must not move."""

import json
import os
import signal
import threading
import time

import mlflow
import pytest
import torch
import yaml
from mlflow import MlflowClient
from rich.console import Console
from safetensors.torch import load_file
from typer.testing import CliRunner

from pipelines.cli import app
from pipelines.run import train_and_register
from pipelines.spec import load_spec
from workers.store import resolve

pytestmark = pytest.mark.slow

SAMPLES = ["good great movie", "bad awful plot", "the film was fun and lovely", "a dull boring story"]


@pytest.fixture(scope="module")
def e2e(tiny_llama, toy_data, tmp_path_factory, ray_session, serve_port):
    tmp = tmp_path_factory.mktemp("e2e")
    spec = {
        "name": "toy-sentiment",
        "workspace": str(tmp / "ws"),
        "model": {"name": str(tiny_llama), "task": "seq-cls", "id2label": {0: "negative", 1: "positive"}},
        "data": {"path": str(toy_data), "max_length": 32, "batching": "length_grouped", "group_window": 4},
        "adapter": {"method": "lora", "r": 4, "alpha": 8, "dropout": 0.1, "target_modules": ["q_proj", "v_proj"]},
        "train": {"num_workers": 2, "zero_stage": 2, "global_batch_size": 16, "lr": 2e-2, "max_steps": 32,
                  "epochs": 2, "checkpoint_every": 8, "log_every": 2, "max_failures": 1, "seed": 5},
        "track": {"experiment": "e2e"},
        "serve": {"port": serve_port, "num_cpus": 0.5, "samples": SAMPLES},
    }
    path = tmp / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    out = tmp / "summary.json"
    result = CliRunner().invoke(app, ["run", str(path), "--json", str(out)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    summary = json.loads(out.read_text())
    s = load_spec(path)
    mlflow.set_tracking_uri(f"sqlite:///{s.workspace_path() / 'mlflow.db'}")
    mlflow.set_registry_uri(f"sqlite:///{s.workspace_path() / 'mlflow.db'}")
    return {"spec_path": path, "spec": s, "summary": summary, "output": result.output, "tmp": tmp}


def _history(run_id):
    return json.loads(open(mlflow.artifacts.download_artifacts(f"runs:/{run_id}/train_history.json")).read())["history"]


def test_run_trains_evaluates_registers_and_serves(e2e):
    summary, out = e2e["summary"], e2e["output"]
    assert summary["train_metrics"]["step"] == 32
    assert summary["report"]["n"] == 64 and summary["report"]["accuracy"] > 0.7, summary["report"]
    reg = summary["registration"]
    assert (reg["version"], reg["moved"], reg["alias"]) == ("1", True, "champion")
    assert "mlflow ui --backend-store-uri" in out and "sample requests" in out
    assert len(summary["samples"]) == len(SAMPLES)
    for s in summary["samples"]:
        assert set(s["probabilities"]) == {"negative", "positive"}
        assert sum(s["probabilities"].values()) == pytest.approx(1, abs=1e-5)
        assert s["label"] == max(s["probabilities"], key=s["probabilities"].get)

    client = MlflowClient()
    run = client.get_run(summary["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["train.zero_stage"] == "2" and run.data.params["adapter.r"] == "4"
    assert run.data.metrics["accuracy"] == pytest.approx(summary["report"]["accuracy"])
    losses = client.get_metric_history(run.info.run_id, "train/loss")
    assert sorted(m.step for m in losses) == list(range(1, 33))  # every step, sent in batches by rank 0
    files = {f.path for f in client.list_artifacts(run.info.run_id)}
    assert {"evaluation.json", "loss_curve.png", "spec.yaml", "train_history.json"} <= files
    png = mlflow.artifacts.download_artifacts(f"runs:/{run.info.run_id}/loss_curve.png")
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert [h["step"] for h in _history(run.info.run_id)] == list(range(1, 33))
    mv = client.get_model_version_by_alias("toy-sentiment", "champion")
    assert str(mv.version) == "1" and mv.run_id == run.info.run_id


def test_pyfunc_model_predicts_like_the_deployment(e2e):
    model = mlflow.pyfunc.load_model("models:/toy-sentiment@champion")
    df = model.predict(SAMPLES)
    for (_, row), served in zip(df.iterrows(), e2e["summary"]["samples"]):
        assert row["label"] == served["label"]
        assert row["prob_positive"] == pytest.approx(served["probabilities"]["positive"], abs=1e-5)


def _wait_for_pid(marker, deadline, events) -> int | None:
    while not marker.exists() or not marker.read_text():
        if time.monotonic() > deadline or events.get("done"):
            return None
        time.sleep(0.05)
    return int(marker.read_text())


def _registered_step(results, since: float) -> int:
    """The newest checkpoint step Ray Train has registered for the run started after `since`."""
    for run in sorted(results.glob("*/checkpoint_manager_snapshot.json")):
        if run.stat().st_mtime > since:
            try:
                return int(json.loads(run.read_text())["latest_checkpoint_result"]["metrics"]["step"])
            except (ValueError, KeyError, TypeError):
                return 0
    return 0


def _kill_twice(held, paused, results, events: dict) -> None:
    """From outside the job: SIGKILL rank 1 while it saves the step-16 checkpoint (once Ray Train has
    registered step 8's); then, once it has registered the restarted group's step-24 checkpoint,
    rank 0 in the loop after it."""
    start, deadline = time.time(), time.monotonic() + 600
    pid = _wait_for_pid(held, deadline, events)
    if pid is None:
        return
    while _registered_step(results, start) < 8:  # Ray Train registers reports every few seconds
        if time.monotonic() > deadline or events.get("done"):
            return
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    events["killed_saving"] = pid
    pid = _wait_for_pid(paused, deadline, events)
    if pid is None:
        return
    while _registered_step(results, start) < 24:
        if time.monotonic() > deadline or events.get("done"):
            return
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    events["killed_training"] = pid


def test_workers_killed_from_outside_resume_and_match_the_uninterrupted_run(e2e, fault_plan):
    """Two SIGKILLs sent by the test to Ray Train worker processes: one while rank 1 saves a checkpoint
    (after DeepSpeed wrote its files, before the checkpoint was complete: it must not be used), one
    while rank 0 trains between checkpoints. The run resumes each time from its last complete
    checkpoint and ends where the uninterrupted run did."""
    from faults import reports, write_plan

    spec, data = e2e["spec"].model_copy(deep=True), yaml.safe_load(e2e["spec_path"].read_text())
    spec.train.max_failures = 2
    watch, held, paused = (e2e["tmp"] / n for n in ("reports.txt", "held-save", "paused"))
    write_plan(fault_plan, watch=watch, hold_save={"step": 16, "rank": 1, "marker": str(held), "hold_s": 300},
               pause_after={"step": 24, "rank": 0, "marker": str(paused), "seconds": 300})
    events: dict = {}
    killer = threading.Thread(target=_kill_twice, args=(held, paused, spec.workspace_path() / "ray_results", events),
                              daemon=True)
    killer.start()
    try:
        res = train_and_register(spec, data, Console(quiet=True))
    finally:
        events["done"] = True
        killer.join(30)
    assert "killed_saving" in events and "killed_training" in events, events
    # the held step-16 checkpoint was never complete: the first restart went back to step 8; the
    # second to the step-24 checkpoint registered before the kill
    seen = reports(watch)
    first_group = {pid for _, _, pid in seen[:2]}
    after = [step for _, step, pid in seen if pid not in first_group]
    assert events["killed_saving"] in first_group and after[0] == 16, seen  # the restart went back to 8
    assert res.train_metrics["resumed_from_step"] == 24

    full = _history(e2e["summary"]["run_id"])
    assert [h["step"] for h in res.history] == list(range(1, 33))
    for a, b in zip(full, res.history):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5), (a, b)
    first, manifest = resolve("models:/toy-sentiment/1")  # the adapter store, checksums verified
    assert manifest["method"] == "lora" and manifest["base_model"]["sha256"]
    wa = load_file(str(first / "adapter_model.safetensors"))
    wb = load_file(str(res.adapter_dir / "adapter_model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.allclose(wa[k], wb[k], atol=1e-5), k
    # same quality as version 1: "at least as good" moves the alias
    assert res.registration.version == "2" and res.registration.moved
    assert str(MlflowClient().get_model_version_by_alias("toy-sentiment", "champion").version) == "2"


def test_alias_does_not_move_to_a_worse_version(e2e):
    spec = e2e["spec"].model_copy(deep=True)
    spec.train.num_workers = 0
    spec.train.max_steps = 1
    spec.train.lr = 1e-7
    data = yaml.safe_load(e2e["spec_path"].read_text())
    holder = MlflowClient().get_model_version_by_alias("toy-sentiment", "champion")
    held = float(holder.tags["accuracy"])
    res = train_and_register(spec, data, Console(quiet=True))
    reg = res.registration
    assert res.report["accuracy"] < held, "the barely trained adapter should be worse"
    assert reg.version == "3" and not reg.moved and "stays on" in reg.reason
    assert MlflowClient().get_model_version_by_alias("toy-sentiment", "champion").version == holder.version
