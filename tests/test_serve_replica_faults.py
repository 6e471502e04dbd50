"""A model replica SIGKILLed under a bounded loopback load, from outside (the test kills its process):
with 2 replicas no request fails, because the ingress sends a classify that lost its replica again
(serve.replica_retries) and Serve's router takes it to the other replica, or to the one Serve starts
in place of the dead; every answer is the one the adapter gives. (How long recovery takes is measured
in benchmarks/serve_faults.py, not here.)"""

from __future__ import annotations

import os
import signal
import threading
import time

import httpx
import pytest

pytestmark = pytest.mark.slow

# 128 inputs a request: each takes long enough that requests are in flight on the replica when it dies
# (with serve.replica_retries 0 this test fails: those requests get 503)
TEXTS = ["good great movie", "bad awful plot"] * 64


def _replica_pids(app: str) -> set[int]:
    """The live model replica processes of `app` (Ray titles a replica's process `ray::ServeReplica:APP:...`)."""
    import psutil

    return {p.info["pid"] for p in psutil.process_iter(["pid", "cmdline", "status"])
            if f"ServeReplica:{app}:Model-" in " ".join(p.info["cmdline"] or [])
            and p.info["status"] != psutil.STATUS_ZOMBIE}


def test_a_killed_replica_loses_no_request_with_two_replicas(trained_adapters, serve_port, ray_session):
    from ray import serve

    from serve.deploy import deploy, shutdown

    lora = trained_adapters("lora")
    app = "replica-faults"
    url = deploy({"l1": str(lora["folder"])}, port=serve_port, name=app, route_prefix="/rf", num_cpus=0.25,
                 num_replicas=2, base=lora["spec"].model.model_dump(mode="json"))
    try:
        ref = httpx.post(f"{url}/v1/classify", json={"adapter": "l1", "inputs": TEXTS}, timeout=120)
        assert ref.status_code == 200, ref.text
        want = [r["probabilities"]["positive"] for r in ref.json()["results"]]
        before = _replica_pids(app)
        assert len(before) == 2, before

        answers: list[tuple[float, int, list | str, str]] = []
        stop = threading.Event()

        def client():
            with httpx.Client(timeout=120) as c:
                while not stop.is_set():
                    r = c.post(f"{url}/v1/classify", json={"adapter": "l1", "inputs": TEXTS})
                    body = [x["probabilities"]["positive"] for x in r.json()["results"]] if r.status_code == 200 \
                        else r.text
                    answers.append((time.monotonic(), r.status_code, body, r.headers.get("x-adapterflow-replica", "")))
                    time.sleep(0.02)  # a bounded load: 3 clients, at most ~50 requests/s

        threads = [threading.Thread(target=client, daemon=True) for _ in range(3)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 120
        while len(answers) < 30:
            assert time.monotonic() < deadline, answers[-3:]
            time.sleep(0.05)
        victim = min(before)
        killed_at = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        # load goes on until Serve runs 2 replicas again and 30 more requests were answered after that
        while True:
            assert time.monotonic() < deadline + 180, "Serve did not bring back a second replica"
            (dep,) = [d for n, d in serve.status().applications[app].deployments.items() if n.startswith("Model-")]
            if dep.replica_states.get("RUNNING") == 2 and dep.status == "HEALTHY" and victim not in _replica_pids(app):
                break
            time.sleep(0.2)
        back_at, n_back = time.monotonic(), len(answers)
        while len(answers) < n_back + 30:
            assert time.monotonic() < deadline + 300, "no answers after the replacement"
            time.sleep(0.05)
        stop.set()
        for t in threads:
            t.join(150)

        after_kill = [a for a in answers if a[0] >= killed_at]
        assert len(after_kill) >= 30
        failed = [a for a in answers if a[1] != 200]
        assert not failed, f"{len(failed)} of {len(answers)} failed, e.g. {failed[:3]}"
        for _, _, probs, _ in answers:
            assert probs == pytest.approx(want, abs=1e-5)
        assert [a for a in answers if a[0] >= back_at], "no answers once the replacement was up"
        status = serve.status().applications[app].deployments
        assert all(d.status == "HEALTHY" for d in status.values()), status
    finally:
        shutdown(app)
