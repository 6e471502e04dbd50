"""Activated LoRA through PEFT (`LoraConfig(alora_invocation_tokens=...)`): LoRA applies only from
the start of the last occurrence of the invocation tokens onward, so everything before sees the
base weights and its KV cache equals the base model's. Causal LMs only; not mergeable.

The spec names an `invocation_string`; it is appended to `model.prompt_format` (unless the format
already holds it) so every training prompt and every served prompt carries it where the adapter must
switch on.
"""

from __future__ import annotations

import logging
from pathlib import Path

from workers.errors import SpecError
from workers.methods import register_method
from workers.methods.alora.spec import ALoraSpec
from workers.methods.base import AdapterMethod, peft_fields
from workers.methods.tokens import grow_base

log = logging.getLogger(__name__)


def invocation_tokens(tokenizer, spec: ALoraSpec, prompt_example: str | None = None) -> list[int]:
    """The invocation's token ids; warns when they do not appear as such inside a real prompt."""
    ids = tokenizer.encode(spec.invocation_string, add_special_tokens=False)
    if not ids:
        raise SpecError(f"adapter.invocation_string {spec.invocation_string!r} tokenizes to nothing")
    if prompt_example is not None:
        ctx = tokenizer.encode(prompt_example, add_special_tokens=False)
        if not any(ctx[i : i + len(ids)] == ids for i in range(len(ctx) - len(ids) + 1)):
            log.warning(
                "adapter.invocation_string %r does not tokenize the same inside a prompt (%s alone vs %s "
                "in context); the adapter may never switch on. Begin and end it with special tokens or "
                "a newline so it tokenizes identically.", spec.invocation_string, ids, ctx[-len(ids) - 2:],
            )
    return ids


class ALoraMethod(AdapterMethod):
    name = "alora"
    spec_class = ALoraSpec
    tasks = ("causal-lm",)
    shares_forward = True  # PEFT's mixed-batch forward covers aLoRA; proven per row in tests/test_methods.py

    def replica_group(self) -> str:
        return "lora"  # PEFT LoRA layers: shares a base with LoRA and NLS adapters

    def merge_refusal(self, spec: ALoraSpec) -> str | None:
        return ("an alora adapter applies only from its invocation on, which a merged weight cannot express; "
                "serve it as an adapter instead")

    def packing_refusal(self) -> str | None:
        return ("data.batching packed cannot train adapter.method alora: aLoRA activates from the invocation in "
                "each row, and a packed row holds several examples; use length_grouped")

    def check_task(self, spec: ALoraSpec, task: str) -> None:
        if task not in self.tasks:
            raise SpecError("adapter.method alora needs model.task: causal-lm (aLoRA reuses a causal LM's KV "
                            "cache); use lora for seq-cls")

    def prompt_format(self, spec: ALoraSpec, prompt_format: str) -> str:
        if spec.invocation_string in prompt_format:
            return prompt_format
        return prompt_format + spec.invocation_string  # every prompt ends with the invocation

    def attach(self, model, spec: ALoraSpec, task: str, tokenizer=None, prompt_format: str | None = None):
        from peft import LoraConfig, get_peft_model

        from workers.methods.tokens import add_new_tokens

        self.check_task(spec, task)
        if tokenizer is None:
            raise SpecError("aLoRA needs the tokenizer to encode its invocation string")
        new_ids = add_new_tokens(model, tokenizer, spec.new_tokens) if spec.new_tokens else None
        example = prompt_format.format(prompt="Tell a story.") if prompt_format else None
        config = LoraConfig(
            r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout, target_modules=spec.target_modules,
            alora_invocation_tokens=invocation_tokens(tokenizer, spec, example), task_type="CAUSAL_LM",
            trainable_token_indices=new_ids,  # PEFT trains and saves just these embedding rows
        )
        peft_model = get_peft_model(model, config)
        if new_ids:
            peft_model.adapter_tokenizer = tokenizer
        return peft_model

    def save(self, model, directory: Path, spec: ALoraSpec) -> None:
        tok = getattr(model, "adapter_tokenizer", None)
        # added tokens: PEFT's trainable tokens hold the new rows, not the whole embedding matrix
        kwargs = {"save_embedding_layers": False} if tok is not None else {}
        model.save_pretrained(str(directory), safe_serialization=True, **kwargs)
        if spec.new_tokens and tok is not None:
            tok.save_pretrained(str(directory))  # its ids index the new rows

    def spec_from_folder(self, folder, config, tokenizer) -> dict | None:
        ids = (config or {}).get("alora_invocation_tokens")
        if not config or config.get("peft_type") != "LORA" or not ids:
            return None
        text = tokenizer.decode(ids)
        if tokenizer.encode(text, add_special_tokens=False) != list(ids):
            raise SpecError(f"{folder}: the invocation tokens {ids} do not decode to a string that encodes back to "
                            "them with this base's tokenizer; give it: --set adapter.invocation_string=...")
        return {"method": self.name, "invocation_string": text, **peft_fields(config, {
            "r": "r", "alpha": "lora_alpha", "dropout": "lora_dropout", "target_modules": "target_modules"})}

    def load(self, base, folder: Path, adapter_name: str = "default"):
        from peft import PeftModel

        grow_base(base, folder)
        return PeftModel.from_pretrained(base, str(folder), adapter_name=adapter_name)

    def add(self, model, folder: Path, adapter_name: str) -> None:
        grow_base(model.get_base_model(), folder)
        model.load_adapter(str(folder), adapter_name=adapter_name)


register_method(ALoraMethod())

__all__ = ["ALoraMethod", "ALoraSpec", "invocation_tokens"]
