"""The tracking server goes away while a run trains: a real `mlflow server` on loopback is SIGKILLed
and started again on the same store. Training never stops for it (rank 0's step metrics wait in a
sender thread, workers/metric_sender.py), nothing of the adapter is lost, and the run's metrics are
complete once the server is back; a server that stays away gives an error naming where the adapter
and the results it missed are.

MLflow's HTTP client retries a refused connection for about 4 minutes by itself
(MLFLOW_HTTP_REQUEST_MAX_RETRIES=7, backoff factor 2); these tests set it to 1 (a retry at once: a
connection kept alive to the killed server fails once) so that the platform's own retries are the ones
at work, and the outages can be short."""

from __future__ import annotations

import threading
import time

import httpx
import pytest
import yaml
from rich.console import Console

from helpers import read_store, spec_for
from mlflow_server import MlflowServer


@pytest.fixture
def no_client_retries(monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")


def _history(url: str, run_id: str, key: str) -> list[dict]:
    r = httpx.get(f"{url}/api/2.0/mlflow/metrics/get-history", params={"run_id": run_id, "metric_key": key,
                                                                       "max_results": 25000}, timeout=30)
    assert r.status_code == 200, r.text
    return r.json().get("metrics", [])


def _new_run(url: str) -> tuple[object, str]:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=url)
    exp = client.create_experiment(f"faults-{time.monotonic_ns()}")
    return client, client.create_run(exp).info.run_id


def _records(steps) -> list[dict]:
    return [{"step": s, "loss": 1.0 / s, "lr": 1e-3} for s in steps]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """One real `mlflow server` for the module: its tests kill it and start it again on the same store."""
    srv = MlflowServer(tmp_path_factory.mktemp("mlflow"))
    yield srv
    srv.kill()


def _up(server: MlflowServer) -> MlflowServer:
    return server if server.proc is not None else server.start()


def test_the_sender_never_blocks_keeps_what_an_absent_server_missed_and_sends_it_once(server, no_client_retries):
    from workers.metric_sender import MetricSender, send

    client, run_id = _new_run(_up(server).url)
    sender = MetricSender(client, run_id, min_pause_s=0.2, max_pause_s=1.0)
    sender.log(_records(range(1, 6)))
    deadline = time.monotonic() + 60
    while sender.sent < 10:
        assert time.monotonic() < deadline, sender.last_error
        time.sleep(0.05)

    server.kill()
    took = []
    for s in range(6, 16):  # the loop goes on: handing over a record costs nothing
        t = time.perf_counter()
        sender.log(_records([s]))
        took.append(time.perf_counter() - t)
        time.sleep(0.05)
    assert max(took) < 0.05, took
    deadline = time.monotonic() + 30
    while sender.failures < 2:
        assert time.monotonic() < deadline, "the sender did not try the absent server"
        time.sleep(0.05)
    assert sender.sent == 10 and len(sender.pending) == 20
    # the end of training comes while the server is away: close returns exactly what is unsent
    backlog = sender.close(1.0)
    assert sorted((k, s) for k, _, _, s in backlog) == sorted(
        (k, s) for s in range(6, 16) for k in ("train/loss", "train/lr"))
    assert all(v == pytest.approx(1.0 / s) for k, v, _, s in backlog if k == "train/loss")

    server.start()  # the same store: what it had survives
    sender._thread.join(60)  # the sender's own retries deliver what it held...
    assert not sender._thread.is_alive() and sender.pending == []
    send(client, run_id, backlog)  # ...and the driver sending the same again doubles nothing
    for key in ("train/loss", "train/lr"):
        steps = sorted(m["step"] for m in _history(server.url, run_id, key))
        assert steps == list(range(1, 16)), (key, steps)  # every step, each once


def _watch(server: MlflowServer, run_id_of, outage_s: float, events: dict):
    """Kill the server once the run's first step metric is in, start it again `outage_s` later."""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        run_id = run_id_of()
        if run_id and _history(server.url, run_id, "train/loss"):
            break
        time.sleep(0.05)
    else:
        events["error"] = "no step metric arrived"
        return
    events["killed_at"] = time.time()
    server.kill()
    if outage_s is None:
        return
    time.sleep(outage_s)
    events["back_at"] = time.time()
    server.start()


def _run_id_in(store, after_s: float):
    """The run a pipeline started in the server's store after `after_s` (read from its SQLite file)."""
    def find():
        row = read_store(store, lambda db: db.execute(
            "select run_uuid from runs where start_time > ? order by start_time desc",
            (int(after_s * 1000),)).fetchone())
        return row and row[0]
    return find


def _tracked_run(server: MlflowServer, spec, outage_s: float | None, flush_s: float):
    """The spec pointed at the server, and a watcher that kills the server once the run's first step
    metric is in (and starts it again `outage_s` later; None: never)."""
    _up(server)
    spec.track.tracking_uri = server.url
    spec.track.flush_timeout_s = flush_s
    events: dict = {}
    watcher = threading.Thread(target=_watch, args=(server, _run_id_in(server.root / "mlflow.db", time.time()),
                                                    outage_s, events))
    watcher.start()
    return events, watcher


@pytest.mark.ray
def test_training_rides_out_a_killed_tracking_server_and_its_run_is_complete(
        server, tiny_llama, toy_data, tmp_path, ray_session, no_client_retries):
    from mlflow import MlflowClient

    from pipelines.run import train_and_register
    from workers.store import resolve

    spec = spec_for(tiny_llama, toy_data, tmp_path, epochs=12, log_every=1, checkpoint_every=16)
    spec.name = "tracked"
    events, watcher = _tracked_run(server, spec, 3.0, 60)
    res = train_and_register(spec, yaml.safe_load(yaml.safe_dump(spec.model_dump(mode="json"))),
                             Console(quiet=True))
    watcher.join(120)
    assert "error" not in events and "back_at" in events, events
    total = res.train_metrics["total_steps"]
    assert total == 12 * 16 and res.train_metrics["tracking_failures"] >= 1

    losses = _history(server.url, res.run_id, "train/loss")
    assert sorted(m["step"] for m in losses) == list(range(1, total + 1))  # complete, nothing doubled
    by_step = {m["step"]: m["value"] for m in losses}
    assert all(by_step[h["step"]] == pytest.approx(h["loss"]) for h in res.history)
    # the loop went on while the server was away: steps logged during the outage arrived afterwards
    away = [m for m in losses if events["killed_at"] * 1000 < m["timestamp"] < events["back_at"] * 1000]
    assert away, "no step was logged while the server was away"

    client = MlflowClient(tracking_uri=server.url, registry_uri=server.url)
    run = client.get_run(res.run_id)
    assert run.info.status == "FINISHED" and run.data.metrics["tracking_failures"] >= 1
    assert "accuracy" in run.data.metrics
    # nothing of the adapter lost: registered, and it resolves with its checksums verified
    assert res.registration.version == "1"
    folder, manifest = resolve(f"models:/tracked/{res.registration.version}", tracking_uri=server.url)
    assert manifest["method"] == "lora" and (folder / "adapter_model.safetensors").is_file()


@pytest.mark.ray
def test_a_tracking_server_that_stays_away_ends_the_run_saying_where_the_adapter_and_results_are(
        server, tiny_llama, toy_data, tmp_path, ray_session, no_client_retries):
    import json

    from pipelines.run import train_and_register
    from workers.artifact import verify
    from workers.errors import TrackingError

    spec = spec_for(tiny_llama, toy_data, tmp_path, epochs=4, log_every=1, checkpoint_every=16)
    events, watcher = _tracked_run(server, spec, None, 2)
    with pytest.raises(TrackingError) as err:
        train_and_register(spec, {}, Console(quiet=True))
    watcher.join(60)
    assert "killed_at" in events, events
    msg = str(err.value)
    assert f"MLflow at {server.url} did not answer" in msg and "Nothing trained is lost" in msg
    (adapter_dir,) = [p for p in (tmp_path / "ws" / "adapters").iterdir() if p.is_dir()]
    assert str(adapter_dir) in msg
    verify(adapter_dir)  # the artifact is whole: files and sha256 manifest
    saved = json.loads(adapter_dir.with_name(adapter_dir.name + ".results.json").read_text())
    assert str(adapter_dir.with_name(adapter_dir.name + ".results.json")) in msg
    assert saved["run_id"] == adapter_dir.name and len(saved["history"]) == 4 * 16
    assert "accuracy" in saved["report"]
    held = {(k, s) for k, _, _, s in saved["backlog"]}
    assert ("train/loss", 64) in held  # the steps after the kill wait in the file
