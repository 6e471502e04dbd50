"""Building and running the Serve application: what a model replica holds (`build_engine`, on the
operator's base), how adapters split into replica groups (`group_adapters`), the app's options (a
`ServeSpec` with keyword overrides), `build_app` (the ingress over one model deployment per group),
`deploy` and `shutdown`."""

import os

from ray import serve

from serve.app import Ingress
from serve.replica import ModelServer


def build_engine(adapters: dict[str, str], base: dict | None, tracking_uri: str | None = None, threads: int = 1,
                 device: str = "cpu"):
    """What a replica holds: the operator's base (on `device`) with the adapters loaded (each resolved,
    verified and checked against that base)."""
    from workers.errors import SpecError
    from workers.inference import Engine
    from workers.store import resolve
    from workers.trust import serving_spec

    if not adapters:
        raise SpecError("no adapters to serve")
    base = base or operator_base(adapters, tracking_uri)
    resolved = {name: resolve(ref, tracking_uri=tracking_uri) for name, ref in adapters.items()}
    first_folder, first = next(iter(resolved.values()))
    engine = Engine(serving_spec(first, base, first_folder), threads=threads, device=device)
    for name, (folder, manifest) in resolved.items():
        engine.add_adapter(name, folder, manifest)
    return engine


def operator_base(adapters: dict[str, str], tracking_uri: str | None = None) -> dict:
    """The base the registry recorded for these adapters (the operator's pipeline wrote it); a plain
    folder has none, and then the operator must name the base."""
    from workers.errors import SpecError
    from workers.store import registered_base

    bases = {ref: registered_base(ref, tracking_uri) for ref in adapters.values()}
    known = [b for b in bases.values() if b]
    if not known or len(known) < len(bases):
        missing = ", ".join(ref for ref, b in bases.items() if not b)
        raise SpecError(f"no base model for {missing}: name it (adapterflow serve --base MODEL, or a spec's "
                        "model section); an adapter's own manifest never chooses the base a server builds")
    return known[0]


def secret(env: str | None, key: str) -> str | None:
    """The value of the environment variable a spec names for a key (None when it names none)."""
    if not env:
        return None
    value = os.environ.get(env)
    if not value:
        from workers.errors import SpecError

        raise SpecError(f"{key} is {env!r} but that variable is not set on the replica")
    return value


def serve_options(spec=None, **overrides):
    """The app's `ServeSpec`: `spec` (or the defaults) with keyword overrides; `name` is `app_name`
    and `limits` a dict of the limit fields."""
    from serve.config import ServeSpec

    data = (spec or ServeSpec()).model_dump()
    if "name" in overrides:
        overrides["app_name"] = overrides.pop("name")
    data.update(overrides.pop("limits", None) or {})
    data.update(overrides)
    return ServeSpec.model_validate(data)


def group_adapters(adapters: dict[str, str], tracking_uri: str | None = None) -> dict[str, str]:
    """name -> the replica group its method declares (`AdapterMethod.replica_group()`); each group gets
    a model deployment of its own. Each adapter is resolved and verified here, in the driver, so a bad
    reference fails before any replica starts."""
    from workers.methods import method_for_manifest
    from workers.store import resolve

    return {name: method_for_manifest(resolve(ref, tracking_uri=tracking_uri)[1]).replica_group()
            for name, ref in adapters.items()}


def model_deployment_name(group: str) -> str:
    return f"Model-{group}"


def build_app(adapters: dict[str, str], *, base: dict | None = None, tracking_uri: str | None = None,
              spec=None, groups: dict[str, str] | None = None, **overrides):
    """The Serve application for `adapters` on the operator's `base`, configured by a `ServeSpec`
    (`spec`, with keyword overrides of its fields): an ingress over one model deployment per replica
    group (`groups`: name -> group, worked out from the adapters when not given)."""
    sv = serve_options(spec, **overrides)
    if base is None:  # fail in the driver, before any replica starts
        base = operator_base(adapters, tracking_uri)
    if not adapters:
        from workers.errors import SpecError

        raise SpecError("no adapters to serve")
    groups = groups or group_adapters(adapters, tracking_uri)
    options = sv.model_dump(mode="json")
    models = {}
    for group in dict.fromkeys(groups.values()):  # in the adapters' order: the first group takes the base's requests
        mine = {n: ref for n, ref in adapters.items() if groups[n] == group}
        models[group] = ModelServer.options(
            name=model_deployment_name(group), ray_actor_options=sv.actor_options(),
            max_ongoing_requests=sv.max_ongoing_requests, **sv.autoscaling_options(),
        ).bind(mine, base, tracking_uri, options, group)
    return Ingress.options(
        num_replicas=sv.ingress_replicas, ray_actor_options={"num_cpus": sv.ingress_num_cpus},
        max_ongoing_requests=sv.max_ongoing_requests * len(models),
    ).bind(models, groups, tracking_uri, options)


def deploy(adapters: dict[str, str], *, base: dict | None = None, tracking_uri: str | None = None, spec=None,
           **overrides) -> str:
    """Start Serve's HTTP proxy on the spec's host:port (0: a free port), run the app, return its base
    URL. A proxy already running keeps its address; the URL returned is the one it listens on. The
    app's adapter registry starts from `adapters` (whatever an earlier deployment loaded is gone)."""
    from serve.registry import reset

    sv = serve_options(spec, **overrides)
    host, port = sv.host, sv.port
    if port == 0:
        import socket

        with socket.socket() as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
    serve.start(http_options={"host": host, "port": port})
    try:
        from ray.serve.context import _get_global_client

        opts = _get_global_client().http_config
        host, port = opts.host, opts.port
    except (ImportError, AttributeError):
        pass
    if base is None:
        base = operator_base(adapters, tracking_uri)
    groups = group_adapters(adapters, tracking_uri)
    reset(sv.app_name, adapters, groups)
    serve.run(build_app(adapters, base=base, tracking_uri=tracking_uri, spec=sv, groups=groups), name=sv.app_name,
              route_prefix=sv.route_prefix)
    return f"http://{host}:{port}{sv.route_prefix.rstrip('/')}"


def shutdown(name: str | None = None) -> None:
    from serve.registry import drop

    if name:
        serve.delete(name)
        drop(name)
    else:
        serve.shutdown()
