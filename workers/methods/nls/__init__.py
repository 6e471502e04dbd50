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

from pathlib import Path

from workers.errors import SpecError
from workers.methods import register_method
from workers.methods.base import AdapterMethod
from workers.methods.lora import lora_config
from workers.methods.nls.extract import ELASTIC_FILE, VERSIONS, extract_artifact, extract_subadapter
from workers.methods.nls.spec import NlsSpec


class NlsMethod(AdapterMethod):
    name = "nls"
    spec_class = NlsSpec
    subadapters = True
    # served at r_max, where the elastic layer runs PEFT's own LoRA forward (adapter_names included)
    shares_forward = True

    def replica_group(self) -> str:
        return "lora"  # LoRA files at r_max

    def peft_config(self, spec: NlsSpec, task: str):
        from workers.methods.nls.layers import ElasticLoraLinear
        from workers.methods.peft_layers import with_linear_layer

        return with_linear_layer(lora_config(spec, task, r=spec.r_max), ElasticLoraLinear)

    def attach(self, model, spec: NlsSpec, task: str, tokenizer=None, prompt_format=None):
        from workers.methods.nls.layers import attach_elastic

        return attach_elastic(model, self.peft_config(spec, task), spec)

    def load(self, base, folder: Path, adapter_name: str = "default"):
        """A super-adapter loads as an elastic model (`set_ranks` picks its ranks); a folder without the
        elastic config loads as the LoRA it is."""
        if not (Path(folder) / ELASTIC_FILE).is_file():
            return super().load(base, folder, adapter_name)
        from workers.methods.nls.layers import load_elastic
        from workers.methods.tokens import grow_base

        grow_base(base, folder)
        return load_elastic(base, folder, adapter_name)

    def write_extra(self, spec: NlsSpec, directory: Path, model=None) -> None:
        from workers.methods.nls.extract import write_elastic_config

        write_elastic_config(spec, directory)

    def extract_subadapter(self, folder: Path, manifest: dict, output: Path, version, source=None) -> dict:
        return extract_artifact(folder, manifest, output, version, source=source)

    def subadapter_space(self, folder: Path) -> list[dict]:
        import json

        efile = Path(folder) / ELASTIC_FILE
        if not efile.is_file():
            from workers.errors import AdapterIntegrityError

            raise AdapterIntegrityError(f"{folder}: no {ELASTIC_FILE}; not an NLS super-adapter")
        return json.loads(efile.read_text())

    def subadapter_references(self, groups: list[dict]) -> dict[str, list]:
        from workers.methods.nls.extract import choose_ranks

        return {v: choose_ranks(groups, v) for v in VERSIONS}

    def subadapter_params(self, folder: Path, choice: list) -> int:
        from workers.methods.nls.extract import rank_costs

        return sum(c * r for c, r in zip(rank_costs(folder, self.subadapter_space(folder)), choice))

    def set_subadapter(self, model, choice: list | None) -> None:
        set_ranks(model, choice)


def set_ranks(peft_model, ranks: dict[str, int] | list[int] | None) -> None:
    """Evaluate the super-adapter at chosen ranks per group: a mapping group -> rank, or a list in the
    groups' order (the elastic config file's, for a loaded one); None = r_max everywhere."""
    if ranks is not None and not isinstance(ranks, dict):
        ranks = list(ranks)
        if len(ranks) != len(peft_model.nls_groups):
            raise SpecError(f"{len(ranks)} ranks given for {len(peft_model.nls_groups)} groups; give one rank per group")
        ranks = dict(zip(peft_model.nls_groups, ranks))
    peft_model.nls_eval_ranks = dict(ranks) if ranks else None


register_method(NlsMethod())

__all__ = ["ELASTIC_FILE", "VERSIONS", "NlsMethod", "NlsSpec", "extract_subadapter", "set_ranks"]
