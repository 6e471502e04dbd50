"""`adapterflow sparsify SPEC`: a Wanda-sparsified copy of the spec's base model, calibrated on the
spec's data, saved as safetensors with its tokenizer and a sparsity report."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from pipelines.spec import PipelineSpec


def run_sparsify(spec: PipelineSpec) -> tuple[Path, dict]:
    import torch

    from workers.data import input_template, load_split, render
    from workers.models import load_model, load_tokenizer, resolve_model_path
    from workers.wanda import Pattern, calibration_batches, sparsify

    sp = spec.sparsify
    pattern = Pattern.parse(sp.pattern, sp.ratio)
    records = load_split(spec.data, sp.split)
    if not records:
        from workers.errors import DataError

        raise DataError(f"sparsify.split {sp.split!r} is missing or empty in {spec.data.path!r}")
    tmpl = input_template(spec.data)
    texts = [render(tmpl, r) for r in records]
    tok = load_tokenizer(spec.model)
    model = load_model(spec.model, tok)
    calib = calibration_batches(tok, texts, sp.seq_len, sp.n_samples)
    torch.manual_seed(spec.train.seed)
    report = sparsify(model, calib, pattern)
    report["calibration"] = {"chunks": sum(len(b["input_ids"]) for b in calib), "seq_len": sp.seq_len,
                             "split": sp.split}
    report["base_model"] = spec.model.name
    tag = sp.pattern.replace(":", "of") if sp.ratio is None or sp.pattern != "unstructured" else f"{sp.ratio:g}"
    out = Path(sp.output) if sp.output else spec.workspace_path() / "sparse" / f"{spec.name}-wanda-{tag}"
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    src = Path(resolve_model_path(spec.model.name))
    if src.is_dir():  # keep the base's extra tokenizer files (e.g. SentencePiece model)
        for f in src.glob("tokenizer.model"):
            shutil.copy2(f, out / f.name)
    (out / "sparsity_report.json").write_text(json.dumps(report, indent=2))
    return out, report
