"""The part of a pipeline spec a worker reads (model, data, adapter, train); other keys ignored."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from workers.config import AdapterSpec, DataSpec, ModelSpec, TrainSpec


class WorkerSpec(BaseModel):
    model_config = ConfigDict(extra="ignore", protected_namespaces=())

    model: ModelSpec
    data: DataSpec
    adapter: AdapterSpec
    train: TrainSpec = Field(default_factory=TrainSpec)
