"""Where a training run's rank 0 posts its progress (step of total, loss, throughput) for the driver
to show while Ray Train runs: a tiny Ray actor that keeps the latest post, made by the driver and
handed to the workers in the loop's config (`config["progress"]`). A post never waits: the loop
sends it and goes on."""

from __future__ import annotations

import time


class ProgressBoard:
    """The latest progress of one training run (run as a Ray actor with no CPU: `board()`)."""

    def __init__(self):
        self.latest: dict = {}
        self.posts = 0

    def post(self, record: dict) -> None:
        self.latest = {**self.latest, "posted_at": time.time(), **record}  # a post may say when it was made
        self.posts += 1

    def read(self) -> dict:
        return {**self.latest, "posts": self.posts}


def board():
    """A new board as a Ray actor (Ray must be initialized): no CPU, so it fits beside any job."""
    import ray

    return ray.remote(num_cpus=0, max_restarts=0)(ProgressBoard).remote()


class Poster:
    """The loop's side: posts from rank 0 only, fire and forget; nothing when there is no board."""

    def __init__(self, handle, rank: int):
        self.handle = handle if rank == 0 else None

    def post(self, **record) -> None:
        if self.handle is not None:
            self.handle.post.remote(record)
