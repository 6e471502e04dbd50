"""The inference engine a Ray Serve replica (and the MLflow pyfunc model) runs: one base model,
any number of adapters loaded by name, classification and text completion."""

from __future__ import annotations

import contextlib
import logging
import threading
from pathlib import Path

from workers.config import ModelSpec
from workers.errors import (
    AdapterflowError,
    AdapterIntegrityError,
    RequestError,
    RequestTooLargeError,
    UnknownAdapterError,
    WrongTaskError,
)
from workers.methods import manifest_spec, method_for_manifest

log = logging.getLogger(__name__)

__all__ = ["Engine", "WrongTaskError"]


class Engine:
    def __init__(self, model_spec: ModelSpec | dict, threads: int | None = None, device: str = "cpu"):
        import torch

        from workers.models import base_fingerprint, load_model, load_tokenizer

        if threads:
            torch.set_num_threads(threads)
        self.spec = model_spec if isinstance(model_spec, ModelSpec) else ModelSpec.model_validate(model_spec)
        self.device = torch.device(device)  # the operator's: serve.device (a GPU replica: cuda)
        self.tokenizer = load_tokenizer(self.spec)
        self.base = load_model(self.spec, self.tokenizer).to(self.device)
        self.base.eval()
        self.base_sha256 = base_fingerprint(self.spec)
        self.model = None  # the PeftModel once an adapter is loaded
        self.adapters: dict[str, dict] = {}
        self.tokenizers: dict[str, object] = {}  # adapters that added tokens bring their tokenizer
        self._lock = threading.Lock()
        # forwards run, rows they held, and forwards that mixed adapters (PEFT adapter_names)
        self.stats = {"forwards": 0, "rows": 0, "mixed_forwards": 0}
        self.max_prompt_tokens: int | None = None  # a serving limit, when the replica sets one
        self.on_forward = None  # called with (rows, mixed) after each batched forward, when set
        self.load_seconds: dict[str, float] = {}  # adapter -> time its load took
        self.folders: dict[str, Path] = {}  # adapter -> the folder it was loaded from
        self.max_decode_rows = 32  # rows the decode loop runs at once (serve.max_batch_size)
        self._decoder = None  # the continuous-batching decode loop, started on the first completion
        from workers.prefixes import PrefixStore

        self.prefixes = PrefixStore()  # conversation id -> the base's cache of its prefix (aLoRA, base)
        # an adapter replaced at run time (a registry alias moved) is loaded beside the old one under
        # another model-level name; the old one goes once no running request uses it
        self.peft_names: dict[str, str] = {}  # served name -> the name the model knows it by
        self._methods: dict[str, object] = {}  # model-level name -> its method
        self._uses: dict[str, int] = {}  # model-level name -> decode rows holding it
        self._retired: set[str] = set()
        self._serial = 0
        self._uses_lock = threading.Lock()

    # ------------------------------------------------------------------ adapters
    def add_adapter(self, name: str, folder: str | Path, manifest: dict, replace: bool = False) -> None:
        """Load an adapter under `name`; with `replace`, a new version of a loaded one: requests
        already running finish on the old version, new ones get the new."""
        import time

        from workers.trust import check_against_base, refuse_remote_code

        started = time.perf_counter()
        folder = Path(folder)
        refuse_remote_code(manifest, folder)
        check_against_base(manifest, self.spec, self.base_sha256, folder)
        if manifest["task"] != self.spec.task:
            raise AdapterIntegrityError(
                f"adapter {name!r} is for task {manifest['task']!r}, this base serves {self.spec.task!r}"
            )
        if name in self.adapters and not replace:
            raise AdapterIntegrityError(f"adapter {name!r} is already loaded; unload it first, or replace it")
        if self.serves_base(name) or name == self.base_id and self.spec.task == "causal-lm":
            raise AdapterIntegrityError(f"{name!r} is the base model's name; choose another adapter name")
        method = method_for_manifest(manifest)
        others = {n: m for n, m in self.adapters.items() if n != name}
        groups = {method_for_manifest(m).replica_group() for m in others.values()} | {method.replica_group()}
        if len(groups) > 1:
            methods = sorted({m["method"] for m in others.values()} | {manifest["method"]})
            raise AdapterIntegrityError(
                f"adapter {name!r} ({manifest['method']}) cannot share a replica with the adapters already "
                f"loaded ({', '.join(methods)}): their methods change the base in incompatible ways; "
                "deploy them as separate applications"
            )
        limit = method.max_adapters_per_replica
        if limit is not None and len(others) >= limit:
            raise AdapterIntegrityError(f"adapter {name!r}: a replica holds at most {limit} {method.name} "
                                        "adapter(s); deploy it as its own application")
        with self._lock:
            inner = name
            if inner in self._methods:  # the model still knows that name (a version being replaced)
                self._serial += 1
                inner = f"{name}~{self._serial}"
            if self.model is None:
                self.model = method.load(self.base, folder, adapter_name=inner)
            else:
                method.add(self.model, folder, inner)
            self.model.to(self.device)  # the adapter's weights where the base is
            self.model.eval()
            self._methods[inner] = method
            with self._uses_lock:
                old = self.peft_names.get(name)
                self.peft_names[name] = inner
                self.adapters[name] = manifest
            self.tokenizers.pop(name, None)
            if (folder / "tokenizer_config.json").is_file():
                from workers.models import adapter_tokenizer

                self.tokenizers[name] = adapter_tokenizer(self.spec, folder)
            if old is not None:
                self._retire(old)
        self.load_seconds[name] = time.perf_counter() - started
        self.folders[name] = folder
        log.info("loaded adapter %s (%s) from %s", name, manifest["method"], folder)

    def remove_adapter(self, name: str) -> None:
        """Stop serving `name`; its weights go once no running request uses them."""
        with self._lock:
            if name not in self.adapters:
                raise UnknownAdapterError(f"unknown adapter {name!r}")
            with self._uses_lock:
                del self.adapters[name]
                inner = self.peft_names.pop(name)
            self.tokenizers.pop(name, None)
            self.load_seconds.pop(name, None)
            self.folders.pop(name, None)
            self._retire(inner)

    def peft(self, name: str) -> str:
        """The model-level name of a served adapter."""
        return self.peft_names.get(name, name)

    def _hold_current(self, name: str) -> str:
        """The model-level name `name` is served by now, held against unloading."""
        with self._uses_lock:
            if name not in self.adapters:
                raise UnknownAdapterError(f"unknown adapter {name!r}")
            inner = self.peft(name)
            self._uses[inner] = self._uses.get(inner, 0) + 1
            return inner

    def release(self, inner: str) -> None:
        with self._uses_lock:
            self._uses[inner] = self._uses.get(inner, 1) - 1

    def _retire(self, inner: str) -> None:
        self._retired.add(inner)
        self.reap()

    def reap(self) -> None:
        """Delete retired adapters no request holds (the caller holds the engine lock). The model's
        last adapter stays (unreachable) until another is loaded."""
        for inner in sorted(self._retired):
            with self._uses_lock:
                if self._uses.get(inner, 0) > 0 or len(self._methods) < 2:
                    continue
                method = self._methods.pop(inner)
                self._retired.discard(inner)
                self._uses.pop(inner, None)
            method.unload(self.model, inner)
            log.info("unloaded adapter %s", inner)

    def _select(self, name: str, task: str):
        manifest = self._check(name, task)
        self.model.set_adapter(self.peft(name))
        return manifest

    def _check(self, name: str, task: str) -> dict:
        if name not in self.adapters:
            raise UnknownAdapterError(
                f"unknown adapter {name!r}; loaded adapters: {', '.join(sorted(self.adapters)) or 'none'}"
            )
        manifest = self.adapters[name]
        if manifest["task"] != task:
            raise WrongTaskError(
                f"adapter {name!r} is a {manifest['task']} adapter; this endpoint needs a {task} adapter"
            )
        return manifest

    # ------------------------------------------------------------------ classification
    def _samples(self, name: str, manifest: dict, samples: int | None) -> int:
        method = method_for_manifest(manifest)
        if samples is None:
            spec = manifest_spec(manifest)
            samples = method.monte_carlo_samples(spec) if spec is not None else 0
        n = samples
        if n and not method.monte_carlo:
            raise WrongTaskError(f"adapter {name!r} is a {method.name} adapter, which gives no Monte-Carlo "
                                 "outputs; send samples: 0 or leave it out")
        if n == 1:
            raise WrongTaskError("samples: a confidence interval needs at least 2 samples (0 = mean only)")
        return n

    def monte_carlo_samples(self, name: str, samples: int | None) -> int:
        """The Monte-Carlo forwards a classify request asks for (checked against the adapter)."""
        return self._samples(name, self._check(name, "seq-cls"), samples)

    def _texts(self, name: str, manifest: dict, inputs: list) -> list[str]:
        from workers.data import render

        template = manifest.get("input_template")
        texts = []
        for x in inputs:
            if isinstance(x, dict):
                if not template:
                    raise WrongTaskError(f"adapter {name!r} has no input_template; send plain strings")
                texts.append(render(template, x))
            else:
                texts.append(x)
        return texts

    @staticmethod
    def _labelled(row: list[float], id2label: dict[int, str]) -> dict:
        best = max(range(len(row)), key=row.__getitem__)
        return {"probabilities": {id2label[i]: p for i, p in enumerate(row)}, "label": id2label[best],
                "label_id": best}

    def draws_at_inference(self, name: str) -> bool:
        """Whether a plain forward of adapter `name` is a random draw (PVeRA with sample_at_inference):
        such a request runs alone, seeded, so its answer is the same alone or among others."""
        manifest = self.adapters.get(name)
        spec = manifest_spec(manifest) if manifest is not None else None
        return spec is not None and method_for_manifest(manifest).draws_at_inference(spec)

    @contextlib.contextmanager
    def _seeded(self, seed: int | None):
        """The forwards inside draw from torch's generator seeded with `seed` (restored afterwards)."""
        if seed is None:
            yield
            return
        import torch

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            yield

    def classify_batch(self, requests: list[tuple[str, list]], max_rows: int = 64, seed: int | None = None) -> list:
        """Many classify requests in as few forwards as their methods allow: adapters whose method
        declares `shares_forward` share one forward (PEFT's `adapter_names`), any other adapter gets
        forwards of its own. Per request, its results, or the user error it raised (a bad request
        never fails the others). With `seed`, the forwards' random draws (an adapter that draws at
        inference) come from torch's generator seeded with it."""
        import torch

        out: list = [None] * len(requests)
        groups: dict[tuple, list] = {}
        labels: dict[int, dict] = {}
        # names resolve to model-level ones and stay loaded until the forwards are done
        with self._lock, self._seeded(seed):
            for i, (name, inputs) in enumerate(requests):
                try:
                    manifest = self._check(name, "seq-cls")
                    texts = self._texts(name, manifest, inputs)
                except AdapterflowError as exc:
                    out[i] = exc
                    continue
                labels[i] = {int(k): v for k, v in manifest["model"]["id2label"].items()}
                tok = self.tokenizers.get(name, self.tokenizer)
                shared = method_for_manifest(manifest).shares_forward
                key = (id(tok), manifest.get("max_length", 512), "*" if shared else name)
                groups.setdefault(key, []).append((i, self.peft(name), texts, tok))
            rows_of: dict[int, list] = {i: [] for i in range(len(requests)) if out[i] is None}
            for (_, max_length, _), entries in groups.items():
                rows = [(i, name, text) for i, name, texts, _ in entries for text in texts]
                tok = entries[0][3]
                for start in range(0, len(rows), max_rows):
                    chunk = rows[start:start + max_rows]
                    names = [n for _, n, _ in chunk]
                    kwargs = {}
                    if len(set(names)) > 1:
                        kwargs["adapter_names"] = names
                        self.stats["mixed_forwards"] += 1
                    else:
                        self.model.set_adapter(names[0])
                    enc = tok([t for _, _, t in chunk], padding=True, truncation=True, max_length=max_length,
                              return_tensors="pt").to(self.device)
                    with torch.no_grad():
                        probs = torch.softmax(self.model(**enc, **kwargs).logits.float(), -1)
                    self.stats["forwards"] += 1
                    self.stats["rows"] += len(chunk)
                    if self.on_forward is not None:
                        self.on_forward(len(chunk), "adapter_names" in kwargs)
                    for (i, _, _), row in zip(chunk, probs.tolist()):
                        rows_of[i].append(row)
        for i, rows in rows_of.items():
            out[i] = [self._labelled(row, labels[i]) for row in rows]
        return out

    def classify(self, name: str, inputs: list, samples: int | None = None, seed: int = 0) -> list[dict]:
        """Probabilities per label and the decided label; with `samples` (PVeRA) also the
        Monte-Carlo mean and 95 % interval of every probability."""
        import torch

        if not self.monte_carlo_samples(name, samples):
            result = self.classify_batch([(name, inputs)], seed=seed if self.draws_at_inference(name) else None)[0]
            if isinstance(result, Exception):
                raise result
            return result
        with self._lock:
            manifest = self._select(name, "seq-cls")
            n_mc = self._samples(name, manifest, samples)
            texts = self._texts(name, manifest, inputs)
            id2label = {int(k): v for k, v in manifest["model"]["id2label"].items()}
            enc = self.tokenizers.get(name, self.tokenizer)(texts, padding=True, truncation=True,
                                 max_length=manifest.get("max_length", 512), return_tensors="pt").to(self.device)
            with torch.no_grad():
                probs = torch.softmax(self.model(**enc).logits.float(), -1)
            mc = None
            if n_mc:
                from workers.montecarlo import mc_outputs

                mc = mc_outputs(self.model, dict(enc), n_mc, seed, "seq-cls", method_for_manifest(manifest),
                                adapter_name=self.peft(name))
        out = []
        for j, row in enumerate(probs.tolist()):
            item = self._labelled(row, id2label)
            if mc is not None:
                item["monte_carlo"] = {"samples": n_mc, **{
                    k: {id2label[i]: v for i, v in enumerate(mc[k][j].tolist())} for k in ("mean", "low", "high")}}
            out.append(item)
        return out

    # ------------------------------------------------------------------ completion
    def chat_prompt(self, name: str, messages: list[dict]) -> str:
        """The prompt a chat request makes: the messages rendered by `model.chat_template` (the
        operator's, else the training run's), else the adapter's tokenizer's own chat template."""
        if self.serves_base(name):
            manifest, tok = {"model": {}}, self.tokenizer
        else:
            manifest, tok = self._check(name, "causal-lm"), self.tokenizers.get(name, self.tokenizer)
        template = self.spec.chat_template or manifest["model"].get("chat_template") or tok.chat_template
        if not template:
            raise WrongTaskError(f"adapter {name!r}: no chat template (its tokenizer has none and model.chat_template "
                                 "is not set); set model.chat_template, or use /v1/completions")
        try:
            return tok.apply_chat_template(messages, chat_template=template, tokenize=False,
                                           add_generation_prompt=True)
        except Exception as exc:  # noqa: BLE001 - jinja raises many kinds on a message the template rejects
            raise RequestError(f"the chat template cannot render these messages: {exc}") from None

    @property
    def decoder(self):
        if self._decoder is None:
            from workers.generation import Decoder

            self._decoder = Decoder(self, max_rows=self.max_decode_rows)
        return self._decoder

    def completion_samples(self, name: str, samples: int | None) -> int:
        """The Monte-Carlo forwards a completion asks for (checked against the adapter)."""
        if self.serves_base(name):
            if samples:
                raise WrongTaskError("the base model gives no Monte-Carlo outputs; send samples: 0 or leave it out")
            return 0
        return self._samples(name, self._check(name, "causal-lm"), samples)

    @property
    def base_id(self) -> str:
        """The name the base model is served under (`model` in a completion): its hub id, or the
        folder's name for a local base."""
        from workers.models import served_name

        return served_name(self.spec)

    def serves_base(self, name: str) -> bool:
        return self.spec.task == "causal-lm" and name == self.base_id and name not in self.adapters

    def start_completion(self, name: str, prompt: str, *, emit, max_tokens: int = 64, temperature: float = 0.0,
                         top_p: float = 1.0, seed: int | None = None, stop: list[str] | None = None,
                         ignore_eos: bool = False, conversation: str | None = None):
        """Queue a completion on the decode loop; `emit(event)` is called from the loop's thread with
        each piece of text (`{"text"}`), the last one with `finish_reason` and token counts, or
        `{"error": exc}`. Request errors raise here, before anything is queued. With `conversation`,
        an aLoRA adapter's (or the base model's) request reuses the base's cache of the longest prefix
        that conversation sent before; other adapters ignore it."""
        from workers.generation import BASE, Row

        if self.serves_base(name):  # the base model alone: the operator's prompt format, no adapter
            manifest, method, tok, fmt, adapter = None, None, self.tokenizer, self.spec.prompt_format, BASE
        else:
            manifest = self._check(name, "causal-lm")
            method, adapter = method_for_manifest(manifest), name
            tok = self.tokenizers.get(name, self.tokenizer)
            fmt = manifest["model"].get("prompt_format", "{prompt}")
        ids = tok(fmt.format(prompt=prompt))["input_ids"]
        if self.max_prompt_tokens is not None and len(ids) > self.max_prompt_tokens:
            raise RequestTooLargeError(f"the prompt has {len(ids)} tokens, over this server's limit of "
                                       f"{self.max_prompt_tokens} (serve.max_prompt_tokens)")
        positions = getattr(self.base.config, "max_position_embeddings", None)
        if positions and len(ids) + max_tokens > positions:
            raise RequestTooLargeError(f"the prompt's {len(ids)} tokens plus max_tokens {max_tokens} exceed the "
                                       f"model's {positions} positions; shorten the prompt or lower max_tokens")
        if manifest is None:  # base rows join the shared lane when every adapter here shares forwards
            draws = False
            shared = all(method_for_manifest(m).shares_forward for m in self.adapters.values())
            lane = (id(tok), "*" if shared else BASE)
        else:
            spec = manifest_spec(manifest)
            draws = spec is not None and method.draws_at_inference(spec)
            adapter = self._hold_current(name)  # its weights stay until the row is done (the loop releases)
            lane = (id(tok), "*" if method.shares_forward and not draws else adapter)
        if draws:
            lane += (self.decoder.new_id(),)
        config = getattr(self.model, "peft_config", {}).get(adapter)
        row = Row(adapter=adapter, lane=lane, ids=list(ids), tokenizer=tok, max_tokens=max_tokens, emit=emit,
                  temperature=temperature, top_p=top_p, seed=seed, stop=list(stop or []),
                  eos=None if ignore_eos else tok.eos_token_id, draws=draws,
                  alora=getattr(config, "alora_invocation_tokens", None) is not None)
        if conversation is not None and (row.alora or adapter == BASE):
            row.conversation = (id(tok), conversation)
        return self.decoder.submit(row)

    def complete(self, name: str, prompt: str, *, max_tokens: int = 64, temperature: float = 0.0,
                 top_p: float = 1.0, seed: int | None = None, stop: list[str] | None = None,
                 samples: int | None = None, ignore_eos: bool = False, conversation: str | None = None) -> dict:
        """A completion through the decode loop (batched with whatever else runs); with `samples`
        (PVeRA) also the Monte-Carlo mean and 95 % interval of each generated token's log-probability."""
        import queue

        import torch

        n_mc = self.completion_samples(name, samples)
        events: queue.Queue = queue.Queue()
        row = self.start_completion(name, prompt, emit=events.put, max_tokens=max_tokens, temperature=temperature,
                                    top_p=top_p, seed=seed, stop=stop, ignore_eos=ignore_eos,
                                    conversation=conversation)
        pieces = []
        while True:
            event = events.get()
            if "error" in event:
                raise event["error"]
            pieces.append(event["text"])
            if "finish_reason" in event:
                break
        out = {"text": "".join(pieces), "finish_reason": event["finish_reason"],
               "prompt_tokens": event["prompt_tokens"], "completion_tokens": event["completion_tokens"]}
        if n_mc and row.out:
            from workers.montecarlo import mc_outputs, token_logprobs

            manifest = self.adapters[name]
            full = torch.tensor([row.ids + row.out], device=self.device)
            n_prompt = len(row.ids)
            with self._lock:
                self.model.set_adapter(self.peft(name))
                draws = mc_outputs(self.model, {"input_ids": full}, n_mc, seed or 0, "causal-lm",
                                   method_for_manifest(manifest), adapter_name=self.peft(name),
                                   reduce=token_logprobs(full))
            out["monte_carlo"] = {"samples": n_mc, "tokens": [row.tokenizer.decode([t]) for t in row.out],
                                  **{k: draws[k][0, n_prompt - 1:].tolist() for k in ("mean", "low", "high")}}
        return out
