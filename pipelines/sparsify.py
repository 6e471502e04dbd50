"""`adapterflow sparsify SPEC`: a Wanda-sparsified copy of the spec's base model, calibrated on the
spec's data, saved as safetensors with its tokenizer and a sparsity report (the work is the
`workers.stages.sparsify_base` stage, which a search's trials run too)."""

from __future__ import annotations

from pathlib import Path

from pipelines.spec import PipelineSpec


def default_output(spec: PipelineSpec) -> Path:
    """`sparsify.output`, else `<workspace>/sparse/<name>-wanda-<ratio or N:M>`."""
    sp = spec.sparsify
    tag = sp.pattern.replace(":", "of") if sp.ratio is None or sp.pattern != "unstructured" else f"{sp.ratio:g}"
    return Path(sp.output) if sp.output else spec.workspace_path() / "sparse" / f"{spec.name}-wanda-{tag}"


def run_sparsify(spec: PipelineSpec) -> tuple[Path, dict]:
    from workers.stages import sparsify_base

    out = default_output(spec)
    return out, sparsify_base(spec, out)
