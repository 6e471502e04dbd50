"""The k8s/ overlays rendered with the real `kubectl kustomize`, and lookups into what they render (test
tooling only: tests/test_k8s.py checks the documents offline, tests/test_k8s_local.py runs what they
name on the local Ray)."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from helpers import ROOT

OVERLAYS = ("dev-cpu", "prod-gpu")
YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def need_tool(name: str) -> str:
    """A command-line tool (the test extra installs kubectl beside this interpreter); skip where it is
    absent, fail under CI."""
    found = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    if not found:
        msg = f"{name} is not installed (make setup installs the test extra)"
        if os.environ.get("CI") == "true":
            pytest.fail(msg + " - required under CI")
        pytest.skip(msg)
    return found


def render(overlay: str) -> list[dict]:
    proc = subprocess.run([need_tool("kubectl"), "kustomize", str(ROOT / "k8s" / "overlays" / overlay)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"kubectl kustomize {overlay}: {proc.stderr}"
    return [d for d in yaml.load_all(proc.stdout, Loader=YAML_LOADER) if d]


def one(docs: list[dict], kind: str, name: str | None = None) -> dict:
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def ray_clusters(docs: list[dict]) -> dict[str, dict]:
    """Every RayCluster spec the overlay creates: the RayCluster's own and the RayService's."""
    return {"RayCluster": one(docs, "RayCluster")["spec"],
            "RayService": one(docs, "RayService")["spec"]["rayClusterConfig"]}


def ray_pods(cluster: dict) -> list[dict]:
    return [cluster["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in cluster["workerGroupSpecs"]]


def env_of(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def serve_config(docs: list[dict]) -> dict:
    return yaml.safe_load(one(docs, "RayService")["spec"]["serveConfigV2"])


def mounted_spec(docs: list[dict], path: str, tmp_path: Path) -> Path:
    """The file at `path` in the head pod of the RayJob's cluster, written out from its ConfigMap."""
    head = one(docs, "RayCluster")["spec"]["headGroupSpec"]["template"]["spec"]
    volumes = {v["name"]: v for v in head["volumes"]}
    for mount in head["containers"][0]["volumeMounts"]:
        folder = mount["mountPath"].rstrip("/") + "/"
        if path.startswith(folder) and "configMap" in volumes[mount["name"]]:
            cm = one(docs, "ConfigMap", volumes[mount["name"]]["configMap"]["name"])
            key = path[len(folder):]
            assert key in cm["data"], f"{path}: ConfigMap {cm['metadata']['name']} has {sorted(cm['data'])}"
            out = tmp_path / Path(key).name
            out.write_text(cm["data"][key])
            return out
    raise AssertionError(f"{path} is on no ConfigMap volume of the head pod")


def overlay_spec(docs: list[dict], tmp_path: Path):
    from pipelines.spec import load_spec

    entry = shlex.split(one(docs, "RayJob")["spec"]["entrypoint"])
    return load_spec(mounted_spec(docs, entry[-1], tmp_path))
