"""The adapter artifact: manifest, checksums, tampering, pickles, wrong base."""

import json

import pytest
from safetensors.torch import save_file

from workers.artifact import MANIFEST, check_base, read_manifest, sha256_file, verify, write_manifest
from workers.errors import AdapterIntegrityError, UnknownAdapterError
from workers.store import resolve


@pytest.fixture
def artifact(tmp_path):
    import torch

    d = tmp_path / "adapter"
    d.mkdir()
    save_file({"w": torch.arange(6.0).reshape(2, 3)}, str(d / "adapter_model.safetensors"))
    (d / "adapter_config.json").write_text(json.dumps({"r": 8}))
    write_manifest(d, method="lora", model={"name": "package:x", "task": "seq-cls"}, base_sha256="ab" * 32)
    return d


def test_manifest_records_every_file(artifact):
    m = read_manifest(artifact)
    assert set(m["files"]) == {"adapter_model.safetensors", "adapter_config.json"}
    assert m["files"]["adapter_model.safetensors"] == sha256_file(artifact / "adapter_model.safetensors")
    assert m["weights"] == {"adapter_model.safetensors": m["files"]["adapter_model.safetensors"]}
    assert m["method"] == "lora" and m["base_model"] == {"name": "package:x", "sha256": "ab" * 32}
    assert verify(artifact) == m


def test_tampered_file_names_file_and_checksum(artifact):
    data = bytearray((artifact / "adapter_model.safetensors").read_bytes())
    data[-1] ^= 1
    (artifact / "adapter_model.safetensors").write_bytes(bytes(data))
    with pytest.raises(AdapterIntegrityError, match="'adapter_model.safetensors' fails its checksum"):
        verify(artifact)


def test_missing_file_and_missing_manifest(artifact):
    (artifact / "adapter_config.json").unlink()
    with pytest.raises(AdapterIntegrityError, match="'adapter_config.json' listed in the manifest is missing"):
        verify(artifact)
    (artifact / MANIFEST).unlink()
    with pytest.raises(AdapterIntegrityError, match="no adapterflow.json"):
        verify(artifact)


def test_pickle_files_are_refused(artifact):
    (artifact / "extra.bin").write_bytes(b"\x80\x04")
    with pytest.raises(AdapterIntegrityError, match="not in the manifest"):
        verify(artifact)
    write_manifest(artifact, method="lora", model={"name": "x", "task": "seq-cls"}, base_sha256=None)
    with pytest.raises(AdapterIntegrityError, match="pickle"):
        verify(artifact)
    assert verify(artifact, allow_pickle=True)["method"] == "lora"


def test_wrong_base_is_refused(artifact):
    m = read_manifest(artifact)
    check_base(m, "ab" * 32)
    with pytest.raises(AdapterIntegrityError, match="trained on base 'package:x'"):
        check_base(m, "cd" * 32)


def test_store_resolves_folders_and_rejects_unknown(artifact, tmp_path):
    folder, manifest = resolve(str(artifact))
    assert folder == artifact and manifest["method"] == "lora"
    with pytest.raises(UnknownAdapterError, match="no such folder"):
        resolve(str(tmp_path / "missing"))
