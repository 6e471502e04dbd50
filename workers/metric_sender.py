"""Rank 0's step metrics to the pipeline's MLflow run without ever stopping the loop: the loop hands
records over and goes on; a background thread sends them (`log_batch`, at most 1000 a call) and, while
the tracking server is unreachable, keeps them and tries again with a growing pause. At the end of
training `close` waits a bounded time for the rest and returns what is still unsent (the backlog) as
plain tuples, which the driver sends with the run's results (a metric sent twice, same key, value,
timestamp and step, is stored once, so a batch whose answer was lost can be sent again)."""

from __future__ import annotations

import logging
import threading
import time

log = logging.getLogger("adapterflow.train")

MAX_BATCH = 1000  # MLflow's limit of metrics per log_batch call


def step_metrics(records: list[dict], ts: int | None = None) -> list[tuple[str, float, int, int]]:
    """(key, value, timestamp ms, step) of every field of the step records but `step`, keys prefixed
    `train/`."""
    ts = int(time.time() * 1000) if ts is None else ts
    return [(f"train/{k}", float(v), ts, int(r["step"])) for r in records for k, v in r.items() if k != "step"]


def send(client, run_id: str, metrics: list[tuple[str, float, int, int]]) -> None:
    """Log (key, value, timestamp, step) tuples to a run, in batches MLflow accepts."""
    from mlflow.entities import Metric

    for i in range(0, len(metrics), MAX_BATCH):
        client.log_batch(run_id, metrics=[Metric(k, v, ts, step) for k, v, ts, step in metrics[i:i + MAX_BATCH]])


class MetricSender:
    """Sends step metrics to `run_id` from a daemon thread; `log` never blocks and never raises."""

    def __init__(self, client, run_id: str, *, min_pause_s: float = 0.5, max_pause_s: float = 10.0):
        self.client, self.run_id = client, run_id
        self.min_pause_s, self.max_pause_s = min_pause_s, max_pause_s
        self.pending: list[tuple[str, float, int, int]] = []
        self.sent = 0
        self.failures = 0
        self.last_error: str | None = None
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="adapterflow-metrics", daemon=True)
        self._thread.start()

    def log(self, records: list[dict]) -> None:
        with self._lock:
            self.pending.extend(step_metrics(records))
        self._wake.set()

    def _run(self) -> None:
        pause = 0.0
        while True:
            with self._lock:
                batch = self.pending[:MAX_BATCH]
                closing = self._closing
            if not batch:
                if closing:
                    return
                self._wake.wait()  # a log or close sets it; pending is read again either way
                self._wake.clear()
                continue
            try:
                send(self.client, self.run_id, batch)
            except Exception as e:  # noqa: BLE001 - whatever the store says, keep the metrics and try again
                self.failures += 1
                self.last_error = f"{type(e).__name__}: {e}"[:500]
                if self.failures == 1 or self.failures % 10 == 0:
                    log.warning("MLflow unreachable (%s): %d step metrics held back, trying again",
                                self.last_error, len(self.pending))
                pause = min(self.max_pause_s, max(self.min_pause_s, 2 * pause))
                self._wake.wait(pause)
                self._wake.clear()
                continue
            with self._lock:
                del self.pending[:len(batch)]
                self.sent += len(batch)
            pause = 0.0

    def close(self, timeout_s: float) -> list[tuple[str, float, int, int]]:
        """Wait up to `timeout_s` for the pending metrics to go out; return those that did not."""
        with self._lock:
            self._closing = True
        self._wake.set()
        self._thread.join(timeout=max(0.0, timeout_s))
        with self._lock:
            backlog = list(self.pending)
        if backlog:
            log.warning("MLflow still unreachable after %.0f s: %d step metrics left for the driver to send (%s)",
                        timeout_s, len(backlog), self.last_error)
        return backlog
