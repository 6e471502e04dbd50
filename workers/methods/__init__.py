"""Adapter methods: one package per method behind the contract in `base.py`, found through one
registry.

Built-in methods are the packages listed in `BUILTIN`; each registers itself with one
`register_method(...)` call. A method from outside the package registers the same way from its own
module, which a spec names under `plugins: [my_pkg.my_method]` (imported by the driver, every Ray
Train worker and every Serve replica) or which an installed distribution declares in the entry-point
group `adapterflow.methods`.
"""

from __future__ import annotations

import importlib
import logging
from pathlib import Path

from workers.errors import PluginError, SpecError
from workers.methods.base import AdapterMethod, MethodSpec

log = logging.getLogger(__name__)

# the built-in methods; adding one = one package + one line here
BUILTIN = (
    "workers.methods.lora",
    "workers.methods.ia3",
    "workers.methods.pvera",
    "workers.methods.alora",
    "workers.methods.sparsepeft",
    "workers.methods.qa_sparsepeft",
    "workers.methods.nls",
    "workers.methods.sparta",
)
ENTRY_POINT_GROUP = "adapterflow.methods"

_REGISTRY: dict[str, AdapterMethod] = {}
_loaded = False


def register_method(method: AdapterMethod) -> AdapterMethod:
    """Make `method` known by its name; its spec class must be a MethodSpec whose `method` field
    defaults to that name."""
    cls = getattr(method, "spec_class", None)
    name = getattr(method, "name", None)
    if not isinstance(method, AdapterMethod) or not name or cls is None or not issubclass(cls, MethodSpec):
        raise PluginError(f"{method!r}: a method is an AdapterMethod instance with a name and a MethodSpec spec_class")
    field = cls.model_fields.get("method")
    if field is None or field.default != name:
        raise PluginError(f"method {name!r}: its spec class {cls.__name__} must declare "
                          f"method: Literal[{name!r}] = {name!r}")
    known = _REGISTRY.get(name)
    if known is not None and type(known) is not type(method):
        raise PluginError(f"method {name!r} is registered already (by {type(known).__module__})")
    _REGISTRY[name] = method
    return method


def _load_builtins() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for path in BUILTIN:
        importlib.import_module(path)
    from importlib.metadata import entry_points

    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            ep.load()
        except Exception as exc:  # noqa: BLE001 - a broken third-party plugin must not hide the others
            log.warning("method plugin %s (%s) failed to load: %s", ep.name, ep.value, exc)


def load_plugins(paths: list[str] | tuple[str, ...]) -> None:
    """Import plugin modules by import path; each registers its methods on import."""
    for path in paths:
        try:
            importlib.import_module(path)
        except ImportError as exc:
            raise PluginError(f"plugins: cannot import {path!r} ({exc}); install it or check the name") from None


def get_method(name: str) -> AdapterMethod:
    _load_builtins()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise SpecError(f"adapter.method: unknown method {name!r}; known methods: {', '.join(sorted(_REGISTRY))} "
                        "(a plugin's method needs its module under plugins:)") from None


def methods() -> dict[str, AdapterMethod]:
    """Every registered method by name."""
    _load_builtins()
    return dict(_REGISTRY)


def method_of(spec: MethodSpec) -> AdapterMethod:
    return get_method(spec.method)


def parse_adapter(value) -> MethodSpec:
    """An `adapter` section (a mapping) validated by its method's spec class; pydantic reports the
    spec class's errors under the `adapter.` key path."""
    if isinstance(value, MethodSpec):
        return value
    if not isinstance(value, dict):
        raise ValueError(f"adapter: expected a mapping with a method key, got {value!r}")
    if "method" not in value:
        raise ValueError(f"adapter.method: required key is missing; known methods: {', '.join(sorted(methods()))}")
    method = value["method"]
    if not isinstance(method, str) or method not in methods():
        raise ValueError(f"adapter.method: unknown method {method!r}; expected one of "
                         f"{', '.join(sorted(methods()))} (a plugin's method needs its module under plugins:)")
    return get_method(method).spec_class.model_validate(value)


def method_for_manifest(manifest: dict) -> AdapterMethod:
    """The method of a saved adapter, importing the plugins its manifest names first."""
    load_plugins(manifest.get("plugins") or [])
    return get_method(manifest["method"])


def manifest_spec(manifest: dict) -> MethodSpec | None:
    """The adapter spec an artifact's manifest records, validated by its method (None when the
    manifest records none)."""
    method = method_for_manifest(manifest)
    data = manifest.get("adapter")
    if not data:
        return None
    return method.spec_class.model_validate({**data, "method": method.name})


# ---------------------------------------------------------------- the hooks, by method name
def attach(model, spec: MethodSpec, task: str, tokenizer=None, prompt_format: str | None = None):
    return method_of(spec).attach(model, spec, task, tokenizer=tokenizer, prompt_format=prompt_format)


def load(base, folder, method: str, adapter_name: str = "default"):
    return get_method(method).load(base, Path(folder), adapter_name)


def add(model, folder, method: str, adapter_name: str) -> None:
    get_method(method).add(model, Path(folder), adapter_name)
