"""A search as a user runs and watches it: `adapterflow tune SPEC` in its own process, killed (SIGKILL)
mid-search and resumed with `--resume`; then its workspace seen through the dashboards that
`adapterflow dashboards SPEC --start` serves on loopback: a real `mlflow server` answering its REST API
(parent and child runs, metrics, the plots), the MLflow UI in headless Chromium where Debian's
`chromium` is installed, TensorBoard on the trials' event files.

The search's drivers connect to this test run's Ray instance (`ray_address` in the spec), as drivers
on a cluster do: the killed driver's trials must be released (Ray ends a dead driver's actors) and
the resumed driver schedules its own on the same instance. (A driver that starts its own local Ray
takes that instance down with it when it dies, so there is nothing left to release.) One search of
four trials serves the whole module."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from helpers import ROOT, mlflow_client, read_store, spec_for

NUM_TRIALS = 4
REPORT_STEPS = [7, 14, 21, 28]  # 2 epochs of 14 steps, a held-out report every 7
SEARCH_TIMEOUT_S = 300
NAME = "tracked-search"


def _env() -> dict:
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "PYTHONPATH": path, "HF_HUB_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0",
           "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("RAY_ADDRESS", None)
    return env


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "pipelines.cli", *args]


def _tail(path: Path, n: int = 60) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-n:]) if path.exists() else ""


def _children(db: Path, timeout: float = 10) -> dict[str, dict] | None:
    """The search's child runs as the driver has written them so far, read straight from SQLite (a
    reader beside the one writer): trial id -> run id, status, end time, metric points. None while the
    store is being created or locked past `timeout` (by a writer frozen mid-transaction)."""
    def read(con):
        rows = con.execute(
            "SELECT r.run_uuid, r.status, r.start_time, r.end_time, t.value FROM runs r JOIN tags t "
            "ON t.run_uuid = r.run_uuid WHERE t.key = 'adapterflow.trial_id'").fetchall()
        out = {}
        for run_id, status, start, end, trial in rows:
            history = con.execute("SELECT key, value, step, timestamp FROM metrics WHERE run_uuid = ? "
                                  "ORDER BY key, step, timestamp", (run_id,)).fetchall()
            out[trial] = {"run_id": run_id, "status": status, "start_time": start, "end_time": end, "history": history,
                          "reports": [step for k, _, step, _ in history if k == "held_out_accuracy"]}
        return out
    return read_store(db, read, timeout)


def _snapshot(experiment: Path) -> dict[str, tuple[str, int | None]] | None:
    """Tune's last experiment snapshot on storage: trial id -> (status, step of its latest checkpoint)."""
    import pickle

    files = sorted(experiment.glob("experiment_state-*.json"))
    try:
        data = json.loads(files[-1].read_text()) if files else None
    except (OSError, ValueError):  # being written
        return None
    if data is None:
        return None
    out = {}
    for trial_json, meta_json in data["trial_data"]:
        trial, meta = json.loads(trial_json), json.loads(meta_json)
        latest = pickle.loads(bytes.fromhex(meta["checkpoint_manager"]["value"])).latest_checkpoint_result
        out[trial["trial_id"]] = (trial["status"], latest.metrics.get("step") if latest else None)
    return out


def _worth_a_kill(runs: dict) -> bool:
    """Two trials finished and another part-way (it has reported)."""
    finished = [r for r in runs.values() if r["status"] == "FINISHED"]
    return len(finished) >= 2 and any(r["status"] == "RUNNING" and r["reports"] for r in runs.values())


def _agree(runs: dict, snapshot: dict | None) -> bool:
    """MLflow's child runs and Tune's snapshot say the same: the driver is between two events. (Inside one
    event MLflow leads: a report is logged, then its checkpoint saved, then the snapshot written. The
    resumed driver copes with that too, see test_trial_runs_of_a_resumed_search_log_nothing_twice; this
    test kills where both records can be compared exactly.)"""
    if snapshot is None:
        return False
    for trial, run in runs.items():
        status, step = snapshot.get(trial, ("PENDING", None))
        if (run["status"] == "FINISHED") != (status == "TERMINATED"):
            return False
        if run["status"] == "RUNNING" and step != (run["reports"][-1] if run["reports"] else None):
            return False
    return True


@dataclass
class Search:
    spec: Path
    workspace: Path
    at_kill: dict
    summary: dict
    resumed_log: str


@pytest.fixture(scope="module")
def search(tiny_llama, toy_data, tmp_path_factory, ray_session) -> Search:
    """Run, kill once two trials have finished and another is part-way, resume, finish."""
    tmp = tmp_path_factory.mktemp("tracked-search")
    d = spec_for(tiny_llama, toy_data, tmp, epochs=2, checkpoint_every=7).model_dump(mode="json", exclude={"tune"})
    d["name"] = NAME
    d["ray_address"] = ray_session.get_runtime_context().gcs_address
    d["tune"] = {"space": {"train.lr": {"loguniform": [1e-3, 1e-1]}, "adapter.r": {"choice": [2, 4]}},
                 "num_samples": NUM_TRIALS, "max_concurrent_trials": 2, "scheduler": "fifo", "seed": 1,
                 "resources_per_trial": {"CPU": 0.5}}  # four would fit: max_concurrent_trials holds them to two
    spec = tmp / "search.yaml"
    spec.write_text(yaml.safe_dump(d))
    workspace = Path(d["workspace"])
    db = workspace / "mlflow.db"
    free = ray_session.available_resources().get("CPU", 0)

    log = tmp / "first.log"
    with open(log, "w") as out:
        driver = subprocess.Popen(_cli("tune", str(spec)), cwd=tmp, env=_env(), stdout=out, stderr=subprocess.STDOUT)
    experiment = workspace / "tune" / f"{NAME}-search"
    try:
        deadline = time.monotonic() + SEARCH_TIMEOUT_S
        while True:
            assert driver.poll() is None, f"the driver exited ({driver.returncode}) before it was killed:\n{_tail(log)}"
            assert time.monotonic() < deadline, "no two trials finished in time:\n" + _tail(log)
            runs = _children(db) or {}
            if sum(r["status"] == "FINISHED" for r in runs.values()) < 2:
                time.sleep(0.1)
                continue
            # from here the driver runs in short steps, frozen between them while we look at what it wrote:
            # trials block on their next report while it is frozen, so the moment to kill cannot slip past
            driver.send_signal(signal.SIGSTOP)
            runs = _children(db, timeout=0.5)
            if runs and _worth_a_kill(runs) and _agree(runs, _snapshot(experiment)):
                break
            driver.send_signal(signal.SIGCONT)
            time.sleep(0.05)
        driver.send_signal(signal.SIGKILL)
        driver.wait(timeout=30)
    finally:
        if driver.poll() is None:
            driver.kill()
    at_kill = _children(db)
    assert sum(r["status"] == "FINISHED" for r in at_kill.values()) < NUM_TRIALS, "killed too late"

    # the dead driver's trials are gone: their CPUs are free again for the resumed search
    deadline = time.monotonic() + 60
    while ray_session.available_resources().get("CPU", 0) < free and time.monotonic() < deadline:
        time.sleep(0.5)
    assert ray_session.available_resources().get("CPU", 0) >= free, "the killed driver's trials still hold CPUs"

    summary = tmp / "summary.json"
    resumed = subprocess.run(_cli("tune", str(spec), "--resume", "--json", str(summary)), cwd=tmp, env=_env(),
                             capture_output=True, text=True, timeout=SEARCH_TIMEOUT_S)
    assert resumed.returncode == 0, resumed.stdout[-4000:] + resumed.stderr[-4000:]
    return Search(spec, workspace, at_kill, json.loads(summary.read_text()), resumed.stdout)


def _experiment(s: Search) -> Path:
    return s.workspace / "tune" / f"{NAME}-search"


def test_a_killed_search_resumes_without_running_finished_trials_again(search):

    s = search
    assert "resuming the search" in s.resumed_log, s.resumed_log
    assert len(s.summary["trials"]) == NUM_TRIALS, s.summary
    assert s.summary["counts"]["finished"] == NUM_TRIALS and s.summary["counts"]["failed"] == 0, s.summary["counts"]
    assert f"trials: {NUM_TRIALS} finished" in s.resumed_log  # the live table counts the trials done before too

    client = mlflow_client(s.workspace)
    exp = client.get_experiment_by_name("adapterflow")
    parents = client.search_runs([exp.experiment_id], f"tags.`adapterflow.search` = '{NAME}'")
    assert [p.info.run_id for p in parents] == [s.summary["run_id"]]  # one parent run, resumed
    assert parents[0].info.status == "FINISHED"

    now = _children(s.workspace / "mlflow.db")
    assert sorted(now) == sorted(t["trial"] for t in s.summary["trials"])  # one child run per trial
    assert all(r["status"] == "FINISHED" and r["reports"] == REPORT_STEPS for r in now.values()), now
    for trial, before in s.at_kill.items():
        assert now[trial]["run_id"] == before["run_id"], trial  # the same child run, not a new one
        if before["status"] == "FINISHED":  # not run again: nothing more logged, not ended again
            assert now[trial]["history"] == before["history"] and now[trial]["end_time"] == before["end_time"], trial
    events = sorted([(r["start_time"], 1) for r in now.values()] + [(r["end_time"], -1) for r in now.values()])
    running = [sum(d for _, d in events[:i + 1]) for i in range(len(events))]
    assert max(running) == 2, events  # tune.max_concurrent_trials held, by both drivers
    for trial, run in now.items():  # no report logged twice
        points = [(k, step) for k, _, step, _ in run["history"]]
        assert len(points) == len(set(points)), (trial, sorted(points))

    # Tune's own results: every trial once, each of its reports once; a trial killed part-way went on
    # from its last report's checkpoint (a restart from step 0 would report its first steps again)
    trial_dirs = sorted(p.name for p in _experiment(s).iterdir() if (p / "result.json").exists())
    assert trial_dirs == sorted(now)
    for trial in now:
        rows = [json.loads(line) for line in (_experiment(s) / trial / "result.json").read_text().splitlines()]
        assert [r["training_iteration"] for r in rows] == [1, 2, 3, 4], (trial, rows)
        assert [r["step"] for r in rows] == REPORT_STEPS, trial
        before = s.at_kill.get(trial)
        if before and before["status"] == "RUNNING" and before["reports"]:
            assert rows[-1]["resumed_from_step"] >= before["reports"][-1], (trial, before["reports"], rows[-1])
        elif before is None:
            assert rows[-1]["resumed_from_step"] == -1, trial  # started by the resumed driver
    assert any(r["status"] == "RUNNING" and r["reports"] for r in s.at_kill.values())

    reg = s.summary["registered"]
    assert reg and reg.startswith(f"models:/{NAME}/")
    version = client.get_model_version(NAME, reg.rsplit("/", 1)[1])
    assert version.tags["adapterflow.search_run_id"] == s.summary["run_id"]
    assert version.tags["adapterflow.trial_id"] == s.summary["best"]["trial"]


def _scalars(event_file: Path) -> list[tuple[str, int, float]]:
    """(tag, step, value) of every scalar in a TensorBoard event file (TFRecord framing: length,
    its CRC, the Event proto, its CRC), decoded with tensorboardX's protos."""
    from tensorboardX.proto.event_pb2 import Event

    data, out, i = event_file.read_bytes(), [], 0
    while i < len(data):
        (n,) = struct.unpack("<Q", data[i:i + 8])
        event = Event.FromString(data[i + 12:i + 12 + n])
        i += 12 + n + 4
        out += [(v.tag, event.step, v.simple_value) for v in event.summary.value]
    return out


def test_each_trial_has_tensorboard_event_files_with_its_reported_scalars(search):
    """Tune's event files, one per trial and driver: every report's scalars at its training iteration,
    also the reports a trial made before the driver was killed, each once."""
    runs = _children(search.workspace / "mlflow.db")
    for trial, run in runs.items():
        files = sorted((_experiment(search) / trial).glob("events.out.tfevents.*"))
        assert files, trial
        scalars = [x for f in files for x in _scalars(f)]
        held_out = sorted((step, value) for tag, step, value in scalars if tag == "ray/tune/held_out_accuracy")
        mlflow_values = sorted((step, value) for k, value, step, _ in run["history"] if k == "held_out_accuracy")
        assert [step for step, _ in held_out] == [1, 2, 3, 4], (trial, held_out)
        assert [v for _, v in held_out] == pytest.approx([v for _, v in mlflow_values]), trial
        assert {"ray/tune/loss", "ray/tune/step", "ray/tune/held_out_f1"} <= {tag for tag, _, _ in scalars}
        steps = sorted(value for tag, _, value in scalars if tag == "ray/tune/step")
        assert steps == REPORT_STEPS, (trial, steps)


def _has_tensorboard() -> bool:
    import importlib.util

    return importlib.util.find_spec("tensorboard") is not None


def _free_port_pair() -> int:
    for _ in range(100):
        with socket.socket() as a:
            a.bind(("127.0.0.1", 0))
            port = a.getsockname()[1]
            if port >= 65535:
                continue
            with socket.socket() as b:
                try:
                    b.bind(("127.0.0.1", port + 1))
                except OSError:
                    continue
        return port
    raise RuntimeError("no two consecutive free ports")


@dataclass
class Dashboards:
    proc: subprocess.Popen
    mlflow: str
    tensorboard: str
    log: Path
    group: list  # the processes of the servers' groups, seen while they served


@pytest.fixture(scope="module")
def dashboards(search, tmp_path_factory):
    """`adapterflow dashboards SPEC --start`: the MLflow UI and TensorBoard on loopback."""
    import httpx
    import psutil

    port = _free_port_pair()
    log = tmp_path_factory.mktemp("dashboards") / "dashboards.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(_cli("dashboards", str(search.spec), "--start", "--port", str(port)), cwd=log.parent,
                                env=_env(), stdout=out, stderr=subprocess.STDOUT)
    boards = Dashboards(proc, f"http://127.0.0.1:{port}", f"http://127.0.0.1:{port + 1}", log, [])
    try:
        deadline = time.monotonic() + 120
        while "Ctrl-C stops them." not in log.read_text():  # printed once every dashboard answers
            assert proc.poll() is None, f"dashboards exited ({proc.returncode}):\n{_tail(log)}"
            assert time.monotonic() < deadline, "the dashboards did not come up:\n" + _tail(log)
            time.sleep(0.3)
        answer = [(boards.mlflow, "/health")] + ([(boards.tensorboard, "/data/logdir")] if _has_tensorboard() else [])
        for url, path in answer:
            assert httpx.get(url + path, timeout=10).status_code == 200, url
        boards.group = psutil.Process(proc.pid).children(recursive=True)
        yield boards
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
        for p in boards.group:
            if _alive(p):
                p.kill()


def _api(base: str, endpoint: str, **params) -> dict:
    import httpx

    r = httpx.get(f"{base}/api/2.0/mlflow/{endpoint}", params=params, timeout=30)
    assert r.status_code == 200, (endpoint, r.status_code, r.text[:500])
    return r.json()


def _search_runs(base: str, experiment_id: str, filter_: str) -> list[dict]:
    import httpx

    r = httpx.post(f"{base}/api/2.0/mlflow/runs/search", timeout=30,
                   json={"experiment_ids": [experiment_id], "filter": filter_, "max_results": 100})
    assert r.status_code == 200, r.text[:500]
    return r.json().get("runs", [])


def test_the_mlflow_server_serves_the_search_through_its_rest_api(search, dashboards):
    """The REST API of the `mlflow server` the dashboards command started on the workspace's store: the
    parent run and a child run per trial (mlflow.parentRunId), their metrics, the parent's plots listed
    and downloadable as PNGs, the registered winner."""
    import io

    import httpx
    from PIL import Image

    base = dashboards.mlflow
    exp = _api(base, "experiments/get-by-name", experiment_name="adapterflow")["experiment"]
    (parent,) = _search_runs(base, exp["experiment_id"], f"tags.`adapterflow.search` = '{NAME}'")
    parent_id = parent["info"]["run_id"]
    assert parent_id == search.summary["run_id"] and parent["info"]["status"] == "FINISHED"
    metrics = {m["key"]: m["value"] for m in parent["data"]["metrics"]}
    assert metrics["trials"] == NUM_TRIALS and metrics["trials_finished"] == NUM_TRIALS
    assert metrics["best_held_out_accuracy"] == pytest.approx(search.summary["best"]["metrics"]["held_out_accuracy"])
    assert metrics["accuracy"] == pytest.approx(search.summary["evaluation"]["accuracy"])  # the winner, on validation

    children = _search_runs(base, exp["experiment_id"], f"tags.`mlflow.parentRunId` = '{parent_id}'")
    trials = {t["trial"]: t for t in search.summary["trials"]}
    by_trial = {next(t["value"] for t in c["data"]["tags"] if t["key"] == "adapterflow.trial_id"): c for c in children}
    assert sorted(by_trial) == sorted(trials)
    for trial, child in by_trial.items():
        tags = {t["key"]: t["value"] for t in child["data"]["tags"]}
        assert tags["mlflow.parentRunId"] == parent_id and tags["adapterflow.trial_status"] == "finished"
        assert child["info"]["status"] == "FINISHED"
        params = {p["key"]: p["value"] for p in child["data"]["params"]}
        assert float(params["train.lr"]) == pytest.approx(trials[trial]["config"]["train.lr"])
        keys = {m["key"] for m in child["data"]["metrics"]}
        assert {"loss", "held_out_accuracy", "held_out_f1", "held_out_eval_loss", "trainable_params"} <= keys, keys
        history = _api(base, "metrics/get-history", run_id=child["info"]["run_id"], metric_key="held_out_accuracy")
        assert sorted(m["step"] for m in history["metrics"]) == REPORT_STEPS
        loss = _api(base, "metrics/get-history", run_id=child["info"]["run_id"], metric_key="loss")
        assert sorted(m["step"] for m in loss["metrics"]) == REPORT_STEPS

    listed = {f["path"]: f for f in _api(base, "artifacts/list", run_id=parent_id)["files"]}
    assert {"trial_curves.png", "parallel_coordinates.png", "trials.json", "evaluation.json"} <= set(listed), listed
    for png in ("trial_curves.png", "parallel_coordinates.png"):
        r = httpx.get(f"{base}/get-artifact", params={"path": png, "run_uuid": parent_id}, timeout=30)
        assert r.status_code == 200 and r.content.startswith(b"\x89PNG\r\n\x1a\n"), (png, r.status_code, r.content[:40])
        assert int(listed[png]["file_size"]) == len(r.content)
        width, height = Image.open(io.BytesIO(r.content)).size
        assert width >= 300 and height >= 200, (png, width, height)
    trials_json = httpx.get(f"{base}/get-artifact", params={"path": "trials.json", "run_uuid": parent_id}).json()
    assert sorted(t["trial"] for t in trials_json["trials"]) == sorted(trials)

    version = _api(base, "registered-models/alias", name=NAME, alias="champion")["model_version"]
    assert version["run_id"] == parent_id


def test_the_mlflow_ui_shows_the_search_in_headless_chromium(search, dashboards):
    """Where Debian's `chromium` is installed (apt-get install chromium): the MLflow UI, rendered
    headless, shows the search's parent run with every trial's run among its child runs."""
    browser = shutil.which("chromium")
    if browser is None:
        pytest.skip("Debian's chromium is not installed (apt-get install chromium)")
    exp = _api(dashboards.mlflow, "experiments/get-by-name", experiment_name="adapterflow")["experiment"]
    url = f"{dashboards.mlflow}/#/experiments/{exp['experiment_id']}/runs/{search.summary['run_id']}"
    out = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                          "--virtual-time-budget=30000", "--window-size=1600,1000", "--dump-dom", url],
                         capture_output=True, text=True, timeout=120)
    dom = out.stdout
    assert f"{NAME}-search" in dom and "Child runs" in dom, (out.returncode, dom[-2000:], out.stderr[-2000:])
    for trial in search.summary["trials"]:
        assert f"trial-{trial['trial']}" in dom, trial["trial"]


def _alive(proc) -> bool:
    import psutil

    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_dashboards_prints_both_and_ctrl_c_stops_them(search, dashboards):
    """The command prints both URLs and commands; TensorBoard lists every trial of the search as a run;
    Ctrl-C stops both servers and the processes they started, and their ports stop answering."""
    import httpx

    if not _has_tensorboard():
        msg = "the tensorboard package is not installed (a dependency: make setup installs it)"
        if os.environ.get("CI") == "true":
            pytest.fail(msg + " - required under CI")
        pytest.skip(msg)
    text = dashboards.log.read_text()
    assert f"MLflow UI:   {dashboards.mlflow}" in text and f"TensorBoard: {dashboards.tensorboard}" in text, text
    assert f"--backend-store-uri sqlite:///{search.workspace / 'mlflow.db'}" in text
    assert f"--logdir {search.workspace / 'tune'}" in text
    runs = httpx.get(f"{dashboards.tensorboard}/data/runs", timeout=30).json()
    assert sorted(runs) == sorted(f"{NAME}-search/{t['trial']}" for t in search.summary["trials"]), runs
    tags = httpx.get(f"{dashboards.tensorboard}/data/plugin/scalars/tags", timeout=30).json()
    assert all("ray/tune/held_out_accuracy" in tags[run] for run in runs), tags

    assert dashboards.group, "no server processes seen"
    dashboards.proc.send_signal(signal.SIGINT)
    assert dashboards.proc.wait(timeout=30) == 0, _tail(dashboards.log)
    deadline = time.monotonic() + 20
    while any(_alive(p) for p in dashboards.group) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not [p.cmdline() for p in dashboards.group if _alive(p)]
    for url in (dashboards.mlflow, dashboards.tensorboard):
        with pytest.raises(httpx.TransportError):
            httpx.get(url, timeout=3)


def test_trial_runs_of_a_resumed_search_log_nothing_twice(tmp_path):
    """The resumed driver's callbacks where Tune's snapshot trails MLflow (a driver killed inside an event:
    a report logged before its checkpoint was in the snapshot, a trial ended before its end was): the
    child runs made before are found, a report at a step already logged is not logged again, a run that
    ended is not ended again, and the live table counts the trials that ended before the driver stopped."""
    import io
    import pickle
    from types import SimpleNamespace

    import mlflow
    from rich.console import Console

    from pipelines.search_runs import Progress, TrialRuns

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    exp = client.create_experiment("search", artifact_location=(tmp_path / "artifacts").as_uri())
    parent = client.create_run(exp).info.run_id

    def report(step):
        return {"step": step, "total_steps": 28, "loss": 1.0 / step, "held_out_accuracy": step / 28,
                "training_iteration": step // 7}

    ended = SimpleNamespace(trial_id="t0", config={"train.lr": 0.01}, status="TERMINATED", last_result=report(28))
    partway = SimpleNamespace(trial_id="t1", config={"train.lr": 0.02}, status="RUNNING", last_result=report(7))
    first = TrialRuns(uri, exp, parent)
    for trial, steps in ((ended, (7, 14, 21, 28)), (partway, (7, 14))):
        first.on_trial_start(0, [], trial)
        for step in steps:
            first.on_trial_result(0, [], trial, report(step))
    first.on_trial_complete(0, [], ended)

    def history(run_id):
        return sorted((m.step, m.timestamp) for m in client.get_metric_history(run_id, "loss"))

    runs = dict(first.runs)
    before = {t: (history(r), client.get_run(r).info.end_time) for t, r in runs.items()}
    resumed = pickle.loads(pickle.dumps(TrialRuns(uri, exp, parent)))  # the resumed driver's, as Tune holds it
    resumed.on_trial_start(0, [], partway)  # it restarts from its step-7 checkpoint: 14 comes again
    resumed.on_trial_result(0, [], partway, report(14))
    assert history(runs["t1"]) == before["t1"][0]
    resumed.on_trial_result(0, [], partway, report(21))
    resumed.on_trial_result(0, [], partway, report(28))
    resumed.on_trial_complete(0, [], partway)
    resumed.on_trial_start(0, [], ended)  # back from its last checkpoint, nothing left to train
    resumed.on_trial_complete(0, [], ended)

    assert resumed.runs == runs  # no new child runs
    children = client.search_runs([exp], f"tags.`mlflow.parentRunId` = '{parent}'")
    assert len(children) == 2 and {c.info.status for c in children} == {"FINISHED"}
    assert history(runs["t0"]) == before["t0"][0] and client.get_run(runs["t0"]).info.end_time == before["t0"][1]
    assert [step for step, _ in history(runs["t1"])] == [7, 14, 21, 28]

    table = Progress(Console(file=io.StringIO()), "held_out_accuracy", "max", 2)
    table.on_step_begin(0, [ended, partway])
    assert table.status == {"t0": "finished"} and table.best() == ("t0", 1.0)
    assert table._table().title.startswith("trials: 1 finished")
