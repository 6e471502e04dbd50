"""The method contract: what every adapter method declares and implements.

A method is a package under `workers/methods/` (or any importable module, for plugins) holding
- a pydantic spec (`MethodSpec` subclass whose `method` field is the method's name), in a module
  that imports no torch;
- an `AdapterMethod` subclass: its capabilities as declarations, and its hooks;
- one `register_method(...)` call.
Torch and PEFT layers live in the method's own `layers` module, imported by the hooks when they run.

Nothing outside a method's package tests its name or its internals: callers ask the method.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import ClassVar

from pydantic import Field

from workers.common import StrictModel

TASKS = ("seq-cls", "causal-lm")
PEFT_TASK_TYPES = {"seq-cls": "SEQ_CLS", "causal-lm": "CAUSAL_LM"}


def peft_fields(config: dict, names: dict[str, str]) -> dict:
    """Spec keys from a saved PEFT config: {spec key: PEFT key}, lists sorted (PEFT saves sets)."""
    out = {}
    for key, peft_key in names.items():
        value = config.get(peft_key)
        if value is not None:
            out[key] = sorted(value) if isinstance(value, (list, set, tuple)) else value
    return out


class MethodSpec(StrictModel):
    """The `adapter` section of a spec; each method's spec subclasses it with `method: Literal[name]`."""

    method: str = Field(..., description="The adapter method (a registered name).")


class AdapterMethod:
    """Base of every method. Override the declarations and hooks the method needs."""

    name: ClassVar[str]
    spec_class: ClassVar[type[MethodSpec]]

    # ---------------------------------------------------------------- declarations
    tasks: ClassVar[tuple[str, ...]] = TASKS
    """Tasks the method trains and serves."""
    zero3: ClassVar[bool] = True
    """Trains with DeepSpeed ZeRO-3 (partitioned base weights)."""
    shares_forward: ClassVar[bool] = False
    """Different adapters of this method can share one forward (PEFT `adapter_names`), with each
    row's output equal to that adapter alone; declared only where a test proves it."""
    monte_carlo: ClassVar[bool] = False
    """Gives Monte-Carlo outputs (means and intervals over sampled forwards)."""
    subadapters: ClassVar[bool] = False
    """Sub-adapters can be cut out of a trained adapter (`extract_subadapter`)."""
    max_adapters_per_replica: ClassVar[int | None] = None
    """None: any number of adapters of the replica group share one base."""

    def replica_group(self) -> str:
        """Adapters whose methods share a group can be loaded on one base model."""
        return self.name

    def merge_refusal(self, spec: MethodSpec) -> str | None:
        """Why this adapter cannot be merged into its base weights (None: it can)."""
        return None

    def mergeable(self, spec: MethodSpec) -> bool:
        return self.merge_refusal(spec) is None

    def packing_refusal(self) -> str | None:
        """Why this method cannot train on packed rows (`data.batching: packed`); None: it can."""
        return None

    def zero3_refusal(self) -> str:
        return f"adapter.method {self.name} cannot train with train.zero_stage 3; use 2 (or 0/1)"

    def monte_carlo_samples(self, spec: MethodSpec) -> int:
        """Monte-Carlo forwards the adapter asks for by default (0: plain outputs)."""
        return 0

    def adapter_sparsity(self, spec: MethodSpec) -> float | None:
        """The share of all model weights the adapter leaves untrained, when the method is set by one
        (a sparsity sweep plots against it); None for methods that are not."""
        return None

    def draws_at_inference(self, spec: MethodSpec) -> bool:
        """The adapter's plain forwards at inference are random draws: each request then decodes on
        its own, its draws seeded from its `seed`."""
        return False

    # ---------------------------------------------------------------- spec-time hooks
    def check_task(self, spec: MethodSpec, task: str) -> None:
        if task not in self.tasks:
            from workers.errors import SpecError

            raise SpecError(f"adapter.method {self.name} needs model.task: {' or '.join(self.tasks)}")

    def prompt_format(self, spec: MethodSpec, prompt_format: str) -> str:
        """The prompt format every training and served prompt uses with this adapter."""
        return prompt_format

    def precheck(self, model, spec: MethodSpec, task: str) -> None:
        """Checks that need the model's shapes only; `model` may live on the meta device."""

    # ---------------------------------------------------------------- model hooks
    def peft_config(self, spec: MethodSpec, task: str):
        """The PEFT config of a PEFT-backed method (used by the default attach)."""
        raise NotImplementedError(f"{self.name}: define peft_config or attach")

    def attach(self, model, spec: MethodSpec, task: str, tokenizer=None, prompt_format: str | None = None):
        """`model` with a fresh adapter attached; only the adapter (and the task head) train."""
        from peft import get_peft_model

        return get_peft_model(model, self.peft_config(spec, task))

    def load(self, base, folder: Path, adapter_name: str = "default"):
        """A saved adapter on `base` (grown first when the adapter was saved with added tokens)."""
        from peft import PeftModel

        from workers.methods.tokens import grow_base

        grow_base(base, folder)
        return PeftModel.from_pretrained(base, str(folder), adapter_name=adapter_name)

    def add(self, model, folder: Path, adapter_name: str) -> None:
        """One more saved adapter on a model that already holds some of this replica group."""
        from workers.methods.tokens import grow_base

        grow_base(model.get_base_model(), folder)
        model.load_adapter(str(folder), adapter_name=adapter_name)

    def unload(self, model, adapter_name: str) -> None:
        """Take one adapter off a model that holds others (a served adapter unloaded or replaced)."""
        model.delete_adapter(adapter_name)

    def save(self, model, directory: Path, spec: MethodSpec) -> None:
        """The trained adapter's files (safetensors), and whatever `write_extra` adds."""
        model.save_pretrained(str(directory), safe_serialization=True)
        self.write_extra(spec, Path(directory), model)

    def write_extra(self, spec: MethodSpec, directory: Path, model=None) -> None:
        """Files beside the weights that loading needs."""

    def is_head_parameter(self, name: str, model) -> bool:
        """Whether a trainable parameter belongs to the task head (for `train.head_lr`)."""
        return "modules_to_save" in name

    def count_parameters(self, model) -> tuple[int, int]:
        """(trainable, total) parameters of an attached model."""
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        return trainable, sum(p.numel() for p in model.parameters())

    def save_merged(self, merged, tokenizer, output: Path) -> None:
        """Write a merged model (`merge_and_unload()` of a loaded adapter)."""
        merged.save_pretrained(str(output), safe_serialization=True)
        tokenizer.save_pretrained(str(output))

    def sampling(self, model, adapter_name: str = "default") -> contextlib.AbstractContextManager:
        """A context in which `model`'s forwards are Monte-Carlo draws (monte_carlo methods)."""
        from workers.errors import WrongTaskError

        raise WrongTaskError(f"a {self.name} adapter gives no Monte-Carlo outputs")

    def spec_from_folder(self, folder: Path, config: dict | None, tokenizer) -> dict | None:
        """An adapter folder another library wrote (`adapterflow import`): when it is this method's, the
        spec's keys read from its files, else None. `config`: its `adapter_config.json`, if any;
        `tokenizer`: the operator's base tokenizer."""
        return None

    def convert_pickles(self, src: Path, dst: Path) -> list[str]:
        """Files of `src` another library pickled, rewritten as safetensors into `dst` (read without
        running code: tensors only); returns the names converted. Default: none can be."""
        return []

    def extract_subadapter(self, folder: Path, manifest: dict, output: Path, version, source=None) -> dict:
        """Cut a sub-adapter out of a trained adapter (methods declaring `subadapters`)."""
        from workers.errors import WrongTaskError

        raise WrongTaskError(f"a {self.name} adapter has no sub-adapters to extract")

    def subadapter_space(self, folder: Path) -> list[dict]:
        """The groups a sub-adapter search picks one value for: [{"target": [...], "search_space": [...]}],
        the first value of each space the largest (methods declaring `subadapters`)."""
        from workers.errors import WrongTaskError

        raise WrongTaskError(f"a {self.name} adapter has no sub-adapters to search")

    def subadapter_references(self, groups: list[dict]) -> dict[str, list]:
        """Named choices a sub-adapter search always evaluates (e.g. SQFT's maximal, heuristic, minimal)."""
        return {}

    def subadapter_params(self, folder: Path, choice: list) -> int:
        """Trainable parameters of the sub-adapter `choice` (one value per group) would cut out."""
        raise NotImplementedError(f"{self.name}: define subadapter_params")

    def set_subadapter(self, model, choice: list | None) -> None:
        """Run a loaded adapter (`load`) as its sub-adapter `choice` (None: the whole adapter)."""
        raise NotImplementedError(f"{self.name}: define set_subadapter")
