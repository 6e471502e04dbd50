"""P6: switching between SpaRTA adapters in a live replica (the in-place delta merge/unmerge of
`workers/methods/sparta/inference.py`) against reloading the base model and the adapter, in one run.
One JSON line per figure.

    .venv/bin/python benchmarks/serve_sparta_switch.py [--repeats 20]

Two SpaRTA adapters are trained on the demo spec (MiniLM, local mode, a few steps; the switch cost
does not depend on quality). A switch is measured as a one-sentence classify request that alternates
adapters minus the same request without a switch; a reload as building a replica's engine for one
adapter (base model + adapter, checks included), with the base's weight digest cached in the process
and recomputed as a new replica does. Goal (issue 9): reload / switch >= 50.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

from serving_load import train_quick  # sets up the path and the quiet environment


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=20)
    args = p.parse_args(argv)

    from serve.deploy import build_engine

    with tempfile.TemporaryDirectory() as t:
        a, base = train_quick(t, "sparta.yaml", 1, ("adapter.seed=1",))
        b, _ = train_quick(t, "sparta.yaml", 2, ("adapter.seed=2",))
        engine = build_engine({"a": str(a), "b": str(b)}, base)
        text = ["A warm, funny and moving story."]
        for name in ("a", "b", "a"):  # warm-up
            engine.classify(name, text)

        def timed(names):
            out = []
            for name in names:
                t0 = time.perf_counter()
                engine.classify(name, text)
                out.append(time.perf_counter() - t0)
            return statistics.median(out)

        same = timed(["a"] * args.repeats)
        alternating = timed(["b", "a"] * (args.repeats // 2))
        switch = max(alternating - same, 1e-6)
        from workers.models import _fingerprint

        def reload_time(fresh_digest: bool) -> float:
            times = []
            for _ in range(3):
                if fresh_digest:  # what a new replica process does: hash the base's weights again
                    _fingerprint.cache_clear()
                t0 = time.perf_counter()
                build_engine({"a": str(a)}, base)
                times.append(time.perf_counter() - t0)
            return statistics.median(times)

        reload = reload_time(False)
        cold = reload_time(True)
        for figure in ({"figure": "P6", "what": "classify, same adapter", "median_s": round(same, 5)},
                       {"figure": "P6", "what": "classify, switching adapter", "median_s": round(alternating, 5)},
                       {"figure": "P6", "what": "switch (difference)", "median_s": round(switch, 5)},
                       {"figure": "P6", "what": "reload base + adapter, base digest cached", "median_s": round(reload, 3)},
                       {"figure": "P6", "what": "reload base + adapter, base digest recomputed (a new replica)",
                        "median_s": round(cold, 3)},
                       {"figure": "P6 ratio", "reload_over_switch": round(reload / switch, 1),
                        "new_replica_reload_over_switch": round(cold / switch, 1), "goal": 50}):
            print(json.dumps(figure), flush=True)


if __name__ == "__main__":
    main()
