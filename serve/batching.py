"""Our own request batcher for a model replica: concurrent requests that arrive within a short wait
share one call of a batch function, whatever adapter each names. (Ray Serve's `@serve.batch` splits
every batch by multiplexed model id, so requests routed by adapter could never mix there.)"""

from __future__ import annotations

import asyncio
from collections.abc import Callable


class Batcher:
    """`await batcher.submit(item)` -> that item's result from `fn(items)` (run in a thread), which
    returns one result (or an exception, raised to its caller alone) per item."""

    def __init__(self, fn: Callable[[list], list], max_batch_size: int = 32, wait_s: float = 0.005, on_batch=None):
        self.fn, self.max_batch_size, self.wait_s, self.on_batch = fn, max_batch_size, wait_s, on_batch
        self._queue: asyncio.Queue | None = None
        self._task: asyncio.Task | None = None

    async def submit(self, item):
        if self._task is None or self._task.done():
            self._queue = asyncio.Queue()
            self._task = asyncio.get_running_loop().create_task(self._loop())
        future = asyncio.get_running_loop().create_future()
        await self._queue.put((item, future))
        result = await future
        if isinstance(result, BaseException):
            raise result
        return result

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self._queue.get()]
            deadline = loop.time() + self.wait_s
            while len(batch) < self.max_batch_size:  # more requests, until the batch is full or the wait is over
                if not self._queue.empty():
                    batch.append(self._queue.get_nowait())
                elif loop.time() < deadline:
                    await asyncio.sleep(min(0.001, deadline - loop.time()))
                else:
                    break
            live = [(item, fut) for item, fut in batch if not fut.cancelled()]
            if not live:
                continue
            if self.on_batch is not None:
                self.on_batch(len(live))
            try:
                results = await asyncio.to_thread(self.fn, [item for item, _ in live])
            except Exception as exc:  # noqa: BLE001 - the whole batch failed: every caller hears why
                results = [exc] * len(live)
            for (_, fut), result in zip(live, results):
                if not fut.done():
                    fut.set_result(result)
