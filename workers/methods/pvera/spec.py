"""PVeRA's spec (no torch)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from workers.methods.base import MethodSpec


class PveraSpec(MethodSpec):
    method: Literal["pvera"] = "pvera"
    r: int = Field(256, gt=0, description="Rank of the shared random projections.")
    target_modules: list[str] | Literal["all-linear"] | None = Field(
        None, description="Modules to adapt; null = PEFT's default for the architecture."
    )
    d_initial: float = Field(0.1, description="Initial value of every λ_d entry.")
    projection_prng_key: int = Field(0, description="Seed of the frozen random projections A and B.")
    save_projection: bool = Field(
        True, description="Store A and B in the adapter (else they are regenerated from the seed)."
    )
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the PVeRA input.")
    bias: Literal["none", "all", "pvera_only"] = Field("none", description="Which biases train.")
    modules_to_save: list[str] | None = Field(
        None, description="Extra modules trained in full (the task head is added for seq-cls)."
    )
    sample_at_inference: bool = Field(
        False, description="Draw z = μ + ε·σ at inference too (Monte-Carlo outputs); not mergeable then."
    )
    generator_seed: int | None = Field(None, description="Seed of ε when sampling at inference.")
    samples: int = Field(
        0, ge=0, description="Monte-Carlo forwards for evaluation and serving (mean and 95 % interval per "
        "output); 0 = mean only, else at least 2.",
    )

    @field_validator("samples")
    @classmethod
    def _two(cls, v):
        if v == 1:
            raise ValueError("a confidence interval needs at least 2 samples (0 = mean only)")
        return v
