"""A bounded soak: 64 loopback clients for 60 s against one application on one MiniLM base serving
five adapters of three families — two LoRA adapters (they share forwards), two IA3 adapters and one
SpaRTA adapter — so its ingress routes to three model deployments, one per replica group; each
request picks an adapter in turn. It stops by itself. One JSON line per figure.

    .venv/bin/python benchmarks/serve_soak.py [--seconds 60] [--clients 64]

The adapters are trained on the demo spec in local mode (4 steps each: load does not depend on
quality). Goal (issue 9): 0 failures.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from serving_load import run, train_quick  # sets up the path and the quiet environment


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--port", type=int, default=8124)
    args = p.parse_args(argv)

    from serve.deploy import deploy, shutdown

    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        lora1, base = train_quick(tmp, "demo.yaml", 1)
        lora2, _ = train_quick(tmp, "demo.yaml", 2)
        ia3a, _ = train_quick(tmp, "ia3.yaml", 1)
        ia3b, _ = train_quick(tmp, "ia3.yaml", 2)
        sparta, _ = train_quick(tmp, "sparta.yaml", 1)
        url = deploy({"lora-1": str(lora1), "lora-2": str(lora2), "ia3-1": str(ia3a), "ia3-2": str(ia3b),
                      "sparta-1": str(sparta)}, name="soak", route_prefix="/soak", port=args.port, num_cpus=0.5,
                     base=base)
        targets = [(f"{url}/v1/classify", name) for name in ("lora-1", "ia3-1", "lora-2", "sparta-1", "ia3-2")]
        run(targets, 4, 2.0)  # warm-up
        fig = run(targets, args.clients, args.seconds)
        print(json.dumps({"figure": "soak", "clients": args.clients, "seconds": args.seconds, **fig}), flush=True)
        shutdown("soak")


if __name__ == "__main__":
    main()
