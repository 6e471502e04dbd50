"""Ray job submission: `adapterflow submit` and `adapterflow jobs list|status|logs|stop`.

A job is the repository (the `working_dir`, large folders excluded) plus a small per-job bundle: a
staging folder uploaded as a `py_modules` package that holds the spec (with `--set` overrides applied
and validated here first). The bundle is its own package so the repository's package keeps one content
hash: Ray uploads it once and every later job reuses it; only the few-kilobyte bundle is new per job.

Secrets never enter the Jobs API (not the entrypoint, not the runtime env's `env_vars`) nor any node's
disk: they are stored as one entry of the cluster's package store that no runtime env names (every node
that runs a worker of the job unpacks the job's `py_modules`, so a secrets file there would land on each
of them). The job's entrypoint (`python -m pipelines.job_entry --bundle NAME --secrets URI COMMAND`)
reads the entry into its environment, deletes it from the cluster and runs the CLI command.

Authentication: when the cluster checks tokens (Ray 2.60 token authentication), the client sends
`Authorization: Bearer TOKEN` with TOKEN from `$RAY_AUTH_TOKEN`, else the file `$RAY_AUTH_TOKEN_PATH`;
else Ray's own loader when `RAY_AUTH_MODE=token` (`~/.ray/auth_token`); else, for a loopback address
only, `~/.ray/auth_token` (the token Ray's local clusters use).
"""

from __future__ import annotations

import json
import os
import secrets as _secrets
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from workers.errors import ClusterAuthError, ClusterConnectionError, JobSubmitError, SpecError, UnknownJobError, UserError

ROOT = Path(__file__).resolve().parents[1]
ADDRESS_ENV = "ADAPTERFLOW_RAY_ADDRESS"
COMMANDS = ("run", "train", "tune")
BUNDLE_PREFIX = "adapterflow_job_"
SPEC_FILE = "spec.yaml"
SECRETS_PREFIX = "adapterflow_secrets_"
# never uploaded: environments, version control, local stores and results, caches
EXCLUDES = [".venv", "venv", ".git", ".adapterflow", "workspaces/.adapterflow", "benchmarks/results", "mlruns",
            "mlartifacts", "**/__pycache__", "*.pyc", ".pytest_cache", ".ruff_cache", ".import_linter_cache",
            "*.egg-info", "build", "dist", "docs/img"]
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


@dataclass
class Submitted:
    job_id: str
    address: str
    bundle: str


def resolve_address(address: str | None) -> str:
    """--address, else $ADAPTERFLOW_RAY_ADDRESS; `HOST:PORT` means http://HOST:PORT (the dashboard's port)."""
    address = address or os.environ.get(ADDRESS_ENV)
    if not address:
        raise UserError(f"name the Ray cluster: --address http://HEAD:8265 (the dashboard's address) or set "
                        f"${ADDRESS_ENV}")
    return address if "://" in address else f"http://{address}"


def _loopback(address: str) -> bool:
    return (urlparse(address).hostname or "") in {"127.0.0.1", "localhost", "::1"}


def auth_token(address: str) -> str | None:
    """The token this client sends (see the module's doc), or None to leave it to Ray."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return os.environ["RAY_AUTH_TOKEN"].strip()
    path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    if path:
        try:
            return Path(path).expanduser().read_text().strip()
        except OSError as exc:
            raise ClusterAuthError(f"RAY_AUTH_TOKEN_PATH={path}: cannot read the token file ({exc.strerror})") from None
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "token":
        return None  # Ray's loader reads ~/.ray/auth_token itself
    default = Path.home() / ".ray" / "auth_token"
    if _loopback(address) and default.is_file():
        return default.read_text().strip()
    return None


AUTH_HELP = ("set RAY_AUTH_TOKEN to the cluster's token (or RAY_AUTH_TOKEN_PATH to a file holding it); on the "
             "head node `ray get-auth-token` prints it")


def _explain(exc: Exception, address: str) -> UserError | None:
    """A Ray or HTTP failure as one clear error naming the address (None: not a connection problem)."""
    import requests
    from ray.exceptions import AuthenticationError

    text = str(exc)
    if isinstance(exc, AuthenticationError) or "Authentication required" in text or "Authentication failed" in text:
        what = "rejected the token this client sent" if "failed" in text.lower() else "requires a token"
        return ClusterAuthError(f"the Ray cluster at {address} {what} (token authentication is on): {AUTH_HELP}")
    if isinstance(exc, (ConnectionError, requests.exceptions.ConnectionError, requests.exceptions.Timeout)):
        return ClusterConnectionError(f"cannot reach the Ray cluster's job API at {address}: check the address (the "
                                      "head's dashboard, default port 8265) and that the cluster is up")
    return None


class _Guard:
    """Turns connection and authentication failures of the block into ClusterConnectionError/ClusterAuthError."""

    def __init__(self, address: str):
        self.address = address

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, tb):
        if exc is None or isinstance(exc, UserError):
            return False
        clear = _explain(exc, self.address)
        if clear is not None:
            raise clear from None
        if isinstance(exc, RuntimeError) and "does not exist" in str(exc):
            raise UnknownJobError(f"{self.address}: {str(exc).removeprefix('Request failed with status code 404: ')}"
                                  " (adapterflow jobs list shows the cluster's jobs)") from None
        return False


def client(address: str | None):
    from workers.common import quiet_environment

    quiet_environment()
    address = resolve_address(address)
    from ray.job_submission import JobSubmissionClient

    token = auth_token(address)
    headers = {"Authorization": f"Bearer {token}"} if token else None
    with _Guard(address):
        c = JobSubmissionClient(address, headers=headers)
    c.adapterflow_address = address
    return c


def guard(c) -> _Guard:
    return _Guard(c.adapterflow_address)


def env_values(names: list[str] | None, what: str) -> dict[str, str]:
    """NAME -> its value in this process's environment; a name that is not set is an error naming it."""
    out = {}
    for name in names or []:
        if name not in os.environ:
            raise UserError(f"{what} {name}: not set in this environment; export {name}=... before submitting")
        out[name] = os.environ[name]
    return out


def stage_bundle(spec_data: dict) -> tuple[Path, str]:
    """The per-job staging folder: a package `adapterflow_job_<random>` holding the validated spec."""
    import yaml

    name = BUNDLE_PREFIX + _secrets.token_hex(6)
    parent = Path(tempfile.mkdtemp(prefix="adapterflow-submit-"))
    folder = parent / name
    folder.mkdir()
    (folder / "__init__.py").write_text('"""A submitted job\'s spec (pipelines.job_entry reads it)."""\n')
    (folder / SPEC_FILE).write_text(yaml.safe_dump(spec_data, sort_keys=False))
    return folder, name


def put_secrets(c, values: dict[str, str]) -> str:
    """The secrets as one entry of the cluster's package store (the GCS, where `working_dir` packages go),
    under a random URI that no runtime env names: no node unpacks it, the job's entrypoint reads it and
    deletes it, and Ray drops it after its temporary reference expires when no job reads it. The request
    goes to the same job API endpoint the Jobs SDK uploads packages through."""
    uri = f"gcs://{SECRETS_PREFIX}{_secrets.token_hex(16)}.zip"  # the store wants .zip; JSON inside, never unpacked
    with guard(c):
        r = c._do_request("PUT", f"/api/packages/gcs/{uri.removeprefix('gcs://')}", data=json.dumps(values).encode())
        if r.status_code != 200:
            raise JobSubmitError(f"{c.adapterflow_address}: the cluster did not store the job's secrets "
                                 f"(HTTP {r.status_code})")
        c._package_exists(uri)  # a temporary reference: unread, the entry is dropped when it expires
    return uri


def submit(spec_path: Path, overrides: list[str] | None, *, address: str | None, command: str = "run",
           env: list[str] | None = None, secret_env: list[str] | None = None, job_id: str | None = None) -> Submitted:
    """Validate the spec here, stage it (and the secrets) and submit the job; nothing is submitted when the
    spec, an --env or a --secret-env is wrong."""
    from pipelines.spec import load_spec_dict, parse_spec

    if command not in COMMANDS:
        raise UserError(f"--command {command!r}: expected one of {', '.join(COMMANDS)}")
    data = load_spec_dict(spec_path, overrides or [])
    spec = parse_spec(data, source=str(spec_path))
    if command == "tune" and spec.tune is None:
        raise SpecError(f"{spec_path}: --command tune needs a tune: section in the spec")
    env_vars = env_values(env, "--env")
    secret_values = env_values(secret_env, "--secret-env")
    if clash := sorted(set(env_vars) & set(secret_values)):
        raise UserError(f"{clash[0]}: named by both --env and --secret-env; a secret goes with --secret-env only")
    c = client(address)
    folder, bundle = stage_bundle(data)
    job_id = job_id or f"adapterflow-{spec.name}-{_secrets.token_hex(4)}"
    runtime_env = {"working_dir": str(ROOT), "excludes": EXCLUDES, "py_modules": [str(folder)],
                   "env_vars": {"ADAPTERFLOW_NO_UP": "1", **env_vars}}
    entrypoint = f"python -m pipelines.job_entry --bundle {bundle}"
    try:
        if secret_values:
            entrypoint += f" --secrets {put_secrets(c, secret_values)}"
        with guard(c):
            c.submit_job(entrypoint=f"{entrypoint} {command}", submission_id=job_id, runtime_env=runtime_env,
                         metadata={"adapterflow_spec": spec.name, "command": command})
    finally:
        shutil.rmtree(folder.parent, ignore_errors=True)
    return Submitted(job_id=job_id, address=c.adapterflow_address, bundle=bundle)


def wait(c, job_id: str, timeout_s: float | None = None, poll_s: float = 1.0) -> str:
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    with guard(c):
        while True:
            status = str(c.get_job_status(job_id).value)
            if status in TERMINAL or (deadline is not None and time.monotonic() > deadline):
                return status
            time.sleep(poll_s)


def follow(c, job_id: str, write) -> str:
    """Stream the job's logs until it ends; return its final status."""
    import asyncio

    async def tail():
        async for lines in c.tail_job_logs(job_id):
            write(lines)

    with guard(c):
        asyncio.run(tail())
    return wait(c, job_id)


def list_jobs(c) -> list[dict]:
    with guard(c):
        jobs = c.list_jobs()
    rows = []
    for j in sorted(jobs, key=lambda j: j.start_time or 0):
        rows.append({"job_id": j.submission_id or j.job_id, "status": str(j.status.value), "entrypoint": j.entrypoint,
                     "start_time": j.start_time, "end_time": j.end_time, "message": j.message})
    return rows


def status(c, job_id: str) -> dict:
    with guard(c):
        info = c.get_job_info(job_id)
    return {"job_id": job_id, "status": str(info.status.value), "message": info.message,
            "entrypoint": info.entrypoint, "start_time": info.start_time, "end_time": info.end_time}


def logs(c, job_id: str) -> str:
    with guard(c):
        return c.get_job_logs(job_id)


def stop(c, job_id: str, timeout_s: float = 60.0) -> str:
    """Ask the job to stop and wait until it has; return its final status."""
    with guard(c):
        c.stop_job(job_id)
    return wait(c, job_id, timeout_s=timeout_s)
