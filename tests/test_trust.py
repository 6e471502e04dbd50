"""Trust comes from the operator, never from an adapter: an adapter whose manifest was edited to name a
model folder shipping Python with `trust_remote_code: true` (every checksum still passing, since the
manifest is not among its own checksums) is refused wherever adapters load, and no code runs; a
registered adapter whose manifest or files change in the artifact store is refused."""

import json
import shutil
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from workers.artifact import verify
from workers.errors import AdapterIntegrityError
from workers.store import MANIFEST_TAG

from helpers import ROOT, make_tiny_llama, spec_for

EVIL_CODE = '''
import pathlib
pathlib.Path({marker!r}).write_text("remote code ran")
from transformers import LlamaConfig
class EvilConfig(LlamaConfig):
    model_type = "llama"
'''


def _evil_model(tiny_llama, tmp_path):
    """A folder with the tiny Llama's weights plus Python that writes a marker file when transformers
    imports it (under trust_remote_code); returns (folder, marker)."""
    marker = tmp_path / "marker"
    model = tmp_path / "evil-model"
    shutil.copytree(tiny_llama, model)
    (model / "evil_config.py").write_text(EVIL_CODE.format(marker=str(marker)))
    cfg = json.loads((model / "config.json").read_text())
    cfg["auto_map"] = {"AutoConfig": "evil_config.EvilConfig"}
    (model / "config.json").write_text(json.dumps(cfg))
    return model, marker


def _edit_manifest(path, **model):
    data = json.loads(path.read_text())
    data["model"].update(model)
    path.write_text(json.dumps(data))


def _evil_copy(trained, tiny_llama, tmp_path):
    """A copy of a trained adapter whose manifest names the evil folder with trust_remote_code."""
    model, marker = _evil_model(tiny_llama, tmp_path)
    folder = tmp_path / "adapter"
    shutil.copytree(trained["folder"], folder)
    _edit_manifest(folder / "adapterflow.json", name=str(model), trust_remote_code=True)
    return {"folder": folder, "marker": marker, "model": model, "spec": trained["spec"]}


@pytest.fixture
def evil(trained_adapters, tiny_llama, tmp_path):
    """The trained LoRA adapter, its manifest edited to name the evil folder with trust_remote_code."""
    return _evil_copy(trained_adapters("lora"), tiny_llama, tmp_path)


@pytest.fixture
def evil_sparta(trained_adapters, tiny_llama, tmp_path):
    """The same edit on a trained SpaRTA adapter (for the SpaRTA API)."""
    return _evil_copy(trained_adapters("sparta"), tiny_llama, tmp_path)


def test_the_planted_code_would_run_if_trusted(evil):
    """Control: the folder really carries code that runs under trust_remote_code (in a subprocess)."""
    code = f"from transformers import AutoConfig; AutoConfig.from_pretrained({str(evil['model'])!r}, trust_remote_code=True)"
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, cwd=ROOT)
    assert evil["marker"].read_text() == "remote code ran"


def test_every_checksum_still_passes(evil):
    assert verify(evil["folder"])["model"]["trust_remote_code"] is True


def test_a_replica_refuses_it_and_runs_no_code(evil):
    """What a replica runs to load its adapters (`build_engine`), with the operator's base."""
    from serve.deploy import build_engine

    with pytest.raises(AdapterIntegrityError, match="trust_remote_code.*refused"):
        build_engine({"a": str(evil["folder"])}, evil["spec"].model.model_dump(mode="json"))
    assert not evil["marker"].exists()


def test_merge_and_the_engine_refuse_it(evil, tmp_path):
    from workers.inference import Engine
    from workers.merge import merge_adapter

    manifest = verify(evil["folder"])
    with pytest.raises(AdapterIntegrityError, match="trust_remote_code.*refused"):
        merge_adapter(evil["folder"], manifest, tmp_path / "merged")
    engine = Engine(evil["spec"].model)
    with pytest.raises(AdapterIntegrityError, match="trust_remote_code.*refused"):
        engine.add_adapter("a", evil["folder"], manifest)
    assert not evil["marker"].exists() and not (tmp_path / "merged").exists()


def test_the_base_is_the_operators_not_the_manifests(trained_adapters, tmp_path):
    """Without the trust flag, a manifest naming another folder still does not choose the base."""
    from serve.deploy import build_engine

    trained = trained_adapters("lora")
    folder = tmp_path / "adapter"
    shutil.copytree(trained["folder"], folder)
    manifest = json.loads((folder / "adapterflow.json").read_text())
    manifest["model"]["name"] = str(tmp_path / "somewhere-else")
    (folder / "adapterflow.json").write_text(json.dumps(manifest))
    engine = build_engine({"a": str(folder)}, trained["spec"].model.model_dump(mode="json"))
    assert engine.spec.name == trained["spec"].model.name
    assert engine.classify("a", ["good great movie"])[0]["label"] in ("negative", "positive")


def test_serving_a_folder_needs_the_operators_base(trained_adapters):
    from pipelines.cli import app

    r = CliRunner().invoke(app, ["serve", str(trained_adapters("lora")["folder"])])
    assert r.exit_code == 2 and "name the base model with --base" in r.stderr


@pytest.fixture
def registered(trained_adapters, tiny_llama, toy_data, tmp_path):
    """The trained LoRA adapter registered in a fresh MLflow store by the pipeline's own code."""
    import mlflow

    from pipelines import tracking

    spec = spec_for(tiny_llama, toy_data, tmp_path)
    uri = tracking.setup(spec)
    run_id = tracking.start_run(spec, {})
    reg = tracking.log_and_register(run_id, trained_adapters("lora")["folder"], spec, {"accuracy": 0.5})
    tracking.end_run(run_id)
    yield {"spec": spec, "uri": uri, "ref": f"models:/{reg.name}/{reg.version}", "alias": f"models:/{reg.name}@champion",
           "store": spec.workspace_path() / "mlartifacts", "name": reg.name, "version": reg.version}
    mlflow.set_tracking_uri(None)


def test_a_registered_adapter_resolves_with_its_recorded_base(registered):
    from workers.store import registered_base, resolve

    folder, manifest = resolve(registered["alias"], tracking_uri=registered["uri"])
    assert manifest["method"] == "lora"
    base = registered_base(registered["ref"], registered["uri"])
    assert base["name"] == registered["spec"].model.name and base["trust_remote_code"] is False


def _stored(registered, name):
    hits = [p for p in registered["store"].rglob(name) if "adapter" in p.parts]
    assert hits, f"no {name} in the artifact store"
    return hits


def test_an_edited_manifest_in_the_artifact_store_is_refused(registered):
    from workers.store import resolve

    for path in _stored(registered, "adapterflow.json"):
        data = json.loads(path.read_text())
        data["model"]["trust_remote_code"] = True  # any edit: the pinned digest no longer matches
        path.write_text(json.dumps(data))
    for ref in (registered["ref"], registered["alias"]):
        with pytest.raises(AdapterIntegrityError, match="differs from the one registered"):
            resolve(ref, tracking_uri=registered["uri"])


def test_an_edited_weight_in_the_artifact_store_is_refused(registered):
    from workers.store import resolve

    for path in _stored(registered, "adapter_model.safetensors"):
        data = bytearray(path.read_bytes())
        data[-1] ^= 0xFF
        path.write_bytes(bytes(data))
    with pytest.raises(AdapterIntegrityError, match="fails its checksum"):
        resolve(registered["ref"], tracking_uri=registered["uri"])


def test_a_registered_version_without_a_pinned_manifest_is_refused(registered):
    """A version registered without the manifest tag (an older adapterflow) is refused, with what to
    do; `allow_unpinned` is the explicit opt-in."""
    import mlflow

    from workers.store import resolve

    mlflow.MlflowClient(tracking_uri=registered["uri"]).delete_model_version_tag(
        registered["name"], registered["version"], MANIFEST_TAG)
    with pytest.raises(AdapterIntegrityError, match="without a pinned manifest.*re-register it with this version"):
        resolve(registered["ref"], tracking_uri=registered["uri"])
    folder, manifest = resolve(registered["ref"], tracking_uri=registered["uri"], allow_unpinned=True)
    assert manifest["method"] == "lora" and (folder / "adapterflow.json").is_file()


# ---------------------------------------------------------------- the MLflow pyfunc model
def _stored_model(registered):
    """(the pyfunc model's adapter folder, its MLmodel file) in the artifact store."""
    (mlmodel,) = [p for p in registered["store"].rglob("MLmodel")]
    return mlmodel.parent / "artifacts" / "adapter", mlmodel


def _edit_model_config(mlmodel, **config):
    import yaml

    data = yaml.safe_load(mlmodel.read_text())
    data["flavors"]["python_function"]["config"].update(config)
    mlmodel.write_text(yaml.safe_dump(data))


def _no_registry(monkeypatch):
    import mlflow

    mlflow.set_tracking_uri(None)
    mlflow.set_registry_uri(None)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)


def test_the_mlflow_model_loads_and_predicts(registered):
    import mlflow

    model = mlflow.pyfunc.load_model(registered["alias"])
    assert model.predict(["good great movie"])["label"][0] in ("negative", "positive")


def test_the_mlflow_model_refuses_an_edited_artifact_and_runs_no_code(registered, tiny_llama, tmp_path):
    """Manifest and MLmodel both edited in the artifact store to name the evil folder with remote code
    (the MLmodel's own digest updated too): the registry's pinned manifest refuses it."""
    import mlflow

    from workers.common import sha256_file

    evil_model, marker = _evil_model(tiny_llama, tmp_path)
    folder, mlmodel = _stored_model(registered)
    _edit_manifest(folder / "adapterflow.json", name=str(evil_model), trust_remote_code=True)
    _edit_model_config(mlmodel, base={"name": str(evil_model), "task": "seq-cls", "trust_remote_code": True},
                       manifest_sha256=sha256_file(folder / "adapterflow.json"))
    for ref in (registered["alias"], str(mlmodel.parent)):
        with pytest.raises(AdapterIntegrityError, match="trust_remote_code.*refused"):
            mlflow.pyfunc.load_model(ref)
    _edit_manifest(folder / "adapterflow.json", trust_remote_code=False)  # the manifest alone no longer asks
    with pytest.raises(AdapterIntegrityError, match="differs from the one registered"):
        mlflow.pyfunc.load_model(registered["alias"])
    assert not marker.exists()


def test_the_mlflow_model_without_a_registry_checks_its_own_record(registered, tiny_llama, tmp_path, monkeypatch):
    """Loaded from a folder with no registry to ask: the manifest digest logged in model_config is
    checked, and that record (in the editable artifact store) can never ask for remote code."""
    import mlflow

    evil_model, marker = _evil_model(tiny_llama, tmp_path)
    folder, mlmodel = _stored_model(registered)
    _no_registry(monkeypatch)
    _edit_model_config(mlmodel, base={"name": str(evil_model), "task": "seq-cls", "trust_remote_code": True})
    with pytest.raises(AdapterIntegrityError, match="model's own record asks for trust_remote_code"):
        mlflow.pyfunc.load_model(str(mlmodel.parent))
    _edit_manifest(folder / "adapterflow.json", name=str(evil_model))
    with pytest.raises(AdapterIntegrityError, match="differs from the one logged with the model"):
        mlflow.pyfunc.load_model(str(mlmodel.parent))
    assert not marker.exists()


# ---------------------------------------------------------------- admin routes: what may be loaded
def test_admin_routes_load_only_registry_references_and_allow_listed_folders(tmp_path):
    from serve.registry import allowed

    root = tmp_path / "adapters"
    (root / "a").mkdir(parents=True)
    (tmp_path / "outside").mkdir()
    (root / "link").symlink_to(tmp_path / "outside")
    roots = [str(root)]
    for ref in ("models:/sentiment@champion", "models:/sentiment/3", str(root / "a"), str(root)):
        assert allowed(ref, roots), ref
    for ref in ("runs:/0123abcd/adapter", "mlflow-artifacts:/1/abc/artifacts/adapter", "models:/m-0123abcd",
                "models:/sentiment", "s3://bucket/adapter", str(tmp_path / "outside"),
                str(root / ".." / "outside"), str(root / "link"), f"{root}/a\x00"):  # (a NUL byte: found by fuzzing)
        assert not allowed(ref, roots), ref
    assert not allowed(str(root / "a"), [])  # no roots: registry references only
    assert allowed("models:/sentiment@champion", [])


# ---------------------------------------------------------------- the SpaRTA API and merge
def test_the_sparta_api_refuses_it_and_runs_no_code(evil_sparta, tiny_llama):
    from workers.sparta import SpaRTAforCausalLM, SpaRTAforSequenceClassification

    for base in (None, str(tiny_llama), {"name": str(tiny_llama), "dtype": "float32"}):
        with pytest.raises(AdapterIntegrityError, match="trust_remote_code.*refused"):
            SpaRTAforSequenceClassification(evil_sparta["folder"], base=base)
    with pytest.raises(AdapterIntegrityError, match="trust_remote_code.*refused"):
        SpaRTAforCausalLM(evil_sparta["folder"], base=str(tiny_llama))
    assert not evil_sparta["marker"].exists()


def test_the_sparta_api_builds_the_operators_base_checked_by_digest(trained_adapters, tiny_llama, tmp_path):
    from workers.sparta import SpaRTAforSequenceClassification

    folder = tmp_path / "adapter"
    shutil.copytree(trained_adapters("sparta")["folder"], folder)
    _edit_manifest(folder / "adapterflow.json", name=str(tmp_path / "somewhere-else"))
    clf = SpaRTAforSequenceClassification(folder, base=str(tiny_llama))
    assert clf.model_name == str(tiny_llama)
    assert clf.decide_class(["good great movie"])[0] in ("negative", "positive")
    other = make_tiny_llama(tmp_path / "other-llama", seed=1)  # same shapes, other weights
    with pytest.raises(AdapterIntegrityError, match="load it on the base it was trained on"):
        SpaRTAforSequenceClassification(folder, base={"name": str(other)})


def test_merging_a_folder_needs_the_operators_base(trained_adapters, tmp_path):
    from pipelines.cli import app

    r = CliRunner().invoke(app, ["merge", str(trained_adapters("lora")["folder"]), "-o", str(tmp_path / "out")])
    assert r.exit_code == 2 and "name the base model with --base" in r.stderr
    assert not (tmp_path / "out").exists()
