"""The entrypoint of a Ray job: `python -m pipelines.job_entry [--bundle NAME] COMMAND [ARGS ...]`.

`adapterflow submit` runs `python -m pipelines.job_entry --bundle adapterflow_job_... [--secrets URI] run`:
the bundle (a `py_modules` package of the job) holds the validated spec; the secrets, if any, wait in the
cluster's package store under URI (named by no runtime env, so no node unpacks them): they are read into
this process's environment and deleted from the cluster before the command starts. The stock Ray CLI runs the same
entrypoint with a spec inside the working dir:

    ray job submit --address http://HEAD:8265 --working-dir . -- python -m pipelines.job_entry train SPEC [--set ...]

In both, the job runs on the cluster it was submitted to (never on an `adapterflow up` head, nor on a
spec's `ray_address`), and a spec without `track.tracking_uri` tracks to `$MLFLOW_TRACKING_URI` when the job has it (a SQLite
store in the job's working dir would vanish with the job).
"""

from __future__ import annotations

import importlib
import json
import os
import sys
from pathlib import Path

SPEC_COMMANDS = ("run", "train", "tune", "validate")


def load_bundle(name: str) -> Path:
    """The spec file of the job's bundle (a `py_modules` package of the job)."""
    return Path(importlib.import_module(name).__file__).parent / "spec.yaml"


def load_secrets(uri: str) -> None:
    """The job's secrets from the cluster's package store into os.environ; the entry is deleted at once."""
    from ray._raylet import GcsClient

    address = os.environ.get("RAY_ADDRESS")  # the job's cluster: Ray sets it for every job's driver
    if not address:
        sys.exit("adapterflow job: --secrets needs RAY_ADDRESS (it runs as a Ray job's entrypoint)")
    gcs = GcsClient(address=address)
    key = uri.encode()
    data = gcs.internal_kv_get(key, None)
    if data is None:
        sys.exit(f"adapterflow job: its secrets ({uri}) are no longer on the cluster: they are read once, and "
                 "dropped when no job read them in time (RAY_RUNTIME_ENV_TEMPORARY_REFERENCE_EXPIRATION_S, "
                 "600 s by default); submit the job again")
    gcs.internal_kv_del(key, False, None)
    values = json.loads(data)
    os.environ.update({str(k): str(v) for k, v in values.items()})
    print(f"adapterflow job: {len(values)} secret(s) set in the environment ({', '.join(sorted(values))}); "
          "deleted from the cluster", file=sys.stderr, flush=True)


def job_overrides(args: list[str]) -> list[str]:
    """A job runs on the cluster it was submitted to (`--set ray_address=null` when the spec names one: Ray
    gives the job its cluster's address) and tracks to `$MLFLOW_TRACKING_URI` when the spec names no
    tracking URI."""
    if len(args) < 2 or args[0] not in SPEC_COMMANDS:
        return []
    import yaml

    try:
        data = yaml.safe_load(Path(args[1]).read_text())
    except (OSError, yaml.YAMLError):
        return []  # the command itself reports the spec's problem
    if not isinstance(data, dict):
        return []
    out = ["--set", "ray_address=null"] if data.get("ray_address") else []
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    track = data.get("track") if isinstance(data.get("track"), dict) else {}
    if uri and not track.get("tracking_uri") and not any("track.tracking_uri=" in a for a in args):
        out += ["--set", f"track.tracking_uri={uri}"]
    return out


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("ADAPTERFLOW_NO_UP", "1")
    if args[:1] == ["--bundle"]:
        if len(args) < 3:
            sys.exit("usage: python -m pipelines.job_entry --bundle NAME [--secrets URI] COMMAND [ARGS ...]")
        spec = load_bundle(args[1])
        args = args[2:]
        if args[:1] == ["--secrets"] and len(args) >= 3:
            load_secrets(args[1])
            args = args[2:]
        args = [args[0], str(spec), *args[1:]]
    if not args:
        sys.exit("usage: python -m pipelines.job_entry [--bundle NAME] COMMAND [ARGS ...] (an adapterflow command)")
    args += job_overrides(args)
    sys.argv = ["adapterflow", *args]
    from pipelines.cli import main as cli

    cli()


if __name__ == "__main__":
    main()
