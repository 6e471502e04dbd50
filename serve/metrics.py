"""A replica's own metrics, exported through Ray's metrics endpoint (Prometheus text, names
prefixed `ray_`) beside Ray Serve's built-in `ray_serve_*` metrics. Tagged with the application."""

from __future__ import annotations

ROWS = [1, 2, 4, 8, 16, 32, 64, 128]
SECONDS = [0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30]


class ReplicaMetrics:
    def __init__(self, app: str):
        from ray.util.metrics import Counter, Gauge, Histogram

        self.tags = {"app": app}
        keys = ("app",)
        self.batch_rows = Histogram("adapterflow_batch_rows", description="Rows (inputs) per forward.",
                                    boundaries=ROWS, tag_keys=keys)
        self.batch_requests = Histogram("adapterflow_batch_requests", description="Requests per batch.",
                                        boundaries=ROWS, tag_keys=keys)
        self.forwards = Counter("adapterflow_forwards", description="Forwards run; mixed: several adapters "
                                "in one forward.", tag_keys=("app", "mixed"))
        self.in_flight = Gauge("adapterflow_requests_in_flight", description="Requests the replica holds "
                               "(queued or running).", tag_keys=keys)
        self.resident = Gauge("adapterflow_adapters_resident", description="Adapters loaded on the replica.",
                              tag_keys=keys)
        self.load_seconds = Histogram("adapterflow_adapter_load_seconds", description="Time to load an adapter "
                                      "onto the base (its checks included).", boundaries=SECONDS, tag_keys=keys)
        self.cache_events = Counter("adapterflow_adapter_cache", description="Adapter cache events on the replica: "
                                    "cache_hits, cache_misses (loaded on demand), evictions, reloads (a new version).",
                                    tag_keys=("app", "event"))
        self._in_flight = 0

    def forward(self, rows: int, mixed: bool) -> None:
        self.batch_rows.observe(rows, tags=self.tags)
        self.forwards.inc(1, tags={**self.tags, "mixed": str(mixed).lower()})

    def batch(self, requests: int) -> None:
        self.batch_requests.observe(requests, tags=self.tags)

    def adapters(self, count: int, load_seconds: list[float]) -> None:
        self.resident.set(count, tags=self.tags)
        for s in load_seconds:
            self.load_seconds.observe(s, tags=self.tags)

    def cache(self, event: str) -> None:
        self.cache_events.inc(1, tags={**self.tags, "event": event})

    def enter(self) -> None:
        self._in_flight += 1
        self.in_flight.set(self._in_flight, tags=self.tags)

    def leave(self) -> None:
        self._in_flight -= 1
        self.in_flight.set(self._in_flight, tags=self.tags)
