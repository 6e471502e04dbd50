"""Merging an adapter into its base (a plain transformers model in safetensors), and reading the
sparsity of a saved model."""

from __future__ import annotations

import json
from pathlib import Path

from workers.errors import AdapterIntegrityError


def check_mergeable(manifest: dict) -> None:
    from workers.errors import SpecError
    from workers.methods import manifest_spec, method_for_manifest

    try:
        method = method_for_manifest(manifest)
    except SpecError:
        raise AdapterIntegrityError(f"adapter method {manifest['method']!r} is not known to this version "
                                    "(a plugin's method needs its module imported)") from None
    spec = manifest_spec(manifest) or method.spec_class.model_construct()
    reason = method.merge_refusal(spec)
    if reason:
        raise AdapterIntegrityError(f"a {method.name} adapter cannot be merged: {reason}")


def linear_nonzeros(model) -> int:
    import torch.nn as nn

    return sum(int((m.weight != 0).sum()) for m in model.modules() if isinstance(m, nn.Linear))


def merge_adapter(folder: Path, manifest: dict, output: Path, base=None) -> dict:
    """Merge the adapter into its base and save the model. `base`: the operator's base (a model
    section); without it, the base the manifest names (never with remote code)."""
    from workers.methods import method_for_manifest
    from workers.models import base_fingerprint, load_model, load_tokenizer
    from workers.trust import check_against_base, manifest_base, serving_spec

    check_mergeable(manifest)
    spec = serving_spec(manifest, base, folder) if base is not None else manifest_base(manifest, folder)
    check_against_base(manifest, spec, base_fingerprint(spec), folder)
    method = method_for_manifest(manifest)
    tok = load_tokenizer(spec)
    base = load_model(spec, tok)
    before = linear_nonzeros(base)
    merged = method.load(base, Path(folder)).merge_and_unload()
    after = linear_nonzeros(merged)
    output.mkdir(parents=True, exist_ok=True)
    method.save_merged(merged, tok, output)
    report = {"method": manifest["method"], "base_model": manifest["base_model"],
              "adapter_weights": manifest["weights"], "linear_nonzeros_before": before,
              "linear_nonzeros_after": after, "nonzeros_added": after - before}
    (output / "merge_report.json").write_text(json.dumps(report, indent=2))
    return report


def sparsity_of(folder: Path) -> dict:
    """Zeros of every 2-D weight in a model folder's safetensors files, read without building it."""
    from safetensors import safe_open

    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        from workers.errors import ModelError

        raise ModelError(f"{folder}: no .safetensors files; is it a saved model folder?")
    layers, zeros, numel = {}, 0, 0
    for f in files:
        with safe_open(str(f), framework="pt") as fh:
            for key in sorted(fh.keys()):
                t = fh.get_tensor(key)
                if key.endswith(".qweight"):  # packed INT4: a weight is zero where its code is the zero point
                    from workers.int4 import unpack

                    stem = key[: -len(".qweight")]
                    zp = fh.get_tensor(f"{stem}.zeros")
                    codes = unpack(t)
                    z = int((codes == zp.repeat_interleave(codes.shape[1] // zp.shape[1], 1)).sum())
                    layers[f"{stem}.weight"] = {"zeros": z, "numel": codes.numel(), "sparsity": z / codes.numel()}
                    zeros, numel = zeros + z, numel + codes.numel()
                    continue
                if t.ndim != 2 or not key.endswith("weight") or "embed" in key:
                    continue
                z = int((t == 0).sum())
                layers[key] = {"zeros": z, "numel": t.numel(), "sparsity": z / t.numel()}
                zeros, numel = zeros + z, numel + t.numel()
    return {"layers": layers, "total": {"zeros": zeros, "numel": numel, "sparsity": zeros / max(numel, 1)}}
