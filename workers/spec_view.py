"""The part of a pipeline spec a worker reads (model, data, adapter, train, sparsify, plugins); other
keys ignored. Workers never import pipelines."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, model_validator

from workers.config import (
    PLUGINS_DESCRIPTION,
    AdapterSpec,
    DataSpec,
    ModelSpec,
    SparsifySpec,
    TrainSpec,
    import_plugins,
)


class WorkerSpec(BaseModel):
    model_config = ConfigDict(extra="ignore", protected_namespaces=())

    name: str = "adapterflow"
    workspace: str = ".adapterflow"
    ray_address: str | None = None
    plugins: list[str] = Field(default_factory=list, description=PLUGINS_DESCRIPTION)
    model: ModelSpec
    data: DataSpec
    adapter: AdapterSpec
    train: TrainSpec = Field(default_factory=TrainSpec)
    sparsify: SparsifySpec = Field(default_factory=SparsifySpec)

    @model_validator(mode="before")
    @classmethod
    def _plugins(cls, data):
        return import_plugins(data)

    def workspace_path(self) -> Path:
        return Path(self.workspace).expanduser().resolve()
