"""SpaRTA (sparse random parameter adaptation), written here; reads and writes peft-sparta's files.

A seeded draw picks each weight of every non-frozen parameter independently with probability
p = keep / (N_total - N_frozen), keep = (1 - sparsity)·N_total (the task head and any
`trainable_tokens` rows are taken out of `keep` first: they are always fully trainable). The
trainable values are float32 deltas at those indices, W = W0 + scatter(idx, Δ).

Training (`layers.py`): each chosen parameter gets a `torch.nn.utils.parametrize` parametrization
computing W0 with (W0[idx].float() + Δ).to(dtype) written at idx, so every forward (and any
recomputed forward) sees the deltas and autograd reaches only Δ. Inference (`inference.py`): the
deltas are merged in place (no runtime cost); the values they overwrite are kept, so unmerging
restores the base exactly and one replica can switch between adapters.

Files (`files.py`, peft-sparta's): `sparse_deltas.safetensors` with `indices.<param>` int32
[k, ndim] and `deltas.<param>` float32 [k] for every parameter (empty for untouched ones);
`config.json` of the base with `sparta_pretrained_model`; for sequence classification
`head_init.safetensors` (the random head the deltas start from; key `head` as peft-sparta reads
it, and one key per head parameter). peft-sparta's pickled `*.pt` variants are read only with
`torch.load(weights_only=True)`.
"""

from __future__ import annotations

from pathlib import Path

from workers.errors import SpecError
from workers.methods import register_method
from workers.methods.base import AdapterMethod
from workers.methods.sparta.spec import UPSTREAM_FROZEN, SpartaSpec


class SpartaMethod(AdapterMethod):
    name = "sparta"
    spec_class = SpartaSpec
    # adapters switch by merge/unmerge on one base: one adapter per forward

    def adapter_sparsity(self, spec: SpartaSpec) -> float:
        return spec.sparsity

    def precheck(self, model, spec: SpartaSpec, task: str) -> None:
        from workers.methods.sparta.selection import precheck

        precheck(model, spec, task)

    def attach(self, model, spec: SpartaSpec, task: str, tokenizer=None, prompt_format=None):
        from workers.methods.sparta.layers import SpartaTrainModel
        from workers.methods.tokens import add_new_tokens

        rows = None
        if spec.new_tokens:
            if tokenizer is None:
                raise SpecError("adapter.new_tokens needs the tokenizer")
            ids = add_new_tokens(model, tokenizer, spec.new_tokens)
            rows = model.get_input_embeddings().weight[-len(ids):].detach().clone()
            spec = spec.model_copy(update={"trainable_tokens": (spec.trainable_tokens or []) + ids})
        wrapped = SpartaTrainModel(model, spec, task)
        if rows is not None:
            wrapped.new_rows, wrapped.new_tokenizer = rows, tokenizer
        return wrapped

    def load(self, base, folder: Path, adapter_name: str = "default"):
        """A saved SpaRTA adapter (ours or peft-sparta's) merged into `base`."""
        from workers.methods.sparta.inference import SpartaModel
        from workers.methods.sparta.selection import head_names_or_none

        model = SpartaModel(base, "seq-cls" if head_names_or_none(base) else "causal-lm")
        model.load_adapter(folder, adapter_name)
        return model

    def add(self, model, folder: Path, adapter_name: str) -> None:
        model.load_adapter(folder, adapter_name)

    def save(self, model, directory: Path, spec: SpartaSpec) -> None:
        model.save_pretrained(str(directory))

    def is_head_parameter(self, name: str, model) -> bool:
        """The deltas SpaRTA keeps for the head's parameters."""
        heads = {h.rsplit(".", 1)[0] for h in getattr(model, "heads", [])}
        return any(name.startswith(f"base_model.{h}.parametrizations.") for h in heads)

    def count_parameters(self, model) -> tuple[int, int]:
        return model.parameter_counts()

    def convert_pickles(self, src: Path, dst: Path) -> list[str]:
        """peft-sparta's trainer saves `head_init.pt` (and may save the deltas as `.pt`): tensors read with
        torch's weights-only loader, written as the safetensors files this method reads."""
        from safetensors.torch import save_file

        from workers.methods.sparta.files import load_tensors

        done = []
        for stem in ("sparse_deltas", "head_init", "new_embeddings_init"):
            if (Path(src) / f"{stem}.pt").is_file() and not (Path(src) / f"{stem}.safetensors").is_file():
                tensors = load_tensors(Path(src), stem)
                if stem == "sparse_deltas" and isinstance(tensors.get("indices"), dict):
                    tensors = {f"{kind}.{k}": v for kind in ("indices", "deltas") for k, v in tensors[kind].items()}
                save_file({k: v.contiguous() for k, v in tensors.items()}, str(Path(dst) / f"{stem}.safetensors"),
                          metadata={"format": "pt"})
                done.append(f"{stem}.pt")
        return done

    def spec_from_folder(self, folder, config, tokenizer) -> dict | None:
        """peft-sparta's folders: `sparse_deltas` beside the base's `config.json`."""
        from workers.methods.sparta.files import DELTAS_FILE

        if not (Path(folder) / DELTAS_FILE).is_file() and not (Path(folder) / "sparse_deltas.pt").is_file():
            return None
        return {"method": self.name}


def attach(model, spec: SpartaSpec, task: str, tokenizer=None, prompt_format=None):
    return METHOD.attach(model, spec, task, tokenizer=tokenizer, prompt_format=prompt_format)


def load(base, folder, adapter_name: str = "default"):
    return METHOD.load(base, Path(folder), adapter_name)


METHOD = register_method(SpartaMethod())

__all__ = ["UPSTREAM_FROZEN", "SpartaMethod", "SpartaSpec", "attach", "load"]
