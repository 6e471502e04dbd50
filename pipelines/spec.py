"""The pipeline spec: a YAML file validated by pydantic.

Unknown keys and wrong types are errors that name the key path and the expected type, e.g.
`adapter.r: expected an integer, got 'eight'`. `--set a.b=v` overrides any key.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, model_validator

from serve.config import ServeSpec
from tune.config import TuneSpec, sparsifies
from workers.common import StrictModel, set_key_path
from workers.config import (
    PLUGINS_DESCRIPTION,
    AdapterSpec,
    DataSpec,
    ModelSpec,
    SparsifySpec,
    TrainSpec,
    check_batching,
    check_sections,
    import_plugins,
)
from workers.errors import SpecError

DEFAULT_SELECTION = {"seq-cls": ("accuracy", True), "causal-lm": ("eval_loss", False)}


class TrackSpec(StrictModel):
    tracking_uri: str | None = Field(
        None,
        description="MLflow tracking URI; default sqlite:///<workspace>/mlflow.db with artifacts "
        "in <workspace>/mlartifacts. Any 'mlflow server' URI works.",
    )
    experiment: str = Field("adapterflow", description="MLflow experiment name.")
    registered_model: str | None = Field(
        None, description="Registry name the adapter is registered under (default: spec name)."
    )
    alias: str = Field("champion", description="Alias moved to a new version that is at least as good.")
    selection_metric: str | None = Field(
        None, description="Metric deciding the alias (default: accuracy for seq-cls, eval_loss for causal-lm)."
    )
    greater_is_better: bool | None = Field(None, description="Direction of selection_metric.")
    flush_timeout_s: float = Field(
        30.0, ge=0, description="At the end of training, how long rank 0 waits for step metrics that an "
        "unreachable tracking server held back; what is still unsent then, the driver sends with the results.",
    )

    def selection(self, task: str) -> tuple[str, bool]:
        metric, greater = DEFAULT_SELECTION[task]
        if self.selection_metric is not None:
            metric = self.selection_metric
            greater = not metric.endswith(("loss", "perplexity")) if self.greater_is_better is None else greater
        if self.greater_is_better is not None:
            greater = self.greater_is_better
        return metric, greater


class PipelineSpec(StrictModel):
    name: str = Field(..., pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", description="Pipeline name.")
    workspace: str = Field(
        ".adapterflow", description="Folder for MLflow's SQLite store, artifacts and Ray results."
    )
    ray_address: str | None = Field(None, description="Ray cluster address; null = local instance.")
    plugins: list[str] = Field(default_factory=list, description=PLUGINS_DESCRIPTION)
    model: ModelSpec
    data: DataSpec
    adapter: AdapterSpec
    train: TrainSpec = Field(default_factory=TrainSpec)
    track: TrackSpec = Field(default_factory=TrackSpec)
    serve: ServeSpec = Field(default_factory=ServeSpec)
    sparsify: SparsifySpec = Field(default_factory=SparsifySpec)
    tune: TuneSpec | None = Field(None, description="What `adapterflow tune SPEC` searches (null: no search).")
    version: Literal[1] = Field(1, description="Spec format version.")

    @model_validator(mode="before")
    @classmethod
    def _plugins(cls, data):
        return import_plugins(data)

    @model_validator(mode="after")
    def _check(self):
        if self.model.task == "causal-lm" and (self.model.num_labels or self.model.id2label):
            raise ValueError("model.num_labels/id2label apply to seq-cls only; remove them for causal-lm")
        try:
            check_sections(self.model, self.adapter, self.train)
            check_batching(self.model, self.adapter, self.data)
        except SpecError as exc:
            raise ValueError(str(exc)) from None
        if self.tune is not None:
            self._check_search()
        return self

    def _check_search(self) -> None:
        """Every search-space key path names a key of this spec, and every value it can take (each
        listed value, a range's bounds) makes a valid spec; ASHA needs single-process trials."""
        t = self.tune
        if t.nls is not None:
            from workers.methods import method_of, methods

            if t.nls.super_adapter is None and not method_of(self.adapter).subadapters:
                able = ", ".join(sorted(n for n, m in methods().items() if m.subadapters))
                raise ValueError(f"tune.nls: no super_adapter is given, so the spec's adapter is trained as one, but "
                                 f"adapter.method {self.adapter.method} has no sub-adapters to search: use one that "
                                 f"has ({able}) or set tune.nls.super_adapter")
            return
        if t.scheduler == "asha" and self.train.num_workers > 0:
            raise ValueError(
                "tune.scheduler: asha stops trials early, which needs single-process trials: set "
                "train.num_workers: 0 (ASHA stopping a trial that runs Ray Train workers hangs on Ray 2.60, "
                "ray-project/ray#54305), or use scheduler: fifo")
        if sparsifies(t.space):
            self._check_sweep()
        base = self.model_dump(mode="json", exclude={"tune"})
        for path, dist in t.space.items():
            top = path.split(".")[0]
            if top not in SEARCHABLE:
                raise ValueError(f"tune.space.{path}: only keys under {', '.join(SEARCHABLE)} can be searched")
            node = base
            for part in path.split("."):
                if not isinstance(node, dict) or part not in node:
                    raise ValueError(f"tune.space.{path}: not a key of this spec ({_allowed_at(base, path)})")
                node = node[part]
            for value in dist.candidates():
                trial = json.loads(json.dumps(base))
                set_key_path(trial, path, value)
                try:
                    PipelineSpec.model_validate(trial)
                except ValidationError as err:
                    why = "; ".join(format_errors(err, trial))
                    raise ValueError(f"tune.space.{path}: the value {value!r} does not make a valid spec: {why}") from None

    def _check_sweep(self) -> None:
        """A space with sparsify.* keys: every trial writes its own sparse base, calibrated on data no
        trial is selected or evaluated on."""
        if self.sparsify.output:
            raise ValueError(
                "sparsify.output: with sparsify.* keys in tune.space every trial writes its sparse base to "
                "<workspace>/sparse/<name>-search/<trial id>; remove sparsify.output (or set it to null)")
        from workers.data import SPLIT_ALIASES

        evals = self.data.eval_split
        if evals and self.sparsify.split in SPLIT_ALIASES.get(evals, (evals,)):
            raise ValueError(
                f"sparsify.split: {self.sparsify.split!r} is the evaluation split, which scores only the "
                f"search's winner; calibrate the trials on the training split: sparsify.split: "
                f"{self.data.train_split}")

    def with_absolute_paths(self, base: Path | None = None) -> PipelineSpec:
        """Local model and data paths made absolute, so Ray workers (other cwd) find them."""
        base = base or Path.cwd()
        out = self.model_copy(deep=True)
        for section, key in ((out.model, "name"), (out.data, "path")):
            value = getattr(section, key)
            p = Path(value).expanduser()
            if not value.startswith("package:") and not p.is_absolute() and (base / p).exists():
                setattr(section, key, str((base / p).resolve()))
        for name, ref in out.serve.adapters.items():  # adapter folders: replicas run elsewhere
            p = Path(ref).expanduser()
            if not ref.startswith(("models:/", "runs:/")) and not p.is_absolute() and (base / p).exists():
                out.serve.adapters[name] = str((base / p).resolve())
        out.workspace = str(self.workspace_path())
        return out

    def registered_model_name(self) -> str:
        return self.track.registered_model or self.name

    def workspace_path(self) -> Path:
        return Path(self.workspace).expanduser().resolve()


SEARCHABLE = ("model", "data", "adapter", "train", "sparsify")


def _allowed_at(data: dict, path: str) -> str:
    """The keys that do exist where `path` stops matching."""
    node = data
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            break
        node = node[part]
    return f"keys here: {', '.join(sorted(node))}" if isinstance(node, dict) else "it is not a mapping"


# ---------------------------------------------------------------- errors that name the key path
_EXPECTED = {
    "int_parsing": "expected an integer",
    "int_type": "expected an integer",
    "int_from_float": "expected an integer",
    "float_parsing": "expected a number",
    "float_type": "expected a number",
    "bool_parsing": "expected true or false",
    "bool_type": "expected true or false",
    "string_type": "expected a string",
    "dict_type": "expected a mapping",
    "model_type": "expected a mapping",
    "list_type": "expected a list",
}


def _key_path(loc: tuple) -> str:
    parts: list[str] = []
    for item in loc:
        if isinstance(item, int):
            parts[-1:] = [f"{parts[-1]}[{item}]"] if parts else [f"[{item}]"]
        elif item in ("function-after", "literal", "union") or str(item).startswith(("list[", "dict[")):
            continue
        else:
            parts.append(str(item))
    return ".".join(parts) or "(top level)"


def format_errors(err: ValidationError, data: dict | None = None) -> list[str]:
    lines = []
    adapter = (data or {}).get("adapter")
    method = adapter.get("method") if isinstance(adapter, dict) else None
    for e in err.errors():
        path = _key_path(tuple(e["loc"]))
        kind = e["type"]
        got = e.get("input")
        if kind == "extra_forbidden":
            loc = tuple(e["loc"])
            allowed = _allowed_for_method(method) if loc[:1] == ("adapter",) else _allowed(path)
            lines.append(f"{path}: unknown key; remove it or check its spelling ({allowed})")
        elif kind == "missing":
            lines.append(f"{path}: required key is missing")
        elif kind in _EXPECTED:
            lines.append(f"{path}: {_EXPECTED[kind]}, got {got!r}")
        elif kind == "union_tag_invalid":
            tags = e.get("ctx", {}).get("expected_tags", "")
            lines.append(f"{path}.method: unknown method {e['ctx']['tag']!r}; expected one of {tags}")
        elif kind == "union_tag_not_found":
            lines.append(f"{path}.method: required key is missing")
        elif kind == "value_error":
            msg = str(e["msg"]).removeprefix("Value error, ")
            if path.startswith("tune.") and not msg.startswith("tune."):  # a distribution's own check
                msg = f"{path}: {msg}"
            lines.append(msg)
        else:
            lines.append(f"{path}: {e['msg']}, got {got!r}")
    return lines


def _allowed_for_method(method) -> str:
    from workers.methods import methods

    found = methods().get(method) if isinstance(method, str) else None
    if found is None:
        return "see `adapterflow schema`"
    return f"allowed for method {method}: {', '.join(sorted(found.spec_class.model_fields))}"


def _allowed(path: str) -> str:
    node: Any = PipelineSpec
    for part in path.split(".")[:-1]:
        field = getattr(node, "model_fields", {}).get(part.split("[")[0])
        if field is None:
            return "see `adapterflow schema`"
        node = field.annotation
    names = sorted(getattr(node, "model_fields", {}))
    return f"allowed here: {', '.join(names)}" if names else "see `adapterflow schema`"


# ---------------------------------------------------------------- overrides and loading
def apply_override(data: dict, assignment: str) -> None:
    """Apply one `a.b.c=value` override in place; value is parsed as YAML (numbers, lists...)."""
    if "=" not in assignment:
        raise SpecError(f"--set {assignment!r}: expected KEY.PATH=VALUE, e.g. --set train.lr=1e-4")
    key, raw = assignment.split("=", 1)
    if not [p for p in key.strip().split(".") if p]:
        raise SpecError(f"--set {assignment!r}: empty key path")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
        if isinstance(value, int) and re.fullmatch(r"\s*\d+:\d+\s*", raw):
            value = raw.strip()  # N:M, not YAML 1.1's base-60 integer
    except yaml.YAMLError as exc:
        raise SpecError(f"--set {key}: value {raw!r} is not valid YAML: {exc}") from None
    try:
        set_key_path(data, key, value)
    except ValueError as exc:
        raise SpecError(f"--set {key}: {exc}") from None


def load_spec_dict(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> dict:
    p = Path(path)
    if not p.is_file():
        raise SpecError(f"spec file {str(p)!r} not found; pass the path of a pipeline YAML file")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        raise SpecError(f"{p}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise SpecError(f"{p}: a pipeline spec is a YAML mapping with keys name, model, data, adapter, ...")
    for assignment in overrides:
        apply_override(data, assignment)
    return data


def parse_spec(data: dict, source: str = "spec") -> PipelineSpec:
    try:
        return PipelineSpec.model_validate(data).with_absolute_paths()
    except ValidationError as err:
        lines = format_errors(err, data)
        raise SpecError(f"{source} is invalid:\n  " + "\n  ".join(lines)) from None


def load_spec(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> PipelineSpec:
    spec = parse_spec(load_spec_dict(path, overrides), source=str(path))
    return spec


def schema_model() -> type[PipelineSpec]:
    """PipelineSpec with `adapter` spelled out as the union of every registered method's spec (the
    validating model looks methods up at validation time, so plugins registered later validate)."""
    from typing import Annotated, Union

    from pydantic import create_model

    from workers.methods import methods

    classes = tuple(m.spec_class for m in methods().values())
    union = Annotated[Union[classes], Field(discriminator="method")]
    return create_model("PipelineSpec", __base__=PipelineSpec, __doc__=PipelineSpec.__doc__,
                        adapter=(union, ...))


def json_schema() -> str:
    return json.dumps(schema_model().model_json_schema(), indent=2)


def flatten(data: Any, prefix: str = "") -> dict[str, str]:
    """{'a': {'b': 1}} -> {'a.b': '1'}: the spec as MLflow params."""
    out: dict[str, str] = {}
    if isinstance(data, dict):
        for k, v in data.items():
            out.update(flatten(v, f"{prefix}{k}."))
    else:
        out[prefix[:-1]] = json.dumps(data) if isinstance(data, (list, type(None), bool)) else str(data)
    return out
