"""The CLI's user-error paths: each prints what is wrong and what to do, one problem per line and no
line wrapped, no traceback (unless --debug), exit code 2."""

import shutil

import pytest
from typer.testing import CliRunner

from pipelines.cli import app

from helpers import make_tiny_llama, spec_for


def run(*args):
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result.exit_code, result.stderr, result.stdout


def user_error(code, err):
    assert code == 2, err
    assert err.startswith("error: "), err
    assert "Traceback" not in err
    return err


def write_spec(tmp_path, spec) -> str:
    import yaml

    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec.model_dump(mode="json")))
    return path


def test_bad_spec_key(tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text("name: x\nmodel: {name: m}\ndata: {path: d}\nadapter: {method: lora, rank: 8}\n"
                    "train: {lr: fast}\n")
    err = user_error(*run("validate", spec)[:2])
    lines = err.splitlines()
    assert lines[0] == f"error: {spec} is invalid:"
    # one problem per line, each whole however long (never wrapped mid-line)
    assert any(line.startswith("  adapter.rank: unknown key; remove it or check its spelling (allowed for method lora: ")
               and line.endswith("use_rslora)") for line in lines), lines
    assert "  train.lr: expected a number, got 'fast'" in lines


def test_missing_data_file(tiny_llama, tmp_path):
    spec = spec_for(tiny_llama, tmp_path / "no-such-data.tsv", tmp_path)
    err = user_error(*run("train", write_spec(tmp_path, spec), "--no-register")[:2])
    assert "data.path" in err and "no-such-data.tsv" in err and "no such file or folder" in err


def test_unknown_adapter(tmp_path):
    err = user_error(*run("merge", tmp_path / "nowhere", "-o", tmp_path / "out")[:2])
    assert "no such folder or MLflow URI" in err and "nowhere" in err


@pytest.fixture
def artifact(trained_adapters, tmp_path):
    folder = tmp_path / "adapter"
    shutil.copytree(trained_adapters("lora")["folder"], folder)
    return folder


def test_tampered_artifact(artifact, tmp_path):
    weights = artifact / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    err = user_error(*run("merge", artifact, "-o", tmp_path / "merged")[:2])
    assert "adapter_model.safetensors" in err and "fails its checksum" in err
    assert not (tmp_path / "merged").exists()


def test_wrong_base(artifact, tmp_path):
    """The operator's --base is another model (same shapes, different weights): refused before loading."""
    other = make_tiny_llama(tmp_path / "other-llama", seed=1)
    err = user_error(*run("merge", artifact, "-o", tmp_path / "merged", "--base", other)[:2])
    assert "trained on base" in err and "load it on the base it was trained on" in err
    assert not (tmp_path / "merged").exists()


def test_no_subadapters_of_a_method_without_them(artifact, tmp_path):
    err = user_error(*run("extract-subadapter", artifact, "-o", tmp_path / "sub")[:2])
    assert "a lora adapter, which has no sub-adapters to extract" in err


def test_debug_shows_the_traceback(tmp_path):
    code, err, _ = run("--debug", "merge", tmp_path / "nowhere", "-o", tmp_path / "out")
    assert code == 2 and "Traceback" in err and "UnknownAdapterError" in err
