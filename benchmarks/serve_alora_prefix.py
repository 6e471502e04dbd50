"""P4: aLoRA time to first token after a long base context, through HTTP (streaming), with the
conversation's cached base prefix reused ÷ the whole prompt prefilled again.

A randomly initialised Llama (`serve_generation.adapter_on_random_llama`: ~100M parameters, 4,096 positions)
with an aLoRA adapter trained on it (4 steps, local mode). A conversation of about 1,024 tokens is
sent once with `conversation` set (its prefix cached); then the same conversation plus a short new
turn is sent with the conversation id (reuse) and without it (full prefill), in turns. Time to first
token is the time to the first streamed chunk (`ignore_eos`, so one comes after the first token).
Goal >= 20x. `short_prompt_s` is a ~10-token prompt alone: the floor any reuse can reach, and
`ceiling` the ratio reuse would give at that floor.

    .venv/bin/python benchmarks/serve_alora_prefix.py [--context 1024] [--repeats 5]

One JSON line per figure.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from serve_generation import adapter_on_random_llama  # sets up the path and the quiet environment


def first_token_s(url: str, body: dict) -> float:
    import httpx

    start = time.perf_counter()
    with httpx.stream("POST", f"{url}/v1/completions", json={**body, "stream": True}, timeout=600) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line.startswith("data: ") and '"text": ""' not in line:
                return time.perf_counter() - start
    raise AssertionError("no token streamed")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--context", type=int, default=1024, help="Tokens of the conversation so far.")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--port", type=int, default=8125)
    args = p.parse_args(argv)

    import httpx

    from serve.deploy import deploy, shutdown

    with tempfile.TemporaryDirectory() as t:
        t = Path(t)
        model, folder, base = adapter_on_random_llama(t, "alora.yaml")
        url = deploy({"al": str(folder)}, port=args.port, name="alora-prefix", num_cpus=2, threads=2, base=base)
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(model)
        words = ("Once upon a time there was a little girl named Lily who loved to play in the park with her "
                 "dog and her friends every sunny day ").split()
        history = ""
        while len(tok(history)["input_ids"]) < args.context:
            history += " ".join(words) + " "
        history = tok.decode(tok(history)["input_ids"][1:args.context])  # about `context` tokens
        common = {"model": "al", "max_tokens": 1, "temperature": 0, "ignore_eos": True}
        first_token_s(url, {**common, "prompt": history, "conversation": "c"})  # the conversation so far
        reuse, full, short = [], [], []
        for i in range(args.repeats):
            turn = f"{history} And then turn {i} began."
            reuse.append(first_token_s(url, {**common, "prompt": turn, "conversation": "c"}))
            full.append(first_token_s(url, {**common, "prompt": turn}))
            short.append(first_token_s(url, {**common, "prompt": f"And then turn {i} began."}))
        stats = httpx.get(f"{url}/v1/stats").json()
        shutdown("alora-prefix")
    r, f = statistics.median(reuse), statistics.median(full)
    print(json.dumps({"figure": "P4", "what": "aLoRA time to first token: full prefill / reused base prefix",
                      "context_tokens": args.context, "full_prefill_s": round(f, 4), "reuse_s": round(r, 4),
                      "ratio": round(f / r, 1), "goal": ">= 20", "repeats": args.repeats,
                      "short_prompt_s": round(statistics.median(short), 4),
                      "ceiling": round(f / statistics.median(short), 1),
                      "prefix_tokens_reused": stats["prefix_tokens_reused"]}), flush=True)


if __name__ == "__main__":
    main()
