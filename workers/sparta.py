"""The SpaRTA API peft-sparta users know, on this project's implementation.

    from workers.sparta import SpaRTA, SpaRTAforSequenceClassification, SpaRTAforCausalLM

    model = SpaRTA(model, sparsity=0.99)                  # training wrapper (deltas train)
    clf = SpaRTAforSequenceClassification(adapter="out/adapter", input_template="Review: {sentence}",
                                          base="models/my-base")  # the operator's base (optional)
    clf.classify([{"sentence": "a fine film"}])            # tensor [n, num_labels] of probabilities
    clf.decide_class(["a fine film"]); clf.evaluate(texts, labels, batch_size=64); clf.id2label
    lm = SpaRTAforCausalLM(adapter="out/lm-adapter"); lm.generate(**tok("Once", return_tensors="pt"))

An adapter folder is either one of ours (its `adapterflow.json` is verified: checksums, base) or
one written by peft-sparta (`sparse_deltas.safetensors` + `config.json` naming the base). The base
is the operator's where given (`base="path/or/hub-id"` or a model section `{"name", "revision",
"dtype", "trust_remote_code"}`), else the one the adapter names, never with remote code; our
adapters are checked against it by weight digest, and one whose manifest asks for remote code is
refused. Unlike peft-sparta's loaders these keep the base's own dtype (float32 unless `dtype=`
says otherwise) and load weights from safetensors only.
"""

from __future__ import annotations

import json
from pathlib import Path

from workers.common import model_class, task_of
from workers.config import ModelSpec
from workers.errors import AdapterIntegrityError, SpecError
from workers.methods import method_for_manifest
from workers.methods.sparta import UPSTREAM_FROZEN, SpartaMethod, SpartaSpec, attach, load


def SpaRTA(model, sparsity: float, frozen_modules: list[str] | None = None,  # noqa: N802 - upstream's name
           trainable_tokens: list[int] | None = None, dropout: float = 0.0, seed: int = 0, task: str | None = None):
    """Prepare `model` for SpaRTA training: only the sparse deltas (and the head) train."""
    spec = SpartaSpec(sparsity=sparsity, frozen_modules=list(UPSTREAM_FROZEN if frozen_modules is None else frozen_modules),
                      trainable_tokens=trainable_tokens, dropout=dropout, seed=seed)
    if task is None:
        task = task_of(model)
    return attach(model, spec, task)


def _open(adapter: str | Path, task: str, dtype, base=None):
    """(base model, tokenizer, model reference) for an adapter folder of ours or peft-sparta's, on the
    operator's `base` (a model name or folder, or a model section: name, revision, dtype); without
    one, on the base the adapter names (never with remote code)."""
    import torch
    from transformers import AutoTokenizer

    from workers.artifact import MANIFEST, verify
    from workers.models import base_fingerprint, load_model, load_tokenizer, quiet_transformers, resolve_model_path
    from workers.trust import check_against_base, manifest_base, serving_spec

    folder = Path(adapter)
    if base is not None and not isinstance(base, (dict, ModelSpec)):
        base = {"name": str(base)}
    if (folder / MANIFEST).is_file():
        manifest = verify(folder)
        if not isinstance(method_for_manifest(manifest), SpartaMethod):
            raise AdapterIntegrityError(f"{folder}: a {manifest['method']} adapter, not SpaRTA")
        spec = serving_spec(manifest, base, folder) if base is not None else manifest_base(manifest, folder)
        if dtype is not None:
            spec = spec.model_copy(update={"dtype": str(dtype).removeprefix("torch.")})
        check_against_base(manifest, spec, base_fingerprint(spec), folder)  # before the base is built
        tok = load_tokenizer(spec)
        return load_model(spec, tok), tok, spec.name
    config = json.loads((folder / "config.json").read_text())
    spec = None if base is None else base if isinstance(base, ModelSpec) else ModelSpec.model_validate(base)
    name = config["sparta_pretrained_model"] if spec is None else resolve_model_path(spec.name)
    quiet_transformers()
    opts = {} if spec is None else {"revision": spec.revision, "trust_remote_code": spec.trust_remote_code}
    kwargs = dict(dtype=dtype or (getattr(torch, spec.dtype) if spec else torch.float32), use_safetensors=True, **opts)
    if task == "seq-cls":
        if config.get("problem_type") not in (None, "single_label_classification"):
            raise AdapterIntegrityError(
                f"{folder}: problem_type {config['problem_type']!r} is not single-label classification")
        id2label = {int(k): v for k, v in config["id2label"].items()}
        kwargs.update(num_labels=len(id2label), id2label=id2label, label2id={v: k for k, v in id2label.items()})
    base = model_class(task).from_pretrained(name, **kwargs)
    tok_src = folder if (folder / "tokenizer_config.json").is_file() else name
    tok = AutoTokenizer.from_pretrained(str(tok_src), **opts)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if base.config.pad_token_id is None:
        base.config.pad_token_id = tok.pad_token_id
    return base, tok, name


class SpaRTAforSequenceClassification:
    """A SpaRTA classifier for inference: classify, decide_class, evaluate."""

    def __init__(self, adapter, model=None, device: str = "cpu", input_template: str | None = None, dtype=None,
                 base=None):
        import torch

        self.adapter = str(adapter)
        if model is not None:  # reuse a loaded sequence classifier of the same base
            from transformers import AutoTokenizer

            base = model
            tok = AutoTokenizer.from_pretrained(base.config._name_or_path)
            if tok.pad_token is None:
                tok.pad_token = tok.eos_token
            self.model_name = base.config._name_or_path
        else:
            base, tok, self.model_name = _open(adapter, "seq-cls", dtype, base)
        self.model = load(base, self.adapter).eval().to(device)
        if hasattr(base, "score"):  # decoder classifiers read the last token: pad on the left
            tok.padding_side = "left"
        self.tokenizer = tok
        self.device = device
        self.template = input_template
        self.id2label = {str(k): v for k, v in base.config.id2label.items()}
        del torch

    def __repr__(self) -> str:
        labels = ", ".join(f"{k}: '{v}'" for k, v in self.id2label.items())
        return (f"(SpaRTA)ModelForSeqClassification(\n\tadapter = '{self.adapter}'\n"
                f"\tmodel = '{self.model_name}'\n\tid2label = {{{labels}}}\n)")

    def _texts(self, inputs) -> list[str]:
        if self.template:
            return [self.template.format(**x) if isinstance(x, dict) else x for x in inputs]
        bad = [x for x in inputs if not isinstance(x, str)]
        if bad:
            raise SpecError("dict inputs need an input_template with {field} placeholders")
        return list(inputs)

    def __call__(self, input_ids, attention_mask=None):
        import torch

        with torch.no_grad():
            out = self.model(input_ids=input_ids.to(self.device),
                             attention_mask=None if attention_mask is None else attention_mask.to(self.device))
        return out.logits.float()

    def classify(self, texts):
        enc = self.tokenizer(self._texts(texts), return_tensors="pt", padding=True)
        return self(enc["input_ids"], enc.get("attention_mask")).softmax(-1)

    def decide_class(self, texts) -> list[str]:
        return [self.id2label[str(i)] for i in self.classify(texts).argmax(-1).tolist()]

    def evaluate(self, texts, labels, batch_size: int = 1) -> dict:
        """loss (mean NLL), accuracy, confusion matrix, balanced accuracy, MCC and F1 (binary)."""
        import torch

        from workers.evaluate import classification_report

        probs = []
        for i in range(0, len(texts), batch_size):
            probs.append(self.classify(texts[i:i + batch_size]))
        p = torch.cat(probs)
        y = torch.tensor(list(labels))
        loss = float(-p[torch.arange(len(y)), y].log().mean())
        rep = classification_report(y.tolist(), p.tolist(), len(self.id2label), loss)
        out = {"loss": loss, "accuracy": rep["accuracy"],
               "confusion matrix": torch.tensor(rep["confusion_matrix"], dtype=torch.int32),
               "balanced accuracy": rep["balanced_accuracy"]}
        if len(self.id2label) == 2:
            out["MCC"], out["F1-score"] = rep["mcc"], rep["f1"]
        return out

    def to(self, device: str):
        self.model.to(device)
        self.device = device
        return self


class SpaRTAforCausalLM:
    """A SpaRTA-adapted causal LM (merged), used like the transformers model it wraps."""

    def __init__(self, adapter, device_map: str = "cpu", dtype=None, base=None):
        self.adapter = str(adapter)
        base, self.tokenizer, self.model_name = _open(adapter, "causal-lm", dtype, base)
        self.base_model = load(base, self.adapter).merge_and_unload().eval().to(device_map)

    def __repr__(self) -> str:
        return (f"(SpaRTA)ModelForCausalLM(\n\tadapter = '{self.adapter}'\n"
                f"\tbase model = '{self.model_name}'\n)")

    def __getattr__(self, name):
        if name == "base_model":
            raise AttributeError(name)
        return getattr(self.base_model, name)

    def __call__(self, *args, **kwargs):
        return self.base_model(*args, **kwargs)

    def generate(self, *args, **kwargs):
        return self.base_model.generate(*args, **kwargs)

    def save_pretrained(self, *args, **kwargs):
        """The merged model as a plain transformers model (safetensors)."""
        kwargs.setdefault("safe_serialization", True)
        self.base_model.save_pretrained(*args, **kwargs)
