"""L1 load: one replica serving a MiniLM LoRA classifier, loopback clients each sending one sentence
per request, at 1, 8 and 64 concurrent clients; the same app's no-op route (/healthz) under the same
load; and the same replica configured as before batching (Ray Serve's default max_ongoing_requests 5,
batches of 1), all in one run. One JSON line per figure.

    .venv/bin/python benchmarks/serve_load.py [--seconds 10] [--adapter FOLDER --base MODEL]

Without --adapter it trains a LoRA adapter on the demo spec in local mode (4 steps: throughput does
not depend on quality). Goals at 64 clients (issue 9): 0 failures, p99 <= 1 s, requests/s >= 10x
the 1-client rate or >= 0.5x the no-op route's rate.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from workers.common import quiet_environment  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing from a hub at run time
quiet_environment()

SENTENCES = ["I enjoyed very much the movie.", "It was painful to watch.", "It was a bad movie.",
             "A warm, funny and moving story.", "The plot made no sense at all.", "Great acting, great cast."]


def train_demo_adapter(tmp: Path) -> tuple[Path, dict]:
    from pipelines.spec import load_spec
    from workers.stages import build_artifact, ensure_ray, launch_training

    spec = load_spec(ROOT / "pipelines" / "examples" / "demo.yaml",
                     ["train.num_workers=0", "train.max_steps=4", f"workspace={tmp / 'ws'}"])
    ensure_ray(spec)
    out = launch_training(spec, run_name="serve-load")
    return build_artifact(spec, out.checkpoint, tmp / "adapter"), spec.model.model_dump(mode="json")


async def _load(url: str, clients: int, seconds: float, body: dict | None) -> dict:
    import httpx

    latencies, failures = [], 0
    deadline = time.perf_counter() + seconds

    async def client(i: int, http: httpx.AsyncClient):
        nonlocal failures
        n = i
        while time.perf_counter() < deadline:
            t = time.perf_counter()
            try:
                if body is None:
                    r = await http.get(url)
                else:
                    r = await http.post(url, json={**body, "inputs": [SENTENCES[n % len(SENTENCES)]]})
                ok = r.status_code == 200
            except httpx.HTTPError:
                ok = False
            latencies.append(time.perf_counter() - t)
            failures += not ok
            n += clients

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=60, limits=limits) as http:
        start = time.perf_counter()
        await asyncio.gather(*(client(i, http) for i in range(clients)))
        wall = time.perf_counter() - start
    latencies.sort()
    q = lambda p: latencies[min(len(latencies) - 1, int(p * len(latencies)))]  # noqa: E731
    return {"requests": len(latencies), "failures": failures, "requests_per_s": round(len(latencies) / wall, 1),
            "p50_s": round(q(0.50), 4), "p99_s": round(q(0.99), 4)}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=10.0, help="Load per measurement.")
    p.add_argument("--adapter", help="An adapter folder (default: train one on the demo spec).")
    p.add_argument("--base", help="Its base model (with --adapter).")
    p.add_argument("--port", type=int, default=8123)
    args = p.parse_args(argv)

    import ray

    from serve.app import deploy, shutdown

    with tempfile.TemporaryDirectory() as t:
        if args.adapter:
            folder, base = Path(args.adapter), {"name": args.base}
            ray.init(logging_level="WARNING", log_to_driver=False)
        else:
            folder, base = train_demo_adapter(Path(t))
        configs = {"batched": {"max_ongoing_requests": 64, "max_batch_size": 32},
                   "unbatched": {"max_ongoing_requests": 5, "max_batch_size": 1}}
        rates = {}
        for config, knobs in configs.items():
            url = deploy({"a": str(folder)}, port=args.port, name="load", num_cpus=1, base=base, **knobs)
            body = {"adapter": "a"}
            asyncio.run(_load(f"{url}/v1/classify", 4, 2.0, body))  # warm-up
            for clients in (1, 8, 64):
                fig = asyncio.run(_load(f"{url}/v1/classify", clients, args.seconds, body))
                rates[(config, clients)] = fig["requests_per_s"]
                print(json.dumps({"figure": "L1", "config": config, "route": "classify", "clients": clients, **fig}),
                      flush=True)
            if config == "batched":
                fig = asyncio.run(_load(f"{url}/healthz", 64, args.seconds, None))
                rates["noop"] = fig["requests_per_s"]
                print(json.dumps({"figure": "L1", "config": config, "route": "healthz (no-op)", "clients": 64, **fig}),
                      flush=True)
            shutdown("load")
        b64 = rates[("batched", 64)]
        print(json.dumps({"figure": "L1 ratios", "batched_64_over_1": round(b64 / rates[("batched", 1)], 2),
                          "batched_64_over_noop_64": round(b64 / rates["noop"], 2),
                          "batched_64_over_unbatched_64": round(b64 / rates[("unbatched", 64)], 2)}), flush=True)


if __name__ == "__main__":
    main()
