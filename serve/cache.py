"""The adapters one replica holds: an LRU, bounded by count and by bytes, over the adapters the
application's registry (`serve.registry`) names. A request for a registered adapter the replica does
not hold loads it (a miss); the least recently used adapter no request holds makes room (an
eviction); an adapter whose weights alone exceed the byte bound is refused (`RequestTooLargeError`)
and evicts nothing. The replica re-reads the registry every `registry_sync_s` (and at once for a
name it does not know), and re-resolves registry aliases (`models:/NAME@ALIAS`) every
`alias_refresh_s`: a moved alias loads the new version beside the old, requests already running
finish on the old one."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from pathlib import Path

from workers.errors import RequestTooLargeError

log = logging.getLogger(__name__)


def weight_bytes(folder: Path) -> int:
    """What an adapter costs a replica: the size of its weight files."""
    return sum(f.stat().st_size for f in Path(folder).iterdir() if f.suffix == ".safetensors")


class AdapterCache:
    def __init__(self, engine, registry, refs: dict[str, str], *, tracking_uri: str | None = None,
                 max_adapters: int = 64, max_bytes: int = 4 << 30, registry_sync_s: float = 2.0,
                 alias_refresh_s: float = 30.0, metrics=None):
        self.engine = engine
        self.registry = registry
        self.refs = dict(refs)  # the registry's map as last read
        self.tracking_uri = tracking_uri
        self.max_adapters, self.max_bytes = max_adapters, max_bytes
        self.registry_sync_s, self.alias_refresh_s = registry_sync_s, alias_refresh_s
        self.metrics = metrics
        self.version: int | None = None
        self.resident: OrderedDict[str, dict] = OrderedDict()  # name -> ref, version, bytes (LRU first)
        self.pins: dict[str, int] = {}  # name -> requests holding it (never evicted while > 0)
        self.locks: dict[str, asyncio.Lock] = {}
        self.counts = {"cache_hits": 0, "cache_misses": 0, "evictions": 0, "reloads": 0}
        self._task: asyncio.Task | None = None
        self._alias_checked = 0.0
        self.on_change = None  # called after an adapter is loaded or dropped (the replica tells its router)

    # ---------------------------------------------------------------- what the engine already holds
    def adopt(self, name: str, ref: str, folder: Path) -> None:
        """An adapter the engine loaded at start."""
        self.resident[name] = {"ref": ref, "version": _version(ref, self.tracking_uri), "bytes": weight_bytes(folder)}

    def trim(self) -> None:
        """At start-up (nothing is running yet): the adapters loaded last that do not fit the bounds go."""
        while len(self.resident) > self.max_adapters or (self.bytes > self.max_bytes and len(self.resident) > 1):
            victim = next(reversed(self.resident))
            self.resident.pop(victim)
            self.engine.remove_adapter(victim)
            self._count("evictions")

    @property
    def bytes(self) -> int:
        return sum(e["bytes"] for e in self.resident.values())

    # ---------------------------------------------------------------- requests
    @contextlib.asynccontextmanager
    async def use(self, name: str):
        """Hold `name` resident for the duration of a request (loading it first if registered)."""
        await self.pin(name)
        try:
            yield
        finally:
            self.unpin(name)

    async def pin(self, name: str) -> None:
        """Hold `name` (loaded first if registered). Only a resident adapter is counted: names a client
        made up (the engine answers 404) leave no state behind."""
        self.start()
        await self.ensure(name)
        if name in self.resident:
            self.pins[name] = self.pins.get(name, 0) + 1

    def unpin(self, name: str) -> None:
        left = self.pins.get(name, 0) - 1
        if left > 0:
            self.pins[name] = left
        else:
            self.pins.pop(name, None)

    async def ensure(self, name: str) -> None:
        if name in self.resident:
            self.resident.move_to_end(name)
            self._count("cache_hits")
            return
        if self.engine.serves_base(name):
            return
        if name not in self.refs:
            await self.sync()
        ref = self.refs.get(name)
        if ref is None:
            return  # the engine answers: unknown adapter
        lock = self.locks.setdefault(name, asyncio.Lock())
        async with lock:
            if name in self.resident:
                return
            self._count("cache_misses")
            await self._load_now(name, ref)

    async def load(self, name: str, ref: str) -> dict:
        """Resolve, verify and load `ref` as `name` (a new version beside the old when `name` is
        resident), then make room. Returns the adapter's manifest. The bookkeeping stays on the
        event loop; the loading runs in a thread."""
        async with self.locks.setdefault(name, asyncio.Lock()):
            return await self._load_now(name, ref)

    async def _load_now(self, name: str, ref: str) -> dict:
        started = time.perf_counter()
        size, manifest = await asyncio.to_thread(self._load, name, ref)
        version = await asyncio.to_thread(_version, ref, self.tracking_uri)
        self.resident[name] = {"ref": ref, "version": version, "bytes": size}
        self.resident.move_to_end(name)
        if self.metrics is not None:
            self.metrics.adapters(len(self.engine.adapters), [time.perf_counter() - started])
        await self._make_room(keep=name)
        self._changed()
        return manifest

    def _load(self, name: str, ref: str):
        from workers.store import resolve

        folder, manifest = resolve(ref, tracking_uri=self.tracking_uri)
        size = weight_bytes(folder)
        if size > self.max_bytes:  # it could never fit: refused before any other adapter is evicted for it
            raise RequestTooLargeError(
                f"adapter {name!r} ({ref}): its weights are {size} bytes, over the {self.max_bytes} bytes this "
                "replica holds for all its adapters (serve.max_adapter_bytes); raise serve.max_adapter_bytes "
                "or serve it from an application of its own")
        self.engine.add_adapter(name, folder, manifest, replace=name in self.engine.adapters)
        return size, manifest

    async def drop(self, name: str) -> bool:
        if self.resident.pop(name, None) is None:
            return False
        await asyncio.to_thread(self.engine.remove_adapter, name)
        if self.metrics is not None:
            self.metrics.adapters(len(self.engine.adapters), [])
        self._changed()
        return True

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change()

    async def _make_room(self, keep: str) -> None:
        while len(self.resident) > self.max_adapters or (self.bytes > self.max_bytes and len(self.resident) > 1):
            victim = next((n for n in self.resident if n != keep and not self.pins.get(n)), None)
            if victim is None:  # every other adapter serves a request now: over the bound until they finish
                log.warning("adapter cache over its bound: every other adapter is in use")
                return
            await self.drop(victim)
            self._count("evictions")
            log.info("evicted adapter %s", victim)

    def _count(self, what: str) -> None:
        self.counts[what] += 1
        if self.metrics is not None:
            self.metrics.cache(what)

    # ---------------------------------------------------------------- the registry
    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._loop())

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.registry_sync_s)
            try:
                await self.sync()
                if time.monotonic() - self._alias_checked >= self.alias_refresh_s:
                    self._alias_checked = time.monotonic()
                    await self.refresh_aliases()
            except Exception:  # a failed sync is retried; requests go on
                log.exception("adapter registry sync failed")

    async def sync(self) -> None:
        """Apply what the registry says: names gone are unloaded, names whose reference changed reload."""
        version, entries = await self.registry.get.remote()
        if version == self.version:
            return
        self.version, self.refs = version, entries
        for name in [n for n in self.resident if n not in entries]:
            await self.drop(name)
        for name in [n for n, e in self.resident.items() if n in entries and entries[n] != e["ref"]]:
            await self.load(name, entries[name])
            self._count("reloads")

    async def refresh_aliases(self) -> None:
        """Reload each resident adapter whose registry alias now names another version."""
        for name, entry in list(self.resident.items()):
            if entry["version"] is None:
                continue
            now = await asyncio.to_thread(_version, entry["ref"], self.tracking_uri)
            if now is not None and now != entry["version"] and self.resident.get(name) is entry:
                log.info("adapter %s: %s moved from version %s to %s", name, entry["ref"], entry["version"], now)
                await self.load(name, entry["ref"])
                self._count("reloads")


def _version(ref: str, tracking_uri: str | None) -> str | None:
    """The registry version an alias reference names now (None: not an alias reference)."""
    from workers.store import REGISTRY_REF, registered_version

    m = REGISTRY_REF.match(ref)
    if not m or not m["alias"]:
        return None
    return str(registered_version(ref, tracking_uri).version)
