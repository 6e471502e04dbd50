"""What the serving benchmarks share: the project root on the path and the quiet, offline
environment (on import); loopback load (N concurrent clients for a bounded time, each request one
sentence to a target in turn); quick adapter training."""

from __future__ import annotations

import asyncio
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from workers.common import quiet_environment  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing from a hub at run time
quiet_environment()

SENTENCES = ["I enjoyed very much the movie.", "It was painful to watch.", "It was a bad movie.",
             "A warm, funny and moving story.", "The plot made no sense at all.", "Great acting, great cast."]


async def drive(targets: list[tuple[str, str | None]], clients: int, seconds: float) -> dict:
    """`targets`: (url, adapter) pairs; adapter None means a GET of the url (a no-op route). Returns
    requests, failures (non-200 or transport errors), requests/s, p50/p99 latency, and requests per target."""
    import httpx

    latencies, failures, per_target = [], 0, {}
    deadline = time.perf_counter() + seconds

    async def client(i: int, http: httpx.AsyncClient):
        nonlocal failures
        n = i
        while time.perf_counter() < deadline:
            url, adapter = targets[n % len(targets)]
            t = time.perf_counter()
            try:
                if adapter is None:
                    r = await http.get(url)
                else:
                    r = await http.post(url, json={"adapter": adapter, "inputs": [SENTENCES[n % len(SENTENCES)]]})
                ok = r.status_code == 200
            except httpx.HTTPError:
                ok = False
            latencies.append(time.perf_counter() - t)
            failures += not ok
            per_target[adapter or url] = per_target.get(adapter or url, 0) + 1
            n += clients

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=60, limits=limits) as http:
        start = time.perf_counter()
        await asyncio.gather(*(client(i, http) for i in range(clients)))
        wall = time.perf_counter() - start
    latencies.sort()

    def q(p: float) -> float:
        return latencies[min(len(latencies) - 1, int(p * len(latencies)))]

    return {"requests": len(latencies), "failures": failures, "requests_per_s": round(len(latencies) / wall, 1),
            "p50_s": round(q(0.50), 4), "p99_s": round(q(0.99), 4), "per_target": per_target}


def run(targets: list[tuple[str, str | None]], clients: int, seconds: float) -> dict:
    return asyncio.run(drive(targets, clients, seconds))


def train_quick(tmp, example: str, seed: int = 1, extra: tuple[str, ...] = ()) -> tuple:
    """An adapter from `pipelines/examples/<example>` in local mode, 4 steps (serving figures do not
    depend on quality): (artifact folder, the operator's base model section)."""
    from pipelines.spec import load_spec
    from workers.stages import build_artifact, ensure_ray, launch_training

    tmp = Path(tmp)
    spec = load_spec(ROOT / "pipelines" / "examples" / example,
                     ["train.num_workers=0", "train.max_steps=4", f"train.seed={seed}", f"workspace={tmp / 'ws'}",
                      *extra])
    ensure_ray(spec)
    out = launch_training(spec, run_name=f"bench-{example}-{seed}")
    return build_artifact(spec, out.checkpoint, tmp / f"{example}-{seed}"), spec.model.model_dump(mode="json")
