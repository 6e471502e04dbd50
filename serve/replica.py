"""A model deployment: each replica holds the operator's base model and the adapters of one replica
group (`AdapterMethod.replica_group()`), in an LRU over the application's registry. The ingress
(`serve.app`) calls it through a handle with the adapter as the request's multiplexed model id; the
replica tells Serve's router which adapters it holds, so requests go to a replica that already has
theirs. Concurrent classify requests share forwards through our own batcher (adapters mix where
their method declares it); completions run on the continuous-batching decode loop."""

from __future__ import annotations

import asyncio
import logging

from ray import serve

log = logging.getLogger(__name__)


def _replica_id() -> str | None:
    try:
        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # noqa: BLE001 - outside a replica (the class used in a test)
        return None


@serve.deployment
class ModelServer:
    def __init__(self, adapters: dict[str, str], base: dict, tracking_uri: str | None, options: dict, group: str):
        from serve.batching import Batcher
        from serve.cache import AdapterCache
        from serve.config import ServeSpec
        from serve.deploy import build_engine
        from serve.metrics import ReplicaMetrics
        from serve.registry import registry

        sv = ServeSpec.model_validate(options)
        self.group = group
        first = dict(list(adapters.items())[: sv.max_adapters])  # the rest load on demand
        self.engine = build_engine(first, base, tracking_uri, sv.threads, sv.resolved_device())
        self.engine.max_prompt_tokens = sv.max_prompt_tokens
        self.engine.max_decode_rows = sv.max_batch_size
        self.engine.prefixes.max_conversations = sv.max_conversations
        self.engine.prefixes.max_tokens = sv.max_conversation_tokens
        self.metrics = ReplicaMetrics(sv.app_name)
        self.engine.on_forward = self.metrics.forward
        self.metrics.adapters(len(self.engine.adapters), list(self.engine.load_seconds.values()))
        self.cache = AdapterCache(self.engine, registry(sv.app_name, adapters), adapters, tracking_uri=tracking_uri,
                                  metrics=self.metrics, **sv.cache())
        for name, folder in self.engine.folders.items():
            self.cache.adopt(name, first[name], folder)
        self.cache.trim()  # within serve.max_adapter_bytes from the start; the rest load on demand
        self.batcher = Batcher(self.engine.classify_batch, sv.max_batch_size, sv.batch_wait_timeout_s,
                               on_batch=self.metrics.batch)
        self.replica = _replica_id()
        self._routed: list[str] | None = None
        self.cache.on_change = self._push_routing
        self._push_routing()

    # ---------------------------------------------------------------- routing by adapter
    def _push_routing(self) -> None:
        """Tell Serve's router which adapters this replica holds (its multiplexed model ids), when
        that changed: requests naming one of them are routed here first."""
        held = sorted(self.engine.adapters)
        if held == self._routed or self.replica is None:
            return
        try:
            from ray.serve._private.common import RequestRoutingInfo
            from ray.serve.context import _get_global_client

            ctx = serve.get_replica_context()
            _get_global_client().record_request_routing_info(
                RequestRoutingInfo(replica_id=ctx.replica_id, multiplexed_model_ids=held))
            self._routed = held
        except Exception:  # routing is an optimisation: serving goes on without it
            log.warning("could not tell the router which adapters this replica holds", exc_info=True)

    async def _hold(self, name: str) -> None:
        await self.cache.pin(name)
        self._push_routing()
        self.metrics.adapters(len(self.engine.adapters), [])  # a gauge stays fresh while requests come

    # ---------------------------------------------------------------- what the ingress asks
    def health(self) -> dict:
        return {"replica": self.replica, "group": self.group, "adapters": sorted(self.engine.adapters)}

    def models(self) -> dict:
        engine = self.engine
        data = [{"id": name, "object": "model", "owned_by": "adapterflow", "task": m["task"],
                 "method": m["method"], "base_model": m["base_model"]["name"]}
                for name, m in sorted(engine.adapters.items())]
        base = None
        if engine.serves_base(engine.base_id):  # a causal LM answers for its base too
            base = {"id": engine.base_id, "object": "model", "owned_by": "adapterflow", "task": engine.spec.task,
                    "method": "base", "base_model": engine.spec.name}
        return {"resident": data, "base": base, "base_name": engine.spec.name}

    def stats(self) -> dict:
        decode = self.engine._decoder.stats if self.engine._decoder is not None else {}
        return {**self.engine.stats, **decode, **self.engine.prefixes.stats, **self.cache.counts}

    async def classify(self, adapter: str, inputs: list, samples: int | None, seed: int) -> dict:
        self.metrics.enter()
        try:
            await self._hold(adapter)
            try:
                if self.engine.monte_carlo_samples(adapter, samples) or self.engine.draws_at_inference(adapter):
                    # random forwards: on their own, seeded by the request
                    results = await asyncio.to_thread(self.engine.classify, adapter, inputs, samples=samples, seed=seed)
                else:
                    results = await self.batcher.submit((adapter, inputs))
            finally:
                self.cache.unpin(adapter)
        finally:
            self.metrics.leave()
        return {"results": results, "replica": self.replica}

    async def complete(self, model: str, prompts: list[str] | None, params: dict, messages: list | None = None):
        """Every prompt's finished answer (a list of dicts: text, finish_reason, token counts)."""
        await self._hold(model)
        try:
            prompts = self._prompts(model, prompts, messages)
            if self.engine.completion_samples(model, params.get("samples")):  # Monte-Carlo: on its own
                return [await asyncio.to_thread(self.engine.complete, model, p, **params) for p in prompts]
            events = self._start(model, prompts, params)
            return await self._finished(*events)
        finally:
            self.cache.unpin(model)

    async def stream(self, model: str, prompts: list[str] | None, params: dict, messages: list | None = None):
        """(index, event) pairs as the decode loop produces them; an event is {"text"} or, last for its
        row, {"text", "finish_reason", token counts}. A failure mid-stream is an {"error"} event."""
        await self._hold(model)
        try:
            prompts = self._prompts(model, prompts, messages)
            if self.engine.completion_samples(model, params.get("samples")):
                from workers.errors import RequestError

                raise RequestError("samples (Monte-Carlo log-probabilities) cannot stream; send stream: false")
            rows, events = self._start(model, prompts, params)
            yield {"rows": len(rows)}
            ends = [False] * len(rows)
            try:
                while not all(ends):
                    i, event = await events.get()
                    if "error" in event:
                        exc = event["error"]
                        yield {"error": {"message": str(exc), "code": getattr(exc, "http_status", 500)}}
                        return
                    ends[i] = ends[i] or "finish_reason" in event
                    yield {"index": i, **event}
            finally:
                for row in rows:
                    row.cancel()  # frees the rows if the client went away
        finally:
            self.cache.unpin(model)

    def _prompts(self, model: str, prompts: list[str] | None, messages: list | None) -> list[str]:
        return [self.engine.chat_prompt(model, messages)] if messages is not None else list(prompts)

    def _start(self, model: str, prompts: list[str], params: dict) -> tuple[list, asyncio.Queue]:
        """Queue each prompt on the decode loop; events arrive on one asyncio queue as (index, event)."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        params = {k: v for k, v in params.items() if k != "samples"}
        rows = []
        try:
            for i, p in enumerate(prompts):
                def emit(event, i=i):
                    loop.call_soon_threadsafe(events.put_nowait, (i, event))

                rows.append(self.engine.start_completion(model, p, emit=emit, **params))
        except BaseException:
            for row in rows:
                row.cancel()
            raise
        return rows, events

    @staticmethod
    async def _finished(rows: list, events: asyncio.Queue) -> list[dict]:
        texts = [[] for _ in rows]
        ends: list[dict | None] = [None] * len(rows)
        try:
            while any(e is None for e in ends):
                i, event = await events.get()
                if "error" in event:
                    raise event["error"]
                texts[i].append(event["text"])
                if "finish_reason" in event:
                    ends[i] = event
        finally:
            for row in rows:
                row.cancel()  # no-op for finished rows; frees the others if the request went away
        return [{**e, "text": "".join(t)} for t, e in zip(texts, ends)]

    # ---------------------------------------------------------------- the live registry
    def serves_base(self, name: str) -> bool:
        return self.engine.serves_base(name) or name == self.engine.base_id

    async def load_adapter(self, name: str, ref: str) -> dict:
        """Check and load `ref` as `name` here (a bad adapter is refused before the registry names it)."""
        self.cache.start()
        manifest = await self.cache.load(name, ref)
        self._push_routing()
        return {"method": manifest["method"]}

    async def drop_adapter(self, name: str) -> None:
        self.cache.refs.pop(name, None)
        await self.cache.drop(name)
        self._push_routing()

    async def resident(self) -> dict:
        self.cache.start()
        await self.cache.sync()
        self._push_routing()
        return {"resident": sorted(self.engine.adapters), "refs": dict(self.cache.refs)}
