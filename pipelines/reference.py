"""The spec reference (docs/spec-reference.md), generated from the spec's pydantic models: one table
per section, one per registered adapter method. `adapterflow schema --markdown` prints it."""

from __future__ import annotations

import json
import typing

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

HEADER = """# Spec reference

Generated from the spec's schema by `adapterflow schema --markdown` (a test fails when this file
differs from what the code generates). A spec is a YAML mapping; unknown keys and wrong types are
errors naming the key path. How to write one: [the user guide](user-guide.md#writing-a-spec).
"""


def _type(annotation) -> str:
    if annotation is None or annotation is type(None):
        return "null"
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Literal:
        return " \\| ".join(json.dumps(a) for a in args)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return " \\| ".join(_type(a) for a in args)
    if origin is typing.Annotated:
        return _type(args[0])
    if origin in (list, tuple):
        return f"list[{', '.join(_type(a) for a in args)}]"
    if origin is dict:
        return f"map[{', '.join(_type(a) for a in args)}]"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "mapping"
    return getattr(annotation, "__name__", str(annotation))


def _default(field) -> str:
    if field.default_factory is not None:
        value = field.default_factory()
        return f"`{json.dumps(value.model_dump(mode='json') if isinstance(value, BaseModel) else value)}`"
    if field.default is PydanticUndefined:
        return "**required**"
    return f"`{json.dumps(field.default)}`"


def _model_of(annotation) -> type[BaseModel] | None:
    """The config section a field holds: a model, or an optional one (`X | None`)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if len(args) == 1 and isinstance(args[0], type) and issubclass(args[0], BaseModel):
        return args[0]
    return None


def _table(model: type[BaseModel], prefix: str, skip: tuple[str, ...] = ()) -> list[str]:
    rows = ["| key | type | default | meaning |", "|---|---|---|---|"]
    nested = []
    for name, field in model.model_fields.items():
        if name in skip:
            continue
        text = (field.description or "").replace("|", "\\|").replace("\n", " ")
        rows.append(f"| `{prefix}{name}` | {_type(field.annotation)} | {_default(field)} | {text} |")
        inner = _model_of(field.annotation)
        if inner is not None:
            nested.append((f"{prefix}{name}.", inner))
    for sub, inner in nested:  # a section inside a section: its keys below
        rows += ["", f"`{sub}*`:", ""] + _table(inner, sub)
    return rows


def markdown() -> str:
    from pipelines.spec import PipelineSpec
    from workers.methods import methods

    out = [HEADER, "## Top level", ""]
    sections = {n: f for n, f in PipelineSpec.model_fields.items() if n != "adapter" and _model_of(f.annotation)}
    top = [n for n in PipelineSpec.model_fields if n not in sections and n != "adapter"]
    out += _table(PipelineSpec, "", skip=tuple(n for n in PipelineSpec.model_fields if n not in top))
    for name, field in sections.items():
        out += ["", f"## `{name}`", ""]
        model = _model_of(field.annotation)
        doc = (model.__doc__ or "").strip()
        if doc and not doc.startswith(("A config section", "Usage docs")):
            out += [doc, ""]
        out += _table(model, f"{name}.")
    out += ["", "## `adapter`", "",
            "`adapter.method` picks the method; each method has its own keys. Methods registered by plugins "
            "(`plugins:`) add their own sections at run time.", ""]
    builtin = {n: m for n, m in methods().items() if type(m).__module__.startswith("workers.methods.")}
    for name, method in sorted(builtin.items()):
        out += [f"### `adapter.method: {name}`", ""]
        out += _table(method.spec_class, "adapter.", skip=("method",))
        out += [""]
    return "\n".join(out).rstrip() + "\n"
