"""Fixtures of the cluster tests: a real 2-node Ray cluster on loopback (token authentication on, a
test token), a real `mlflow server` behind a proxy that wants the MLflow token, the tiny model and data.

These tests run in their own pytest process (`make test` runs `pytest tests/cluster` after the main
suite; the main suite's conftest ignores this folder): the main suite's Ray instance and this cluster
never run at the same time. Every process a node starts is a descendant of its `ray start --block`
(started in its own session), so stopping the cluster kills those process trees and nothing else
(never `ray stop`, which stops every Ray on the machine).
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parents[1]
ROOT = TESTS.parent
sys.path.insert(0, str(TESTS))

from workers.common import quiet_environment  # noqa: E402

from helpers import make_tiny_llama, toy_sentiment, write_tsv  # noqa: E402
from mlflow_server import MlflowServer, free_port  # noqa: E402

quiet_environment()
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ["ADAPTERFLOW_NO_UP"] = "1"
BIN = Path(sys.executable).parent


def _free_range(n: int) -> int:
    """The first of n consecutive free loopback ports."""
    for _ in range(200):
        base = random.randint(20000, 60000 - n)
        ok = True
        for port in range(base, base + n):
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:
                    ok = False
                    break
        if ok:
            return base
    raise RuntimeError("no free port range")


class Cluster:
    """Head + one worker node, 1 CPU each, each with its own temp dir and ports."""

    def __init__(self, root: Path):
        self.root = root
        self.token = "af-test-" + os.urandom(16).hex()
        self.port, self.dashboard_port = free_port(), free_port()
        self.address = f"http://127.0.0.1:{self.dashboard_port}"
        self.gcs = f"127.0.0.1:{self.port}"
        self.procs: list[subprocess.Popen] = []
        self.temp_dirs: list[Path] = []
        # a job's `python` is this virtualenv's; only `python`: with the whole venv bin first on PATH, the
        # job's DeepSpeed would JIT-build its CPU op with the venv's ninja and the rest of the machine's
        # runs (the system ninja) would rebuild it after every job
        pybin = root / "bin"
        pybin.mkdir()
        (pybin / "python").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
        (pybin / "python").chmod(0o755)
        self.env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token,
                    "PATH": f"{pybin}:{os.environ.get('PATH', '')}", "DS_ACCELERATOR": "cpu",
                    "TOKENIZERS_PARALLELISM": "false", "RAY_USAGE_STATS_ENABLED": "0"}
        self.env.pop("RAY_ADDRESS", None)
        self.env.pop("PYTHONPATH", None)  # the job's working dir is the project, not this checkout's path

    def _node_args(self, tag: str) -> list[str]:
        # short temp dirs: Ray's socket paths live under them (at most 107 bytes)
        tmp = Path(f"/tmp/afc-{os.getpid()}-{tag}")
        tmp.mkdir(parents=True, exist_ok=True)
        self.temp_dirs.append(tmp)
        workers = _free_range(12)
        return ["--num-cpus", "1", "--temp-dir", str(tmp), "--node-ip-address", "127.0.0.1",
                "--node-manager-port", str(free_port()), "--object-manager-port", str(free_port()),
                "--min-worker-port", str(workers), "--max-worker-port", str(workers + 11),
                "--dashboard-agent-listen-port", str(free_port()), "--dashboard-agent-grpc-port", str(free_port()),
                "--metrics-export-port", str(free_port()), "--runtime-env-agent-port", str(free_port()),
                "--block", "--disable-usage-stats"]

    def _start(self, args: list[str], tag: str) -> None:
        log = open(self.root / f"ray-{tag}.log", "w")
        self.procs.append(subprocess.Popen([str(BIN / "ray"), "start", *args, *self._node_args(tag)], env=self.env,
                                           stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                           start_new_session=True, cwd=self.root))

    def alive_nodes(self) -> int:
        import httpx

        try:
            r = httpx.get(f"{self.address}/api/v0/nodes", headers={"Authorization": f"Bearer {self.token}"},
                          timeout=5)
            rows = r.json()["data"]["result"]["result"]
        except (httpx.HTTPError, ValueError, KeyError, TypeError):
            return 0
        return sum(1 for n in rows if n.get("state") == "ALIVE")

    def _wait(self, nodes: int, timeout_s: float = 120) -> None:
        deadline = time.monotonic() + timeout_s
        while self.alive_nodes() < nodes:
            for p in self.procs:
                assert p.poll() is None, f"ray start exited ({p.returncode}):\n{self.logs()}"
            assert time.monotonic() < deadline, f"{nodes} Ray nodes not alive in {timeout_s} s:\n{self.logs()}"
            time.sleep(0.5)

    def start(self) -> Cluster:
        self._start(["--head", "--port", str(self.port), "--dashboard-host", "127.0.0.1", "--dashboard-port",
                     str(self.dashboard_port), "--ray-client-server-port", str(free_port())], "h")
        self._wait(1)
        self._start(["--address", self.gcs], "w")
        self._wait(2)
        return self

    def logs(self) -> str:
        return "\n".join(f.read_text()[-3000:] for f in sorted(self.root.glob("ray-*.log")))

    def stop(self) -> None:
        """SIGTERM each `ray start --block` (it stops its node's processes), then kill what is left of
        those process trees."""
        import psutil

        tree = []
        for p in self.procs:
            try:
                tree += [psutil.Process(p.pid), *psutil.Process(p.pid).children(recursive=True)]
            except psutil.NoSuchProcess:
                pass
        for p in reversed(self.procs):  # the worker node first
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
        for p in self.procs:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        _, alive = psutil.wait_procs(tree, timeout=5)
        for p in alive:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        for tmp in self.temp_dirs:
            shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    c = Cluster(tmp_path_factory.mktemp("ray-cluster"))
    try:
        yield c.start()
    finally:
        c.stop()


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    with MlflowServer(tmp_path_factory.mktemp("mlflow")) as server:
        yield server


@pytest.fixture
def cluster_env(ray_cluster, monkeypatch):
    """The submitter's environment: the cluster's address and token."""
    monkeypatch.setenv("ADAPTERFLOW_RAY_ADDRESS", ray_cluster.address)
    monkeypatch.setenv("RAY_AUTH_TOKEN", ray_cluster.token)
    return {**os.environ, "PYTHONPATH": str(ROOT)}


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def toy_data(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("toy-data")
    write_tsv(d / "train.tsv", toy_sentiment(64, seed=0))
    write_tsv(d / "validation.tsv", toy_sentiment(32, seed=1))
    return d


class TokenProxy:
    """An HTTP proxy in front of the mlflow server that answers 401 to any request without
    `Authorization: Bearer TOKEN` and counts both kinds: a job that tracks through it proves the token
    (a secret the job got from `--secret-env MLFLOW_TRACKING_TOKEN`) reached the job's MLflow client."""

    def __init__(self, upstream: str, token: str):
        self.upstream, self.token = upstream, token
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.authorized = self.refused = 0

    def start(self) -> TokenProxy:
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        import httpx

        proxy = self
        upstream = httpx.Client(base_url=self.upstream, timeout=120)
        hop = {"connection", "keep-alive", "transfer-encoding", "content-length", "content-encoding", "host"}

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _any(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                if self.headers.get("Authorization") != f"Bearer {proxy.token}":
                    proxy.refused += 1
                    self.send_response(401)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                proxy.authorized += 1
                headers = {k: v for k, v in self.headers.items() if k.lower() not in hop | {"authorization"}}
                r = upstream.request(self.command, self.path, content=body, headers=headers)
                self.send_response(r.status_code)
                for k, v in r.headers.items():
                    if k.lower() not in hop:
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(r.content)))
                self.end_headers()
                self.wfile.write(r.content)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _any  # noqa: N815 - http.server names

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def mlflow_token() -> str:
    return "mlflow-secret-" + os.urandom(12).hex()


@pytest.fixture(scope="module")
def token_proxy(mlflow_server, mlflow_token):
    proxy = TokenProxy(mlflow_server.url, mlflow_token).start()
    yield proxy
    proxy.stop()
