"""The adapter artifact: one folder of safetensors weights, the method's config, and a manifest.

`adapterflow.json` records the method, the task, the base model (reference and weights sha256),
what a replica needs to rebuild the base (the model section of the spec), and the sha256 of every
other file. `verify` refuses a folder whose files are missing, changed, or pickled.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from workers.common import is_pickle, sha256_file
from workers.errors import AdapterIntegrityError

__all__ = ["MANIFEST", "check_base", "read_manifest", "sha256_file", "verify", "write_manifest"]

MANIFEST = "adapterflow.json"
FORMAT_VERSION = 1


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)


def write_manifest(folder: Path, *, method: str, model: dict, base_sha256: str | None,
                   extra: dict | None = None) -> dict:
    folder = Path(folder)
    files = {str(p.relative_to(folder)): sha256_file(p) for p in _files(folder)}
    weights = [f for f in files if f.endswith(".safetensors")]
    manifest = {
        "format_version": FORMAT_VERSION,
        "method": method,
        "task": model["task"],
        "base_model": {"name": model["name"], "sha256": base_sha256},
        "model": model,
        "weights": {f: files[f] for f in weights},
        "files": files,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **(extra or {}),
    }
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
    return manifest


def read_manifest(folder: Path) -> dict:
    f = Path(folder) / MANIFEST
    if not f.is_file():
        raise AdapterIntegrityError(
            f"{folder}: no {MANIFEST}; not an adapterflow adapter folder (or the manifest was deleted)"
        )
    try:
        return json.loads(f.read_text())
    except json.JSONDecodeError as exc:
        raise AdapterIntegrityError(f"{f}: manifest is not valid JSON ({exc})") from None


def verify(folder: Path, *, allow_pickle: bool = False) -> dict:
    """Check every file against the manifest; return the manifest."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    if manifest.get("format_version") != FORMAT_VERSION:
        raise AdapterIntegrityError(
            f"{folder}: manifest format_version {manifest.get('format_version')!r} is not {FORMAT_VERSION}"
        )
    expected: dict = manifest.get("files", {})
    for rel, digest in sorted(expected.items()):
        p = folder / rel
        if not p.is_file():
            raise AdapterIntegrityError(f"{folder}: file {rel!r} listed in the manifest is missing")
        actual = sha256_file(p)
        if actual != digest:
            raise AdapterIntegrityError(
                f"{folder}: file {rel!r} fails its checksum (manifest sha256 {digest[:16]}..., "
                f"file sha256 {actual[:16]}...): it was changed or corrupted; re-download or re-train it"
            )
    for p in _files(folder):
        rel = str(p.relative_to(folder))
        if rel not in expected:
            raise AdapterIntegrityError(f"{folder}: file {rel!r} is not in the manifest; remove it")
        if is_pickle(p) and not allow_pickle:
            raise AdapterIntegrityError(
                f"{folder}: {rel!r} is a pickle file; adapters load from safetensors only "
                "(pass allow_pickle=True only for a source you trust)"
            )
    return manifest


def check_base(manifest: dict, base_sha256: str | None, folder: Path | str = "adapter") -> None:
    """Refuse to put an adapter on a base other than the one it was trained on."""
    want = manifest.get("base_model", {}).get("sha256")
    if want and base_sha256 and want != base_sha256:
        raise AdapterIntegrityError(
            f"{folder}: trained on base {manifest['base_model']['name']!r} (weights sha256 "
            f"{want[:16]}...), but the loaded base has sha256 {base_sha256[:16]}...; "
            "load it on the base it was trained on"
        )
