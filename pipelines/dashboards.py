"""`adapterflow dashboards`: where to watch a workspace's runs and searches. The MLflow UI on the
workspace's tracking store (`mlflow server` on the SQLite store and its artifact folder) and
TensorBoard on the searches' trial event files (`<workspace>/tune`, written by Ray Tune), as
commands to copy, or started on loopback and stopped together."""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from workers.errors import UserError

HOST = "127.0.0.1"
# a UI on tracked runs runs no MLflow jobs (GenAI evaluations, trace rollups): no job runner process
MLFLOW_ENV = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


@dataclass
class Dashboard:
    name: str
    url: str
    command: list[str] | None  # None: nothing to start here (a tracking server, a missing package)
    ready_path: str  # answers 200 once the server serves
    note: str = ""
    env: dict[str, str] = field(default_factory=dict)

    def shell(self) -> str:
        """The command as one would type it."""
        return " ".join([*(f"{k}={v}" for k, v in self.env.items()), *(self.command or [])])


def plan(workspace: Path, tracking_uri: str, port: int) -> list[Dashboard]:
    """The MLflow UI on `port` and TensorBoard on `port + 1`, both on loopback."""
    boards = []
    if tracking_uri.startswith("sqlite:///"):
        store = Path(tracking_uri[len("sqlite:///"):])
        cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", tracking_uri,
               "--default-artifact-root", (workspace / "mlartifacts").as_uri(), "--host", HOST, "--port", str(port),
               "--workers", "1"]
        note = "" if store.is_file() else f"no runs tracked yet: {store} does not exist"
        boards.append(Dashboard("MLflow UI", f"http://{HOST}:{port}", cmd, "/health", note, dict(MLFLOW_ENV)))
    else:
        boards.append(Dashboard("MLflow UI", tracking_uri, None, "/health",
                                "the spec tracks to this server: open it (nothing to start here)"))
    logdir = workspace / "tune"
    cmd = [sys.executable, "-m", "tensorboard.main", "--logdir", str(logdir), "--host", HOST, "--port",
           str(port + 1)]
    if importlib.util.find_spec("tensorboard") is None:
        boards.append(Dashboard("TensorBoard", f"http://{HOST}:{port + 1}", None, "/",
                                "the tensorboard package is not installed: pip install tensorboard"))
    else:
        note = "" if logdir.is_dir() else f"no searches yet: {logdir} does not exist"
        boards.append(Dashboard("TensorBoard", f"http://{HOST}:{port + 1}", cmd, "/data/logdir", note))
    return boards


def start(boards: list[Dashboard], console, *, ready_timeout: float = 90.0) -> list[subprocess.Popen]:
    """Start every dashboard that has a command, each in its own process group (so stopping it stops
    the workers it forks, e.g. uvicorn's), and wait until each answers HTTP."""
    for b in boards:
        if b.command and b.name == "MLflow UI" and b.note:
            raise UserError(f"MLflow UI: {b.note}; run a pipeline or a search with this spec first")
    procs = []
    try:
        for b in boards:
            if b.command:
                procs.append(subprocess.Popen(b.command, env={**os.environ, **b.env}, start_new_session=True))
        for b, proc in zip([b for b in boards if b.command], procs):
            _wait_ready(b, proc, ready_timeout)
            console.print(f"{b.name} serving at {b.url}")
    except BaseException:
        stop(procs)
        raise
    return procs


def _wait_ready(board: Dashboard, proc: subprocess.Popen, timeout: float) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise UserError(f"{board.name} exited ({proc.returncode}) before it served {board.url}: is the port "
                            "taken? choose others with --port")
        try:
            if httpx.get(board.url + board.ready_path, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise UserError(f"{board.name} did not answer at {board.url} within {timeout:.0f} s")


def stop(procs: list[subprocess.Popen], timeout: float = 15.0) -> None:
    """SIGTERM to each dashboard's process group, SIGKILL to what is left after `timeout`."""
    for proc in procs:
        _signal_group(proc, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for proc in procs:
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
        _signal_group(proc, signal.SIGKILL)  # the group's workers too, even once the leader exited
        proc.wait()


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def serve_until_stopped(procs: list[subprocess.Popen], console) -> None:
    """Until Ctrl-C, SIGTERM, or one of them exits; then stop them all."""
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        while all(p.poll() is None for p in procs):
            time.sleep(0.5)
        gone = [p for p in procs if p.poll() is not None]
        console.print(f"a dashboard exited ({gone[0].returncode}); stopping the others")
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        stop(procs)


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt
