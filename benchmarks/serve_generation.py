"""Generation on one replica through HTTP: P2 (adapter tax) and P3 (batched vs one at a time).

A randomly initialised Llama is built here (~100M parameters, 4,096 positions, the stories260K
tokenizer), since stories260K (260K parameters, 512 positions) hides what batching changes. One LoRA
adapter is trained on it (4 steps, local mode) and 7 more are derived from it (weights scaled, each
with its own manifest). Every request asks for 32 new tokens (`ignore_eos`).

- P2: 32 concurrent requests over the 8 adapters, tokens/s ÷ the same 32 requests to the base model
  alone (its name as `model`). Goal >= 0.85.
- P3: the same 32 requests over 8 adapters concurrently ÷ sent one at a time, each to another adapter
  than the last (an adapter switch per request). Goal >= 10x.

    .venv/bin/python benchmarks/serve_generation.py [--requests 32] [--tokens 32] [--rounds 2]

One JSON line per figure.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import tempfile
import time
from pathlib import Path

from serving_load import ROOT, train_quick  # sets up the path and the quiet environment

PROMPTS = ["Give three tips for staying healthy.", "Describe a sunny day at the park.",
           "Write a short story about a cat.", "What is the capital of France?"]


def build_model(folder: Path, hidden: int = 1024, layers: int = 8) -> Path:
    """A random Llama with the stories260K tokenizer, saved as safetensors."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(ROOT.parent / "shared" / "models" / "stories260K")
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=int(hidden * 2.6875),
                      num_hidden_layers=layers, num_attention_heads=16, num_key_value_heads=8,
                      max_position_embeddings=4096, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      tie_word_embeddings=False)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    return folder


def adapter_on_random_llama(tmp: Path, example: str) -> tuple[Path, Path, dict]:
    """The random Llama and an adapter of `pipelines/examples/<example>` trained on it (4 steps, r=8):
    (model folder, adapter folder, the operator's base model section)."""
    model = build_model(tmp / "llama")
    folder, base = train_quick(tmp, example, extra=(
        f"model.name={model}", "data.max_length=64", "train.global_batch_size=4", "adapter.r=8"))
    return model, folder, base


def derive(folder: Path, dst: Path, scale: float) -> Path:
    """Another adapter: every weight of `folder` scaled, with its own manifest."""
    from safetensors.torch import load_file, save_file

    from workers.artifact import MANIFEST, write_manifest

    shutil.copytree(folder, dst)
    weights = dst / "adapter_model.safetensors"
    save_file({k: v * scale for k, v in load_file(str(weights)).items()}, str(weights), metadata={"format": "pt"})
    manifest = json.loads((dst / MANIFEST).read_text())
    (dst / MANIFEST).unlink()
    keep = {k: manifest[k] for k in ("adapter", "max_length") if k in manifest}
    write_manifest(dst, method=manifest["method"], model=manifest["model"],
                   base_sha256=manifest["base_model"]["sha256"], extra=keep)
    return dst


async def concurrent(url: str, bodies: list[dict]) -> float:
    import httpx

    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=len(bodies))) as http:
        start = time.perf_counter()
        responses = await asyncio.gather(*(http.post(url, json=b) for b in bodies))
        wall = time.perf_counter() - start
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses if r.status_code != 200]
    return sum(r.json()["usage"]["completion_tokens"] for r in responses) / wall


def one_at_a_time(url: str, bodies: list[dict]) -> float:
    import httpx

    tokens, start = 0, time.perf_counter()
    with httpx.Client(timeout=600) as http:
        for b in bodies:
            r = http.post(url, json=b)
            assert r.status_code == 200, r.text
            tokens += r.json()["usage"]["completion_tokens"]
    return tokens / (time.perf_counter() - start)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--adapters", type=int, default=8)
    p.add_argument("--rounds", type=int, default=2, help="Measurements of each figure (the best is kept).")
    p.add_argument("--dtypes", default="float32,bfloat16",
                   help="The replica's dtypes to measure, in turn (model.dtype of the operator's base).")
    p.add_argument("--port", type=int, default=8124)
    args = p.parse_args(argv)

    with tempfile.TemporaryDirectory() as t:
        t = Path(t)
        _, folder, base = adapter_on_random_llama(t, "stories_instruct.yaml")
        adapters = {"a0": str(folder)}
        for i in range(1, args.adapters):
            adapters[f"a{i}"] = str(derive(folder, t / f"a{i}", 1.0 + 0.25 * i))
        for dtype in args.dtypes.split(","):
            measure(adapters, {**base, "dtype": dtype}, args)


def measure(adapters: dict, base: dict, args) -> None:
    import httpx

    from serve.deploy import deploy, shutdown

    url = deploy(adapters, port=args.port, name="generation", num_cpus=2, threads=2, base=base,
                 max_batch_size=args.requests)
    base_id = next(m["id"] for m in httpx.get(f"{url}/v1/models").json()["data"] if m["method"] == "base")

    def bodies(model_of):
        return [{"model": model_of(i), "prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": args.tokens,
                 "temperature": 0, "ignore_eos": True} for i in range(args.requests)]

    mixed = bodies(lambda i: f"a{i % args.adapters}")
    plain = bodies(lambda i: base_id)
    endpoint = f"{url}/v1/completions"
    asyncio.run(concurrent(endpoint, mixed[:4]))  # warm-up
    best = {"adapters": 0.0, "base": 0.0, "sequential": 0.0}
    for _ in range(args.rounds):
        best["adapters"] = max(best["adapters"], asyncio.run(concurrent(endpoint, mixed)))
        best["base"] = max(best["base"], asyncio.run(concurrent(endpoint, plain)))
    best["sequential"] = one_at_a_time(endpoint, mixed)
    shutdown("generation")
    common = {"requests": args.requests, "new_tokens": args.tokens, "adapters": args.adapters, "dtype": base["dtype"]}
    print(json.dumps({"figure": "P2", "what": "adapter tax: batched over adapters / base model alone",
                      "adapters_tokens_per_s": round(best["adapters"], 1), "base_tokens_per_s": round(best["base"], 1),
                      "ratio": round(best["adapters"] / best["base"], 3), "goal": ">= 0.85", **common}), flush=True)
    print(json.dumps({"figure": "P3", "what": "batched / one request at a time with an adapter switch each",
                      "batched_tokens_per_s": round(best["adapters"], 1),
                      "sequential_tokens_per_s": round(best["sequential"], 1),
                      "ratio": round(best["adapters"] / best["sequential"], 2), "goal": ">= 10", **common}), flush=True)


if __name__ == "__main__":
    main()
