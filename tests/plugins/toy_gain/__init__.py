"""A toy adapter method registered from outside the platform's package: a learnable scalar gain on
the output of every `target` projection, y = g_i · W x (one g per matching module), plus the task
head. It touches no project file: a spec names it under `plugins: [toy_gain]`."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from workers.methods import register_method
from workers.methods.base import AdapterMethod, MethodSpec


class GainSpec(MethodSpec):
    method: Literal["toy-gain"] = "toy-gain"
    target: str = Field("v_proj", description="Modules whose name ends with this get a gain.")
    init: float = Field(1.0, description="Initial gain.")


class ToyGainMethod(AdapterMethod):
    name = "toy-gain"
    spec_class = GainSpec
    max_adapters_per_replica = 1

    def merge_refusal(self, spec: GainSpec) -> str | None:
        return "a toy gain is served as an adapter"

    def attach(self, model, spec: GainSpec, task: str, tokenizer=None, prompt_format=None):
        from toy_gain.layers import GainModel

        return GainModel(model, spec.target, spec.init, task)

    def load(self, base, folder: Path, adapter_name: str = "default"):
        from toy_gain.layers import GainModel

        return GainModel.from_folder(base, Path(folder))

    def save(self, model, directory: Path, spec: GainSpec) -> None:
        model.save_pretrained(Path(directory))


register_method(ToyGainMethod())
