"""What the dev-cpu overlay runs, run on the local Ray: the RayJob's mounted pipeline spec trains and
registers its adapter, then the RayService's `serveConfigV2` deploys it the way Serve deploys a config
file (each application's `import_path` imported and called with its `args`, then run under its name and
route prefix) and answers a classification over HTTP.

Swapped for local ones, and nothing else: in the spec, `workspace` (the pods' shared volume) and
`data.path` (the image's copy of the example data, /app/...) become this checkout's, and
`track.tracking_uri` (the in-cluster MLflow server, whose artifacts live in MinIO) becomes a SQLite
store with a local artifact folder; in the Serve config, `MLFLOW_TRACKING_URI` (the pods' environment,
which `args` falls back to) points at that store, and `http_options` (0.0.0.0:8000 in the pod) becomes
a free loopback port. To keep the suite short the spec trains in local mode for 8 steps
(`train.num_workers: 0`, `train.max_steps`); its 2-worker ZeRO-2 setting is what the RayJob runs."""

from __future__ import annotations

import copy
import shlex

import httpx
import pytest
import yaml
from rich.console import Console

from helpers import ROOT
from k8s_manifests import mounted_spec, one, render, serve_config
from mlflow_server import free_port

pytestmark = pytest.mark.ray


def test_the_rayjob_spec_trains_and_the_rayservice_config_serves_it(ray_session, tmp_path, monkeypatch):
    import mlflow
    from ray import serve
    from ray._common.utils import import_attr
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
    from ray.serve.schema import ServeDeploySchema

    from pipelines.run import train_and_register
    from pipelines.spec import parse_spec

    docs = render("dev-cpu")
    entry = shlex.split(one(docs, "RayJob")["spec"]["entrypoint"])
    spec_dict = yaml.safe_load(mounted_spec(docs, entry[-1], tmp_path).read_text())
    assert spec_dict["train"]["num_workers"] == 2 and spec_dict["data"]["path"].startswith("/app/")
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    local = copy.deepcopy(spec_dict)
    local["workspace"] = str(tmp_path / "ws")
    local["data"]["path"] = str(ROOT / spec_dict["data"]["path"].removeprefix("/app/"))
    local["track"]["tracking_uri"] = store
    local["train"].update(num_workers=0, max_steps=8)
    res = train_and_register(parse_spec(local), local, Console(quiet=True))
    assert res.registration.moved and res.registration.version == "1"

    config = serve_config(docs)
    ServeDeploySchema.model_validate(config)  # what Serve itself accepts as a config
    (app,) = config["applications"]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    port = free_port()
    # what Serve's controller does with a config application (Ray's own helpers)
    bound = call_user_app_builder_with_args_if_necessary(import_attr(app["import_path"]), copy.deepcopy(app["args"]))
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(bound, name=app["name"], route_prefix=app["route_prefix"])
        name = next(iter(app["args"]["adapters"]))
        texts = ["I enjoyed very much the movie.", "It was painful to watch."]
        r = httpx.post(f"http://127.0.0.1:{port}{app['route_prefix'].rstrip('/')}/v1/classify",
                       json={"adapter": name, "inputs": texts}, timeout=120)
        assert r.status_code == 200, r.text
        results = r.json()["results"]
        # the same answers as the registered MLflow Model (pyfunc), a path that shares no serving code
        want = mlflow.pyfunc.load_model(app["args"]["adapters"][name]).predict(texts)
        assert [x["label"] for x in results] == list(want["label"])
        for x, p in zip(results, want["prob_positive"]):
            assert x["probabilities"]["positive"] == pytest.approx(float(p), abs=1e-5)
        r = httpx.post(f"http://127.0.0.1:{port}/v1/classify", json={"adapter": "nope", "inputs": texts}, timeout=60)
        assert r.status_code == 404, r.text
    finally:
        serve.delete(app["name"])
