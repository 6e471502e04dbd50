"""PVeRA through PEFT (`PveraConfig`): frozen shared random projections A (2r x in) and B (out x r)
sliced per layer, trainable λ_d (2r, init d_initial) and λ_b (out, init 0).
[μ, log σ²] = split(λ_d ⊙ (A x)); z = μ + ε·σ when training or sampling at inference, else μ;
y = Wx + λ_b ⊙ (B z). Merge uses the mean only. Monte-Carlo outputs: `workers.montecarlo`."""

from __future__ import annotations

import contextlib

from workers.methods import register_method
from workers.methods.base import PEFT_TASK_TYPES, AdapterMethod, peft_fields
from workers.methods.pvera.spec import PveraSpec


class PveraMethod(AdapterMethod):
    name = "pvera"
    spec_class = PveraSpec
    monte_carlo = True
    # PEFT's PVeRA layers ignore adapter_names: one adapter per forward

    def merge_refusal(self, spec: PveraSpec) -> str | None:
        if spec.sample_at_inference:
            return ("this PVeRA adapter samples at inference; a merged weight holds only the mean. Retrain with "
                    "sample_at_inference: false, or serve it as an adapter")
        return None

    def draws_at_inference(self, spec: PveraSpec) -> bool:
        return spec.sample_at_inference

    def monte_carlo_samples(self, spec: PveraSpec) -> int:
        return spec.samples

    def peft_config(self, spec: PveraSpec, task: str):
        from peft import PveraConfig

        return PveraConfig(
            r=spec.r, target_modules=spec.target_modules, d_initial=spec.d_initial,
            projection_prng_key=spec.projection_prng_key, save_projection=spec.save_projection,
            pvera_dropout=spec.dropout, bias=spec.bias, modules_to_save=spec.modules_to_save,
            sample_at_inference=spec.sample_at_inference, generator_seed=spec.generator_seed,
            task_type=PEFT_TASK_TYPES[task],
        )

    def sampling(self, model, adapter_name: str = "default"):
        return sampling(model, adapter_name)

    def spec_from_folder(self, folder, config, tokenizer) -> dict | None:
        if not config or config.get("peft_type") != "PVERA":
            return None
        return {"method": self.name, **peft_fields(config, {
            "r": "r", "target_modules": "target_modules", "d_initial": "d_initial",
            "projection_prng_key": "projection_prng_key", "save_projection": "save_projection",
            "dropout": "pvera_dropout", "bias": "bias", "modules_to_save": "modules_to_save",
            "sample_at_inference": "sample_at_inference", "generator_seed": "generator_seed"})}


@contextlib.contextmanager
def sampling(model, adapter_name: str = "default"):
    """Switch every PVeRA layer of `model` to sampling at inference for the duration."""
    from peft.tuners.pvera.layer import PveraLayer

    layers = [m for m in model.modules() if isinstance(m, PveraLayer)]
    if not layers:
        from workers.errors import WrongTaskError

        raise WrongTaskError("Monte-Carlo outputs need a PVeRA adapter; this model has no PVeRA layer")
    saved = [m.sample_at_inference.get(adapter_name) for m in layers]
    for m in layers:
        m.sample_at_inference[adapter_name] = True
    try:
        yield
    finally:
        for m, s in zip(layers, saved):
            m.sample_at_inference[adapter_name] = s


register_method(PveraMethod())

__all__ = ["PveraMethod", "PveraSpec", "sampling"]
