"""A bounded soak: 64 loopback clients for 60 s against three replicas on one MiniLM base — two
LoRA adapters on one replica (they share forwards), two IA3 adapters on another, one SpaRTA adapter
on a third — each request picking an adapter in turn. It stops by itself. One JSON line per figure.

    .venv/bin/python benchmarks/serve_soak.py [--seconds 60] [--clients 64]

The adapters are trained on the demo spec in local mode (4 steps each: load does not depend on
quality). Goal (issue 9): 0 failures.
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


def train(tmp: Path, example: str, seed: int) -> tuple[Path, dict]:
    from pipelines.spec import load_spec
    from workers.stages import build_artifact, ensure_ray, launch_training

    spec = load_spec(ROOT / "pipelines" / "examples" / example,
                     ["train.num_workers=0", "train.max_steps=4", f"train.seed={seed}", f"workspace={tmp / 'ws'}"])
    ensure_ray(spec)
    out = launch_training(spec, run_name=f"soak-{example}-{seed}")
    return build_artifact(spec, out.checkpoint, tmp / f"{example}-{seed}"), spec.model.model_dump(mode="json")


async def soak(targets: list[tuple[str, str]], clients: int, seconds: float) -> dict:
    import httpx

    latencies, failures, per_app = [], 0, {}
    deadline = time.perf_counter() + seconds

    async def client(i: int, http: httpx.AsyncClient):
        nonlocal failures
        n = i
        while time.perf_counter() < deadline:
            url, adapter = targets[n % len(targets)]
            t = time.perf_counter()
            try:
                r = await http.post(url, json={"adapter": adapter, "inputs": [SENTENCES[n % len(SENTENCES)]]})
                ok = r.status_code == 200
            except httpx.HTTPError:
                ok = False
            latencies.append(time.perf_counter() - t)
            failures += not ok
            per_app[adapter] = per_app.get(adapter, 0) + 1
            n += clients

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=60, limits=limits) as http:
        start = time.perf_counter()
        await asyncio.gather(*(client(i, http) for i in range(clients)))
        wall = time.perf_counter() - start
    latencies.sort()
    q = lambda p: latencies[min(len(latencies) - 1, int(p * len(latencies)))]  # noqa: E731
    return {"requests": len(latencies), "failures": failures, "requests_per_s": round(len(latencies) / wall, 1),
            "p50_s": round(q(0.50), 4), "p99_s": round(q(0.99), 4), "per_adapter": per_app}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--port", type=int, default=8124)
    args = p.parse_args(argv)

    from serve.app import deploy, shutdown

    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        lora1, base = train(tmp, "demo.yaml", 1)
        lora2, _ = train(tmp, "demo.yaml", 2)
        ia3a, _ = train(tmp, "ia3.yaml", 1)
        ia3b, _ = train(tmp, "ia3.yaml", 2)
        sparta, _ = train(tmp, "sparta.yaml", 1)
        knobs = dict(port=args.port, num_cpus=0.5, base=base)
        urls = {"lora": deploy({"lora-1": str(lora1), "lora-2": str(lora2)}, name="soak-lora", route_prefix="/lora",
                               **knobs),
                "ia3": deploy({"ia3-1": str(ia3a), "ia3-2": str(ia3b)}, name="soak-ia3", route_prefix="/ia3", **knobs),
                "sparta": deploy({"sparta-1": str(sparta)}, name="soak-sparta", route_prefix="/sparta", **knobs)}
        targets = [(f"{urls['lora']}/v1/classify", "lora-1"), (f"{urls['ia3']}/v1/classify", "ia3-1"),
                   (f"{urls['lora']}/v1/classify", "lora-2"), (f"{urls['sparta']}/v1/classify", "sparta-1"),
                   (f"{urls['ia3']}/v1/classify", "ia3-2")]
        asyncio.run(soak(targets, 4, 2.0))  # warm-up
        fig = asyncio.run(soak(targets, args.clients, args.seconds))
        print(json.dumps({"figure": "soak", "clients": args.clients, "seconds": args.seconds, **fig}), flush=True)
        for app in ("soak-lora", "soak-ia3", "soak-sparta"):
            shutdown(app)


if __name__ == "__main__":
    main()
