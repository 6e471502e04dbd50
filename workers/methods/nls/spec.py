"""NLS's spec (no torch)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from workers.methods.lora.spec import LoraSpec


class NlsSpec(LoraSpec):
    method: Literal["nls"] = "nls"  # type: ignore[assignment]
    r: int | None = Field(None, gt=0, description="Must be search_space[0] (r_max) when given.")  # type: ignore[assignment]
    search_space: list[int] = Field(
        default_factory=lambda: [32, 24, 16],
        description="Ranks a layer group may take, largest first (r_max = the first).",
    )
    group_by: Literal["layer", "module"] = Field(
        "layer", description="One drawn rank per block layer (upstream) or per adapted module."
    )
    seed: int = Field(0, description="Seed of the per-forward rank draws.")

    @field_validator("search_space")
    @classmethod
    def _space(cls, v):
        if not v or any(r <= 0 for r in v):
            raise ValueError("must be a non-empty list of positive ranks")
        if v != sorted(set(v), reverse=True):
            raise ValueError(f"must be distinct ranks, largest first (e.g. {sorted(set(v), reverse=True)})")
        return v

    @model_validator(mode="after")
    def _rank(self):
        if self.rank_pattern or self.alpha_pattern:
            raise ValueError("adapter.rank_pattern/alpha_pattern: an NLS super-adapter's ranks are drawn from "
                             "search_space; remove them (a sub-adapter's patterns come from extract-subadapter)")
        if self.r is not None and self.r != self.search_space[0]:
            raise ValueError(f"adapter.r {self.r} must equal the largest rank of search_space "
                             f"({self.search_space[0]}); leave r out")
        return self

    @property
    def r_max(self) -> int:
        return self.search_space[0]
