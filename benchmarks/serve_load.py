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
import json
import tempfile
from pathlib import Path

from serving_load import run, train_quick  # sets up the path and the quiet environment


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=10.0, help="Load per measurement.")
    p.add_argument("--adapter", help="An adapter folder (default: train one on the demo spec).")
    p.add_argument("--base", help="Its base model (with --adapter).")
    p.add_argument("--port", type=int, default=8123)
    args = p.parse_args(argv)

    import ray

    from serve.deploy import deploy, shutdown

    with tempfile.TemporaryDirectory() as t:
        if args.adapter:
            folder, base = Path(args.adapter), {"name": args.base}
            ray.init(logging_level="WARNING", log_to_driver=False)
        else:
            folder, base = train_quick(t, "demo.yaml")
        configs = {"batched": {"max_ongoing_requests": 64, "max_batch_size": 32},
                   "unbatched": {"max_ongoing_requests": 5, "max_batch_size": 1}}
        rates = {}
        for config, knobs in configs.items():
            url = deploy({"a": str(folder)}, port=args.port, name="load", num_cpus=1, base=base, **knobs)
            target = [(f"{url}/v1/classify", "a")]
            run(target, 4, 2.0)  # warm-up
            for clients in (1, 8, 64):
                fig = run(target, clients, args.seconds)
                fig.pop("per_target")
                rates[(config, clients)] = fig["requests_per_s"]
                print(json.dumps({"figure": "L1", "config": config, "route": "classify", "clients": clients, **fig}),
                      flush=True)
            if config == "batched":
                fig = run([(f"{url}/healthz", None)], 64, args.seconds)
                fig.pop("per_target")
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
