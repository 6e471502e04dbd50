"""NLS (SQFT's Neural Low-rank adapter Search): an elastic-rank LoRA super-adapter.

The super-adapter is a PEFT LoRA at r_max = search_space[0]. On every training forward a rank is
drawn uniformly from `search_space` for each group of layers (one group per block layer of the
model, as upstream, or one per adapted module); an adapted layer then uses A[:r] and B[:, :r] with
the scaling kept at alpha/r_max. The draw happens once per top-level forward and is stored on the
layers, so any recomputed forward (activation checkpointing) sees the same ranks. Draws are a pure
function of (seed, forward count) and the count is saved in training checkpoints, so a resumed run
draws what an uninterrupted one would have. Evaluation and serving use r_max: the super-adapter's
files are plain PEFT LoRA files.

`elastic_adapter_config.json` (beside the weights) lists the groups:
`[{"target": [lora_A module names], "search_space": [32, 24, 16]}, ...]`. Sub-adapter extraction
(`adapterflow extract-subadapter`) picks a rank per group (`maximal` = space[0], `heuristic` =
space[(len-1)//2], `minimal` = space[-1], or explicit), slices A[:r'] and B[:, :r'], and writes
`rank_pattern` and `alpha_pattern` (alpha·r'/r_max, so the scaling stays alpha/r_max): stock PEFT
loads the result with the outputs of the super-adapter run at those ranks.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from workers.errors import AdapterIntegrityError, SpecError
from workers.methods.lora import LoraSpec

ELASTIC_FILE = "elastic_adapter_config.json"
VERSIONS = ("maximal", "heuristic", "minimal")


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

    replica_group: ClassVar[str] = "lora"  # LoRA files at r_max

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
        if self.r is not None and self.r != self.search_space[0]:
            raise ValueError(f"adapter.r {self.r} must equal the largest rank of search_space "
                             f"({self.search_space[0]}); leave r out")
        return self

    @property
    def r_max(self) -> int:
        return self.search_space[0]

    def peft_config(self, task: str):
        import torch.nn as nn

        config = self.model_copy(update={"r": self.r_max})
        config = LoraSpec.peft_config(config, task)
        config._register_custom_module({nn.Linear: _elastic_linear_class()})
        return config


_CLASS = None


def _elastic_linear_class():
    global _CLASS
    if _CLASS is not None:
        return _CLASS
    import torch.nn.functional as F
    from peft.tuners.lora.layer import Linear

    from workers.methods.base import sum_lora_updates

    class ElasticLoraLinear(Linear):
        """PEFT's LoRA Linear with an active rank: A[:r], B[:, :r], scaling alpha/r_max."""

        nls_rank: int | None = None

        def forward(self, x, *args, **kwargs):
            r = self.nls_rank
            if r is None or self.disable_adapters or self.merged or kwargs.get("adapter_names") is not None:
                return super().forward(x, *args, **kwargs)
            return sum_lora_updates(self, x, args, kwargs, lambda name, xd: F.linear(
                F.linear(xd, self.lora_A[name].weight[:r]), self.lora_B[name].weight[:, :r]) * self.scaling[name])

        def __repr__(self) -> str:
            return "nls." + super().__repr__()

    _CLASS = ElasticLoraLinear
    return _CLASS


def group_key(module_name: str, group_by: str) -> str:
    """Layer groups: the first integer path component (the block index) of a module's name."""
    if group_by == "layer":
        m = re.search(r"\.(\d+)\.", f".{module_name}.")
        if m:
            return f"layer {m.group(1)}"
    return module_name


def _strip(name: str) -> str:
    """PEFT module name -> the base model's module name."""
    return name.removeprefix("base_model.model.")


def elastic_groups(lora_a_names: list[str], search_space: list[int], group_by: str) -> list[dict]:
    groups: dict[str, list[str]] = {}
    for n in lora_a_names:
        groups.setdefault(group_key(_strip(n.rsplit(".lora_A", 1)[0]), group_by), []).append(n)
    return [{"target": sorted(v), "search_space": list(search_space)} for v in groups.values()]


def _nls_state_class():
    import torch
    import torch.nn as nn

    class NlsState(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("forwards", torch.zeros((), dtype=torch.long))

    return NlsState


def attach(model, spec: NlsSpec, task: str, tokenizer=None, prompt_format=None):
    from peft import get_peft_model

    peft_model = get_peft_model(model, spec.peft_config(task))
    layers = {n: m for n, m in peft_model.named_modules() if isinstance(m, _elastic_linear_class())}
    if not layers:
        raise SpecError("adapter.target_modules matched no Linear layer for NLS")
    groups: dict[str, list] = {}
    for n, m in layers.items():
        groups.setdefault(group_key(_strip(n), spec.group_by), []).append(m)
    state = _nls_state_class()()
    peft_model.base_model.add_module("nls_state", state)
    keys = sorted(groups)

    def draw(module, args, kwargs):
        if not module.training:  # evaluation: r_max, or the ranks set_ranks chose
            fixed = module.nls_eval_ranks or {}
            for k, ms in groups.items():
                for m in ms:
                    m.nls_rank = fixed.get(k)
            return None
        rng = random.Random(f"{spec.seed}:{int(state.forwards)}")
        for k in keys:
            r = rng.choice(spec.search_space)
            for m in groups[k]:
                m.nls_rank = r
        state.forwards += 1
        return None

    peft_model.register_forward_pre_hook(draw, with_kwargs=True)
    peft_model.nls_groups = {k: groups[k] for k in keys}
    peft_model.nls_eval_ranks = None
    return peft_model


def set_ranks(peft_model, ranks: dict[str, int] | None) -> None:
    """Evaluate the super-adapter at chosen ranks per group (None = r_max everywhere)."""
    peft_model.nls_eval_ranks = dict(ranks) if ranks else None


def write_extra(spec: NlsSpec, directory: Path, model=None) -> None:
    from safetensors import safe_open

    with safe_open(str(Path(directory) / "adapter_model.safetensors"), framework="pt") as fh:
        names = sorted(k.removesuffix(".weight") for k in fh.keys() if ".lora_A" in k)
    config = elastic_groups(names, spec.search_space, spec.group_by)
    (Path(directory) / ELASTIC_FILE).write_text(json.dumps(config, indent=2) + "\n")


# ------------------------------------------------------------------ sub-adapter extraction
def choose_ranks(groups: list[dict], version: str | list[int]) -> list[int]:
    if isinstance(version, str):
        if version not in VERSIONS:
            raise SpecError(f"sub-adapter version {version!r}: choose one of {', '.join(VERSIONS)} or give "
                            "one rank per group")
        pick = {"maximal": lambda s: s[0], "heuristic": lambda s: s[(len(s) - 1) // 2],
                "minimal": lambda s: s[-1]}[version]
        return [pick(g["search_space"]) for g in groups]
    if len(version) != len(groups):
        raise SpecError(f"{len(version)} ranks given for {len(groups)} groups; give one rank per group")
    for i, (r, g) in enumerate(zip(version, groups)):
        if r not in g["search_space"]:
            raise SpecError(f"group {i} ({g['target'][0]}...): rank {r} is not in its search space "
                            f"{g['search_space']}")
    return list(version)


def extract_subadapter(folder: Path, output: Path, version: str | list[int]) -> dict:
    """Write the sub-adapter of a super-adapter folder at the chosen ranks; returns a summary."""
    import torch
    from safetensors.torch import load_file, save_file

    folder, output = Path(folder), Path(output)
    efile = folder / ELASTIC_FILE
    if not efile.is_file():
        raise AdapterIntegrityError(f"{folder}: no {ELASTIC_FILE}; not an NLS super-adapter")
    groups = json.loads(efile.read_text())
    ranks = choose_ranks(groups, version)
    config = json.loads((folder / "adapter_config.json").read_text())
    r_max, alpha = int(config["r"]), float(config["lora_alpha"])
    weights = load_file(str(folder / "adapter_model.safetensors"))
    rank_pattern, alpha_pattern, out = {}, {}, dict(weights)
    for g, r in zip(groups, ranks):
        for a_name in g["target"]:
            module = a_name.rsplit(".lora_A", 1)[0]
            a_key, b_key = f"{a_name}.weight", f"{module}.lora_B.weight"
            if a_key not in weights or b_key not in weights:
                raise AdapterIntegrityError(f"{folder}: {ELASTIC_FILE} names {a_name!r}, not in the weights")
            out[a_key] = weights[a_key][:r].contiguous().clone()
            out[b_key] = weights[b_key][:, :r].contiguous().clone()
            key = _strip(module)
            rank_pattern[key] = r
            alpha_pattern[key] = alpha * r / r_max
    output.mkdir(parents=True, exist_ok=True)
    save_file(out, str(output / "adapter_model.safetensors"), metadata={"format": "pt"})
    config.update(rank_pattern=rank_pattern, alpha_pattern=alpha_pattern)
    (output / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    params = sum(t.numel() for k, t in out.items() if "lora_" in k)
    del torch
    return {"ranks": ranks, "groups": len(groups), "lora_params": params, "r_max": r_max}


def extract_artifact(folder: Path, manifest: dict, output: Path, version: str | list[int],
                     source: str | None = None) -> dict:
    """`extract_subadapter` plus the sub-adapter's own manifest (method lora, the same base), so
    it can be served, registered or merged like any adapter."""
    from workers.artifact import write_manifest

    summary = extract_subadapter(folder, output, version)
    sub = {**manifest.get("adapter", {}), "method": "lora", "r": summary["r_max"]}
    for k in ("search_space", "group_by", "seed"):
        sub.pop(k, None)
    write_manifest(Path(output), method="lora", model=manifest["model"], base_sha256=manifest["base_model"]["sha256"],
                   extra={"adapter": sub, "input_template": manifest.get("input_template"),
                          "max_length": manifest.get("max_length"),
                          "nls": {"super_adapter": source or str(folder), "version": version,
                                  "ranks": summary["ranks"]}})
    return summary
