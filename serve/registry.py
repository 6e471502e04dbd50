"""The live adapter registry of one Serve application: which adapter names it serves and from which
reference (a registry URI or a folder under an allow-listed root). A detached Ray actor, so that
what an operator loads at run time reaches every replica, and a replica that restarts finds it.

Replicas read it (a version number and the map) and load what a request names on demand, into a
per-replica LRU (`serve.adapters.AdapterCache`); the admin routes write it.
"""

from __future__ import annotations

from pathlib import Path

import ray

NAMESPACE = "adapterflow"


@ray.remote(num_cpus=0, max_restarts=-1)
class AdapterRegistry:
    """name -> reference, and name -> the replica group (model deployment) that serves it."""

    def __init__(self, entries: dict[str, str], groups: dict[str, str] | None = None):
        self.entries = dict(entries)
        self.groups = dict(groups or {})
        self.version = 0

    def get(self) -> tuple[int, dict[str, str]]:
        return self.version, dict(self.entries)

    def routes(self) -> dict[str, str]:
        return dict(self.groups)

    def put(self, name: str, ref: str, group: str | None = None) -> int:
        self.entries[name] = ref
        if group is not None:
            self.groups[name] = group
        self.version += 1
        return self.version

    def delete(self, name: str) -> bool:
        if self.entries.pop(name, None) is None:
            return False
        self.groups.pop(name, None)
        self.version += 1
        return True


def actor_name(app: str) -> str:
    return f"adapterflow-registry-{app}"


def registry(app: str, entries: dict[str, str] | None = None, groups: dict[str, str] | None = None):
    """The application's registry actor (made with `entries` and their `groups` when there is none yet)."""
    return AdapterRegistry.options(name=actor_name(app), namespace=NAMESPACE, get_if_exists=True,
                                   lifetime="detached").remote(entries or {}, groups or {})


def reset(app: str, entries: dict[str, str], groups: dict[str, str] | None = None):
    """A new deployment of `app` starts from its spec's adapters: any registry left by an earlier one goes."""
    try:
        ray.kill(ray.get_actor(actor_name(app), namespace=NAMESPACE))
    except ValueError:
        pass
    return registry(app, entries, groups)


def drop(app: str) -> None:
    try:
        ray.kill(ray.get_actor(actor_name(app), namespace=NAMESPACE))
    except ValueError:
        pass


def allowed(ref: str, roots: list[str]) -> bool:
    """A reference an admin may load: a registry reference (`models:/NAME@ALIAS`, `models:/NAME/N`,
    whose manifest and base the registry pinned), or a folder under one of the allow-listed roots
    (resolved, so `..` and symlinks cannot leave them). Never a run's or an artifact store's URI
    (`runs:/`, `mlflow-artifacts:/`, a logged model's `models:/m-...`): nothing pins those."""
    from workers.store import MLFLOW_SCHEMES, REGISTRY_REF

    if ref.startswith(MLFLOW_SCHEMES) or "://" in ref:
        return bool(REGISTRY_REF.match(ref))
    try:
        path = Path(ref).expanduser().resolve()
    except (OSError, RuntimeError, ValueError):  # ValueError: a NUL byte in the path
        return False
    return any(path == Path(r).expanduser().resolve() or Path(r).expanduser().resolve() in path.parents
               for r in roots)
