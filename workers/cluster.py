"""The persistent local Ray head of `adapterflow up` / `adapterflow down` / `adapterflow status`.

Without it every `adapterflow train/run/tune` starts an embedded Ray instance and stops it at exit
(~20 s on 2 cores). `up` starts a daemon that starts one local Ray instance and holds it, in its own
temp folder (no other Ray program on the machine finds it by accident: no `ray_current_cluster` file,
no Ray client server), with the environment every worker needs (quiet, DeepSpeed on CPU, token
authentication); the daemon records it in a state file
(`$ADAPTERFLOW_HOME/head.json`, default `~/.adapterflow`). `ensure_ray` connects to it whenever a spec
names no `ray_address` (a spec's address still wins; `ADAPTERFLOW_NO_UP=1` ignores the head). `down`
stops that head and nothing else.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from workers.common import quiet_environment
from workers.errors import AdapterflowError

log = logging.getLogger(__name__)

IGNORE_ENV = "ADAPTERFLOW_NO_UP"
# what every process of the head inherits (the warm workers too): DeepSpeed on CPU, no tokenizer threads
HEAD_ENV = {"DS_ACCELERATOR": "cpu", "TOKENIZERS_PARALLELISM": "false", "RAY_AUTH_MODE": "token"}


class ClusterError(AdapterflowError):
    """The local Ray head could not be started or stopped."""


def home() -> Path:
    return Path(os.environ.get("ADAPTERFLOW_HOME", "~/.adapterflow")).expanduser()


def state_file() -> Path:
    return home() / "head.json"


def _temp_dir() -> Path:
    """One per user and state folder. Short: Ray's socket paths live under it (at most 107 bytes)."""
    import hashlib

    tag = hashlib.sha256(str(home().resolve()).encode()).hexdigest()[:8]
    return Path(tempfile.gettempdir()) / f"adapterflow-ray-{os.getuid()}-{tag}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def running() -> dict | None:
    """The state of the head `up` started, when it is still running (else None; a stale file is removed)."""
    f = state_file()
    if not f.is_file():
        return None
    try:
        state = json.loads(f.read_text())
    except (OSError, ValueError):
        return None
    if not _alive(int(state.get("pid", -1))):
        f.unlink(missing_ok=True)
        return None
    return state


def head_address() -> str | None:
    """Where `ensure_ray` connects when a spec names no cluster: the running head, else None."""
    if os.environ.get(IGNORE_ENV) == "1":
        return None
    state = running()
    if state is None:
        return None
    _token_auth()
    return state["address"]


def _token_auth() -> None:
    """The head checks tokens (~/.ray/auth_token): so must this process. Ray reads the mode into its
    config when it is imported, so an already imported Ray re-reads it."""
    if os.environ.get("RAY_AUTH_MODE") == "token":
        return
    os.environ["RAY_AUTH_MODE"] = "token"
    if "ray" in sys.modules:
        from ray._raylet import Config

        Config.initialize("")


def up(num_cpus: int | None = None, dashboard: bool = True, timeout_s: float = 180.0) -> dict:
    """Start the head (or return the running one's state): a small daemon process (`python -m
    workers.cluster`) that starts a local Ray instance and holds it until `down`."""
    state = running()
    if state is not None:
        return {**state, "already_running": True}
    home().mkdir(parents=True, exist_ok=True)
    tmp = _temp_dir()
    tmp.mkdir(parents=True, exist_ok=True)
    state_file().unlink(missing_ok=True)
    env = {**os.environ, **HEAD_ENV}
    for k, v in quiet_environment().items():
        env.setdefault(k, v)
    cpus = num_cpus or os.cpu_count() or 1
    cmd = [sys.executable, "-m", "workers.cluster", "--temp-dir", str(tmp), "--num-cpus", str(cpus),
           "--dashboard-port", str(_free_port() if dashboard else 0), "--state", str(state_file())]
    logfile = tmp / "adapterflow-up.log"
    with open(logfile, "w") as out:
        proc = subprocess.Popen(cmd, env=env, cwd=Path(__file__).resolve().parents[1], stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + timeout_s
    while not state_file().is_file():
        if proc.poll() is not None or time.monotonic() > deadline:
            if proc.poll() is None:
                proc.terminate()
            tail = logfile.read_text()[-3000:] if logfile.is_file() else ""
            raise ClusterError(f"the Ray head did not start (see {logfile}):\n{tail}")
        time.sleep(0.2)
    return json.loads(state_file().read_text())


def update_state(**values) -> None:
    state = json.loads(state_file().read_text())
    state.update(values)
    state_file().write_text(json.dumps(state, indent=2))


def _serve(temp_dir: str, num_cpus: int, dashboard_port: int, state_path: str) -> None:
    """The daemon `up` starts: a local Ray instance, held until SIGTERM (`down`)."""
    import ray

    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    signal.signal(signal.SIGINT, lambda *_: stop.append(1))
    ctx = ray.init(num_cpus=num_cpus, _temp_dir=temp_dir, include_dashboard=dashboard_port > 0,
                   dashboard_host="127.0.0.1", dashboard_port=dashboard_port or None, logging_level=logging.WARNING,
                   log_to_driver=False)
    state = {"address": ctx.address_info["gcs_address"], "pid": os.getpid(), "temp_dir": temp_dir,
             "dashboard_url": f"http://{ctx.dashboard_url}" if ctx.dashboard_url else None, "num_cpus": num_cpus,
             "started": time.time(), "warm_workers": 0}
    tmp = Path(state_path).with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=2))
    tmp.replace(state_path)  # whole or absent: `up` waits for it
    while not stop:
        time.sleep(0.5)
    ray.shutdown()


def down(timeout_s: float = 60.0) -> dict | None:
    """Stop the head `up` started (its `ray start --block` process stops every process of its session)
    and forget it; None when none was running."""
    state = running()
    if state is None:
        state_file().unlink(missing_ok=True)
        return None
    pid = int(state["pid"])
    try:
        os.kill(pid, signal.SIGTERM)  # the daemon shuts its Ray instance down and exits
    except ProcessLookupError:
        pass
    deadline = time.monotonic() + timeout_s
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.3)
    leftovers = _session_processes(state["temp_dir"])
    for p in leftovers:  # processes of this head's session that outlived it (its temp folder names them)
        try:
            p.terminate()
        except Exception:  # noqa: BLE001 - already gone
            pass
    if leftovers:
        import psutil

        _, alive = psutil.wait_procs(leftovers, timeout=10)
        for p in alive:
            p.kill()
    state_file().unlink(missing_ok=True)
    return state


def _session_processes(temp_dir: str) -> list:
    import psutil

    found = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            cmdline = " ".join(p.info["cmdline"] or [])
        except Exception:  # noqa: BLE001 - a process that vanished while listed
            continue
        if p.pid != os.getpid() and (f"--temp-dir={temp_dir}" in cmdline or f"{temp_dir}/session_" in cmdline):
            found.append(p)
    return found


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description="the daemon of `adapterflow up` (not for direct use)")
    ap.add_argument("--temp-dir", required=True)
    ap.add_argument("--num-cpus", type=int, required=True)
    ap.add_argument("--dashboard-port", type=int, default=0)
    ap.add_argument("--state", required=True)
    a = ap.parse_args()
    _serve(a.temp_dir, a.num_cpus, a.dashboard_port, a.state)
