"""The application builder a Ray Serve config file names (a KubeRay RayService's `serveConfigV2`):

```yaml
applications:
  - name: adapterflow
    route_prefix: /
    import_path: serve.builder:app_builder
    args:
      adapters: {sentiment: "models:/sentiment-minilm-lora@champion"}   # name -> registry ref or folder
      tracking_uri: http://adapterflow-mlflow:5000   # default: $MLFLOW_TRACKING_URI
      base: {name: FacebookAI/roberta-large}        # default: the base the registry recorded
      serve: {app_name: adapterflow, num_cpus: 1}   # the spec's serve section (serve/config.py)
```

Ray Serve calls `app_builder(args)` and runs what it returns: `serve.deploy.build_app` over the
adapters, as `adapterflow serve` does. `serve.app_name` names the app's adapter registry and must be
the application's `name`. Arguments are checked before anything is resolved: an unknown key or a bad
value is a `SpecError` naming its key path (`args.serve.num_replicas: ...`). `parse_args` is that check
alone (no Ray, no MLflow); `build(parsed)` builds the application from checked arguments.
"""

from __future__ import annotations

import os
import re

from pydantic import Field, ValidationError, field_validator, model_validator

from serve.config import ServeSpec
from workers.common import StrictModel
from workers.config import ModelSpec
from workers.errors import SpecError


class BuilderArgs(StrictModel):
    """The `args` of an application whose import_path is `serve.builder:app_builder`."""

    adapters: dict[str, str] = Field(
        ..., description="Adapters to serve: name -> registry reference (models:/NAME@ALIAS, models:/NAME/N) "
        "or adapter folder. All share the replica's base model.")
    tracking_uri: str | None = Field(
        None, description="MLflow tracking URI the registry references resolve against (default: the "
        "MLFLOW_TRACKING_URI the Ray nodes have).")
    base: ModelSpec | None = Field(
        None, description="The operator's base model (a spec's model section); default: the base the registry "
        "recorded when the adapters were registered (a plain folder has none: then name it).")
    serve: ServeSpec = Field(default_factory=ServeSpec, description="The app's options (a spec's serve section).")
    reset_registry: bool = Field(
        True, description="Start the app's live adapter registry from `adapters` (what an earlier deployment of "
        "the app loaded at run time is gone), as `adapterflow serve` does.")

    @field_validator("adapters")
    @classmethod
    def _adapters(cls, value: dict[str, str]) -> dict[str, str]:
        if not value:
            raise ValueError("name at least one adapter (name: models:/NAME@ALIAS or a folder)")
        for name, ref in value.items():
            if not name.strip():
                raise ValueError("an adapter name is empty")
            if not ref.strip():
                raise ValueError(f"adapter {name!r} has an empty reference")
        return value

    @model_validator(mode="after")
    def _check(self):
        if self.serve.adapters:
            raise ValueError("serve.adapters: list every adapter under args.adapters")
        return self

    def resolved_tracking_uri(self) -> str | None:
        return self.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or None


def _key_path(loc: tuple) -> str:
    parts = ["args"]
    for item in loc:
        if isinstance(item, int):
            parts[-1] = f"{parts[-1]}[{item}]"
        elif item in ("function-after", "function-before", "literal", "union") or str(item).startswith(("list[", "dict[")):
            continue
        else:
            parts.append(str(item))
    return ".".join(parts)


def _allowed(loc: tuple) -> str:
    model = BuilderArgs
    for part in loc[:-1]:
        field = getattr(model, "model_fields", {}).get(part)
        annotation = getattr(field, "annotation", None)
        model = next((a for a in (annotation, *getattr(annotation, "__args__", ())) if hasattr(a, "model_fields")),
                     None)
        if model is None:
            return ""
    return "; allowed here: " + ", ".join(sorted(model.model_fields))


def _messages(err: ValidationError) -> list[str]:
    lines = []
    for e in err.errors():
        loc = tuple(e["loc"])
        path = _key_path(loc)
        if e["type"] == "extra_forbidden":
            lines.append(f"{path}: unknown key{_allowed(loc)}")
        elif e["type"] == "missing":
            lines.append(f"{path}: required key is missing")
        elif e["type"] == "value_error":  # our validators' messages, some already naming their key
            msg = str(e["msg"]).removeprefix("Value error, ")
            named = re.match(r"([\w.\[\]]+): ", msg)
            rel = path.removeprefix("args").removeprefix(".")
            if named and (not rel or rel.endswith(named.group(1))):
                lines.append(f"args.{msg}")
            else:
                lines.append(f"{path}: {msg}")
        else:
            got = f", got {e['input']!r}" if not isinstance(e.get("input"), dict) else ""
            lines.append(f"{path}: {e['msg']}{got}")
    return lines


def parse_args(args: dict | None) -> BuilderArgs:
    """The builder's arguments checked (no Ray, no MLflow): a `SpecError` names each bad key."""
    if args is None:
        args = {}
    if not isinstance(args, dict):
        raise SpecError(f"serve.builder:app_builder args: expected a mapping, got {type(args).__name__}")
    try:
        return BuilderArgs.model_validate(args)
    except ValidationError as err:
        raise SpecError("serve.builder:app_builder args are invalid:\n  " + "\n  ".join(_messages(err))) from None


def build(parsed: BuilderArgs):
    """The bound Serve application for checked arguments (resolves and verifies every adapter here,
    so a bad reference fails the deployment before any replica starts)."""
    from serve.deploy import build_app, group_adapters, operator_base

    uri = parsed.resolved_tracking_uri()
    adapters = dict(parsed.adapters)
    base = parsed.base.model_dump(mode="json") if parsed.base else operator_base(adapters, uri)
    groups = group_adapters(adapters, uri)
    if parsed.reset_registry:
        import ray

        if ray.is_initialized():
            from serve.registry import reset

            reset(parsed.serve.app_name, adapters, groups)
    return build_app(adapters, base=base, tracking_uri=uri, spec=parsed.serve, groups=groups)


def app_builder(args: dict):
    """What a Serve config's `import_path: serve.builder:app_builder` calls with the application's `args`."""
    return build(parse_args(args))
