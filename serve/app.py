"""Ray Serve application: one base model per replica, adapters by name, an HTTP API.

Routes: `GET /healthz`, `GET /v1/models`, `GET /v1/stats` (batching counters), `POST /v1/classify`
(seq-cls adapters; concurrent requests are batched, see `AdapterServer._classify_batch`) and
`POST /v1/completions` and `POST /v1/chat/completions` (causal-LM adapters, OpenAI request and
response shapes, streaming as server-sent events; generation runs on the continuous-batching decode
loop, `workers.generation`).
Errors are JSON `{"error": {"type", "message", "code"}}`, from one handler over the error tree
(`workers.errors`): unknown adapter 404, malformed body 422, wrong task for the adapter 400, missing
or wrong API key 401, an adapter that does not fit the replica 409, a platform fault 500.
"""



import asyncio
import hmac
import json
import logging
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from starlette.background import BackgroundTask

from serve.schemas import (
    AdapterDeleted,
    AdapterEntry,
    AdapterList,
    AdapterLoad,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ClassifyRequest,
    ClassifyResponse,
    CompletionRequest,
    CompletionResponse,
    Health,
    ModelList,
    Stats,
    error_responses,
)
from workers.errors import (
    AdapterflowError,
    AdapterIntegrityError,
    AuthError,
    ForbiddenError,
    RequestError,
    RequestTooLargeError,
    UnknownAdapterError,
    UserError,
    WrongTaskError,
)

log = logging.getLogger(__name__)

api = FastAPI(title="adapterflow", version="0.1.0")

ERROR_TYPES = {UnknownAdapterError: "adapter_not_found", WrongTaskError: "wrong_task", AuthError: "unauthorized",
               RequestError: "invalid_request", AdapterIntegrityError: "adapter_integrity",
               RequestTooLargeError: "request_too_large", ForbiddenError: "forbidden"}
# a 200 may also be a stream of server-sent events (`stream: true`)
STREAM = {200: {"content": {"text/event-stream": {"schema": {"type": "string"}}},
                "description": "The response; with stream: true, server-sent events of chunks, then [DONE]."}}
# this replica's request limits (one deployment per replica process; set by AdapterServer)
LIMITS = {"max_body_bytes": 1_048_576, "max_inputs": 256, "max_prompt_tokens": 2048}


def error(status: int, kind: str, message: str) -> JSONResponse:
    return JSONResponse(status_code=status, content={"error": {"type": kind, "message": message,
                                                               "code": status}})


@api.exception_handler(AdapterflowError)
async def _platform_error(request: Request, exc: AdapterflowError):
    kind = next((name for cls, name in ERROR_TYPES.items() if isinstance(exc, cls)),
                "invalid_request" if isinstance(exc, UserError) else "internal_error")
    if not isinstance(exc, UserError):
        log.error("request failed: %s", exc)
    return error(exc.http_status, kind, str(exc))


@api.middleware("http")
async def _body_limit(request: Request, call_next):
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > LIMITS["max_body_bytes"]:
        return error(413, "request_too_large", f"the request body has {length} bytes, over this server's limit of "
                     f"{LIMITS['max_body_bytes']} (serve.max_body_bytes)")
    return await call_next(request)


@api.exception_handler(RequestValidationError)
async def _malformed(request: Request, exc: RequestValidationError):
    parts = []
    for e in exc.errors():
        loc = ".".join(str(x) for x in e["loc"] if x != "body")
        parts.append(f"{loc or 'body'}: {e['msg']}")
    return error(422, "invalid_request", "; ".join(parts))


@serve.deployment
@serve.ingress(api)
class AdapterServer:
    """One replica: the operator's base model and the adapters by name. `base` is the operator's model
    section; without it, the base the registry recorded for the (registered) adapters. An adapter's
    manifest never chooses the base (`workers.trust`)."""

    def __init__(self, adapters: dict[str, str], base: dict, tracking_uri: str | None, options: dict):
        from serve import app as module  # the class travels by value: the module's own globals
        from serve.cache import AdapterCache
        from serve.config import ServeSpec
        from serve.deploy import build_engine, secret  # ... and imports what it calls
        from serve.metrics import ReplicaMetrics
        from serve.registry import registry

        sv = ServeSpec.model_validate(options)
        module.LIMITS.update(sv.limits())
        self._classify_batch.set_max_batch_size(sv.max_batch_size)
        self._classify_batch.set_batch_wait_timeout_s(sv.batch_wait_timeout_s)
        self.api_key = secret(sv.api_key_env, "serve.api_key_env")
        self.admin_key = secret(sv.admin_key_env, "serve.admin_key_env")
        self.roots = list(sv.adapter_roots)
        first = dict(list(adapters.items())[: sv.max_adapters])  # the rest load on demand
        self.engine = build_engine(first, base, tracking_uri, sv.threads)
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
        self.max_new_tokens = sv.max_new_tokens

    def _auth(self, request: Request) -> None:
        if self.api_key is not None:
            self._bearer(request, self.api_key, "API key")

    def _admin(self, request: Request) -> None:
        if self.admin_key is None:
            raise ForbiddenError("the adapter routes are off: set serve.admin_key_env to the name of an environment "
                                 "variable holding an admin key")
        self._bearer(request, self.admin_key, "admin key")

    @staticmethod
    def _bearer(request: Request, key: str, what: str) -> None:
        header = request.headers.get("authorization", "")
        token = header[7:] if header.lower().startswith("bearer ") else ""
        if not hmac.compare_digest(token.encode(), key.encode()):
            raise AuthError(f"missing or wrong {what}: send 'Authorization: Bearer <key>'")

    @staticmethod
    def _count(n: int, what: str) -> None:
        from serve.app import LIMITS

        if n > LIMITS["max_inputs"]:
            raise RequestTooLargeError(f"{n} {what} in one request, over this server's limit of "
                                       f"{LIMITS['max_inputs']} (serve.max_inputs); split the request")

    @api.get("/healthz", response_model=Health)
    def healthz(self):
        try:
            replica = serve.get_replica_context().replica_id.unique_id
        except Exception:  # noqa: BLE001 - outside a replica (tests of the class)
            replica = None
        return {"status": "ok", "adapters": sorted(self.engine.adapters), "replica": replica}

    @api.get("/v1/models", response_model=ModelList, responses=error_responses(401))
    def models(self, request: Request):
        self._auth(request)
        data = [{"id": name, "object": "model", "owned_by": "adapterflow", "task": m["task"],
                 "method": m["method"], "base_model": m["base_model"]["name"]}
                for name, m in sorted(self.engine.adapters.items())]
        data += [{"id": name, "object": "model", "owned_by": "adapterflow", "base_model": self.engine.spec.name}
                 for name in sorted(set(self.cache.refs) - set(self.engine.adapters))]  # registered, not held here
        if self.engine.serves_base(self.engine.base_id):  # a causal LM answers for its base too
            data.append({"id": self.engine.base_id, "object": "model", "owned_by": "adapterflow",
                         "task": self.engine.spec.task, "method": "base", "base_model": self.engine.spec.name})
        return {"object": "list", "data": data}

    @api.get("/v1/stats", response_model=Stats, responses=error_responses(401))
    def stats(self, request: Request):
        """Batching so far on this replica: classify forwards and rows, the decode loop's steps and rows."""
        self._auth(request)
        decode = self.engine._decoder.stats if self.engine._decoder is not None else {}
        return {**self.engine.stats, **decode, **self.engine.prefixes.stats, **self.cache.counts}

    # ---------------------------------------------------------------- the live registry (admin key)
    def _adapter_entries(self) -> list[dict]:
        return [{"name": n, "ref": ref, "resident": n in self.engine.adapters,
                 "method": self.engine.adapters[n]["method"] if n in self.engine.adapters else None}
                for n, ref in sorted(self.cache.refs.items())]

    @api.get("/v1/adapters", response_model=AdapterList, responses=error_responses(401, 403))
    async def list_adapters(self, request: Request):
        """The adapters the application serves (its registry), and which this replica holds now."""
        self._admin(request)
        self.cache.start()
        await self.cache.sync()
        return {"object": "list", "data": self._adapter_entries()}

    @api.post("/v1/adapters", response_model=AdapterEntry, status_code=201,
              responses=error_responses(400, 401, 403, 404, 409, 422))
    async def load_adapter(self, body: AdapterLoad, request: Request):
        """Serve `ref` as `name` on every replica (a new version if `name` is served): checked and
        loaded here first, so a bad adapter is refused before any replica serves it."""
        from serve.registry import allowed

        self._admin(request)
        if not allowed(body.ref, self.roots):
            raise ForbiddenError(f"ref {body.ref!r}: only registry references (models:/NAME@ALIAS, models:/NAME/N) and "
                                 f"folders under serve.adapter_roots ({', '.join(self.roots) or 'none'}) can be loaded")
        if self.engine.serves_base(body.name) or body.name == self.engine.base_id:
            raise RequestError(f"name {body.name!r} is the base model's; choose another")
        self.cache.start()
        manifest = await self.cache.load(body.name, body.ref)
        await self.cache.registry.put.remote(body.name, body.ref)
        self.cache.refs[body.name] = body.ref
        return {"name": body.name, "ref": body.ref, "resident": True, "method": manifest["method"]}

    @api.delete("/v1/adapters/{name}", response_model=AdapterDeleted, responses=error_responses(401, 403, 404))
    async def unload_adapter(self, name: str, request: Request):
        """Stop serving `name` on every replica (requests already running finish)."""
        self._admin(request)
        if not await self.cache.registry.delete.remote(name):
            raise UnknownAdapterError(f"unknown adapter {name!r}")
        self.cache.refs.pop(name, None)
        await self.cache.drop(name)
        return {"name": name, "deleted": True}

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)
    async def _classify_batch(self, items: list[tuple[str, list]]) -> list:
        # concurrent requests share forwards; the forward runs off the event loop
        self.metrics.batch(len(items))
        return await asyncio.to_thread(self.engine.classify_batch, items)

    @api.post("/v1/classify", response_model=ClassifyResponse, response_model_exclude_none=True,
              responses=error_responses(400, 401, 404, 413, 422))
    async def classify(self, body: ClassifyRequest, request: Request):
        self._auth(request)
        self._count(len(body.inputs), "inputs")
        self.metrics.enter()
        try:
            async with self.cache.use(body.adapter):
                return await self._classify(body)
        finally:
            self.metrics.leave()

    async def _classify(self, body: ClassifyRequest) -> dict:
        if self.engine.monte_carlo_samples(body.adapter, body.samples):  # sampled forwards: on their own
            results = await asyncio.to_thread(self.engine.classify, body.adapter, body.inputs,
                                              samples=body.samples, seed=body.seed)
        else:
            results = await self._classify_batch((body.adapter, body.inputs))
            if isinstance(results, Exception):
                raise results
        return {"adapter": body.adapter, "results": results}

    def _start(self, model: str, prompts: list[str], body, max_tokens: int) -> tuple[list, asyncio.Queue]:
        """Queue each prompt on the decode loop; events arrive on one asyncio queue as (index, event)."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        rows = []
        try:
            for i, p in enumerate(prompts):
                def emit(event, i=i):
                    loop.call_soon_threadsafe(events.put_nowait, (i, event))

                rows.append(self.engine.start_completion(
                    model, p, emit=emit, max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p,
                    seed=body.seed, stop=body.stops(), ignore_eos=body.ignore_eos, conversation=body.conversation))
        except BaseException:
            for row in rows:
                row.cancel()
            raise
        return rows, events

    async def _finished(self, rows: list, events: asyncio.Queue) -> list[dict]:
        """Every row's text and counts, once all have finished."""
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
                row.cancel()  # no-op for finished rows; frees the others if the client went away
        return [{**e, "text": "".join(t)} for t, e in zip(texts, ends)]

    @staticmethod
    def _usage(ends) -> dict:
        n_prompt = sum(e["prompt_tokens"] for e in ends)
        n_out = sum(e["completion_tokens"] for e in ends)
        return {"prompt_tokens": n_prompt, "completion_tokens": n_out, "total_tokens": n_prompt + n_out}

    def _stream(self, rows, events, chunk, usage: bool) -> StreamingResponse:
        """Server-sent events: `chunk(index, text, finish)` per piece, a usage chunk if asked, [DONE]."""

        async def lines():
            ends: list[dict | None] = [None] * len(rows)
            try:
                for i in range(len(rows)):
                    first = chunk(i, None, None)
                    if first is not None:
                        yield f"data: {json.dumps(first)}\n\n"
                while any(e is None for e in ends):
                    i, event = await events.get()
                    if "error" in event:
                        exc = event["error"]  # the headers are out: the error goes in the stream
                        err = {"type": "internal_error", "message": str(exc), "code": getattr(exc, "http_status", 500)}
                        yield f"data: {json.dumps({'error': err})}\n\n"
                        return
                    if "finish_reason" in event:
                        ends[i] = event
                    if event["text"] or "finish_reason" in event:
                        yield f"data: {json.dumps(chunk(i, event['text'], event.get('finish_reason')))}\n\n"
                if usage:
                    yield f"data: {json.dumps({**chunk(0, '', None), 'choices': [], 'usage': self._usage(ends)})}\n\n"
                yield "data: [DONE]\n\n"
            finally:
                for row in rows:
                    row.cancel()

        return StreamingResponse(lines(), media_type="text/event-stream")

    @api.post("/v1/completions", response_model=CompletionResponse, response_model_exclude_none=True,
              responses={**error_responses(400, 401, 404, 413, 422), **STREAM})
    async def completions(self, body: CompletionRequest, request: Request):
        self._auth(request)
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        self._count(len(prompts), "prompts")
        await self.cache.pin(body.model)  # resident until the answer (or the stream) is done
        try:
            response = await self._completions(body, prompts)
        except BaseException:
            self.cache.unpin(body.model)
            raise
        return self._unpin_after(response, body.model)

    def _unpin_after(self, response, name: str):
        if isinstance(response, StreamingResponse):
            response.background = BackgroundTask(self.cache.unpin, name)
        else:
            self.cache.unpin(name)
        return response

    async def _completions(self, body: CompletionRequest, prompts: list[str]):
        meta = {"id": f"cmpl-{uuid.uuid4().hex[:24]}", "object": "text_completion", "created": int(time.time()),
                "model": body.model}
        if self.engine.completion_samples(body.model, body.samples):  # Monte-Carlo: on its own
            if body.stream:
                raise RequestError("samples (Monte-Carlo log-probabilities) cannot stream; send stream: false")
            results = [await asyncio.to_thread(
                self.engine.complete, body.model, p, max_tokens=body.max_tokens, temperature=body.temperature,
                top_p=body.top_p, seed=body.seed, stop=body.stops(), samples=body.samples, ignore_eos=body.ignore_eos)
                for p in prompts]
        else:
            rows, events = self._start(body.model, prompts, body, body.max_tokens)
            if body.stream:
                def chunk(i, text, finish):
                    if text is None:
                        return None
                    return {**meta, "choices": [{"index": i, "text": text, "logprobs": None,
                                                 "finish_reason": finish}]}

                return self._stream(rows, events, chunk, bool(body.stream_options and body.stream_options.include_usage))
            results = await self._finished(rows, events)
        choices = []
        for i, r in enumerate(results):
            choice = {"index": i, "text": r["text"], "logprobs": None, "finish_reason": r["finish_reason"]}
            if "monte_carlo" in r:
                choice["monte_carlo"] = r["monte_carlo"]
            choices.append(choice)
        return {**meta, "choices": choices, "usage": self._usage(results)}

    @api.post("/v1/chat/completions", response_model=ChatCompletionResponse,
              responses={**error_responses(400, 401, 404, 413, 422), **STREAM})
    async def chat_completions(self, body: ChatCompletionRequest, request: Request):
        self._auth(request)
        self._count(len(body.messages), "messages")
        await self.cache.pin(body.model)
        try:
            response = await self._chat(body)
        except BaseException:
            self.cache.unpin(body.model)
            raise
        return self._unpin_after(response, body.model)

    async def _chat(self, body: ChatCompletionRequest):
        prompt = self.engine.chat_prompt(body.model, [m.model_dump() for m in body.messages])
        rows, events = self._start(body.model, [prompt], body, body.max_completion_tokens or body.max_tokens or 16)
        meta = {"id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "created": int(time.time()), "model": body.model}
        if body.stream:
            def chunk(i, text, finish):
                delta = {"role": "assistant", "content": ""} if text is None else (
                    {"content": text} if text else {})
                return {**meta, "object": "chat.completion.chunk",
                        "choices": [{"index": i, "delta": delta, "logprobs": None, "finish_reason": finish}]}

            return self._stream(rows, events, chunk, bool(body.stream_options and body.stream_options.include_usage))
        (r,) = await self._finished(rows, events)
        return {**meta, "object": "chat.completion",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": r["text"]},
                             "logprobs": None, "finish_reason": r["finish_reason"]}],
                "usage": self._usage([r])}
