"""The HTTP ingress of a Serve application: auth, validation, limits and errors, and routing to the
model deployments (`serve.replica.ModelServer`, one per replica group of the base model) through
handles, with the adapter as the request's multiplexed model id (so a replica that holds it answers).

Routes: `GET /healthz`, `GET /v1/models`, `GET /v1/stats` (batching counters), `POST /v1/classify`
(seq-cls adapters; concurrent requests share forwards on the replica) and `POST /v1/completions` and
`POST /v1/chat/completions` (causal-LM adapters, OpenAI request and response shapes, streaming as
server-sent events; generation runs on the continuous-batching decode loop, `workers.generation`);
admin routes `GET/POST/DELETE /v1/adapters`. A classify answer names the model replica that computed
it (header `x-adapterflow-replica`).
Errors are JSON `{"error": {"type", "message", "code"}}`, from one handler over the error tree
(`workers.errors`): unknown adapter 404, malformed body 422, wrong task for the adapter 400, missing
or wrong API key 401, an adapter that does not fit the replica 409, a platform fault 500.
"""

import hmac
import json
import logging
import time
import uuid

from fastapi import Request, Response
from fastapi.responses import StreamingResponse
from ray import serve
from starlette.background import BackgroundTask

from serve.http_api import STREAM, api, replica_error, replica_lost
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
    AdapterIntegrityError,
    AuthError,
    ForbiddenError,
    RequestError,
    RequestTooLargeError,
    UnknownAdapterError,
)

log = logging.getLogger(__name__)

@serve.deployment
@serve.ingress(api)
class Ingress:
    """HTTP in front of the model deployments: `models` maps each replica group to its deployment's
    handle, `groups` each adapter name to its group (the app's registry keeps both as adapters come and go)."""

    def __init__(self, models: dict, groups: dict[str, str], tracking_uri: str | None, options: dict):
        from serve import http_api as module  # the class travels by value: the limits' own module
        from serve.config import ServeSpec
        from serve.deploy import secret
        from serve.registry import registry

        sv = ServeSpec.model_validate(options)
        module.LIMITS.update(sv.limits())
        self.models = models
        self.groups = dict(groups)
        self.default = next(iter(models))  # the group the base model and unknown names go to
        self.tracking_uri = tracking_uri
        self.api_key = secret(sv.api_key_env, "serve.api_key_env")
        self.admin_key = secret(sv.admin_key_env, "serve.admin_key_env")
        self.roots = list(sv.adapter_roots)
        self.registry = registry(sv.app_name)
        self.max_new_tokens = sv.max_new_tokens
        self.replica_retries = sv.replica_retries
        self._base_names: set[str] = set()
        # with one replica per group there is nothing to choose: requests skip the router's adapter matching
        self.affine = sv.num_replicas > 1 or sv.autoscaling is not None

    # ---------------------------------------------------------------- keys and limits
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
        from serve.http_api import LIMITS

        if n > LIMITS["max_inputs"]:
            raise RequestTooLargeError(f"{n} {what} in one request, over this server's limit of "
                                       f"{LIMITS['max_inputs']} (serve.max_inputs); split the request")

    @staticmethod
    def _max_tokens(n: int) -> int:
        from serve.http_api import LIMITS

        if n > LIMITS["max_tokens"]:
            raise RequestTooLargeError(f"max_tokens {n} is over this server's limit of {LIMITS['max_tokens']} "
                                       "(serve.max_tokens); ask for fewer")
        return n

    # ---------------------------------------------------------------- routing
    async def _group(self, name: str) -> str:
        """The group whose replicas serve `name` (the registry is asked about names this ingress has not seen)."""
        if name not in self.groups and name not in self._base_names:
            self.groups.update(await self.registry.routes.remote())
        return self.groups.get(name, self.default)

    async def _call(self, group: str, method: str, *args, model: str | None = None, retry: bool = False):
        """`method` on a replica of `group`. With `retry` (requests that only compute an answer), a replica
        that died under the request or could not be reached is not the client's failure: the request
        goes again, up to `serve.replica_retries` times, to whichever replica Serve's router picks then
        (it drops the dead one), with a short pause that grows."""
        import asyncio

        handle = self.models[group]
        if model is not None and self.affine:
            handle = handle.options(multiplexed_model_id=model)
        attempts = 1 + (self.replica_retries if retry else 0)
        for attempt in range(attempts):
            try:
                return await getattr(handle, method).remote(*args)
            except Exception as exc:  # noqa: BLE001 - re-raised as the replica's own error
                if attempt + 1 < attempts and replica_lost(exc):
                    log.warning("replica lost during %s (%s): sending it again (%d/%d)", method,
                                type(exc).__name__, attempt + 1, attempts - 1)
                    await asyncio.sleep(min(2.0, 0.1 * 2 ** attempt))
                    continue
                raise replica_error(exc) from None

    async def _each(self, method: str, *args) -> list:
        """`method` on one replica of every group."""
        return [await self._call(g, method, *args) for g in self.models]

    # ---------------------------------------------------------------- health, models, stats
    @api.get("/healthz", response_model=Health, response_model_exclude_none=True,
             responses=error_responses(500, 503))
    async def healthz(self, replicas: bool = False):
        """The ingress is up (cheap: a probe's route). With `replicas=true`, one model replica of each
        group answers too, with the adapters it holds."""
        if not replicas:
            return {"status": "ok"}
        states = await self._each("health")
        adapters = sorted({a for s in states for a in s["adapters"]})
        return {"status": "ok", "adapters": adapters, "replica": states[0]["replica"],
                "groups": {s["group"]: {"replica": s["replica"], "adapters": s["adapters"]} for s in states}}

    @api.get("/v1/models", response_model=ModelList, responses=error_responses(401, 500, 503))
    async def models(self, request: Request):
        self._auth(request)
        answers = await self._each("models")
        data = [m for a in answers for m in a["resident"]]
        _, refs = await self.registry.get.remote()
        held = {m["id"] for m in data}
        base_name = answers[0]["base_name"]
        data += [{"id": name, "object": "model", "owned_by": "adapterflow", "base_model": base_name}
                 for name in sorted(set(refs) - held)]  # registered, not held by the replicas asked
        bases = {a["base"]["id"]: a["base"] for a in answers if a["base"]}
        return {"object": "list", "data": data + list(bases.values())}

    @api.get("/v1/stats", response_model=Stats, responses=error_responses(401, 500, 503))
    async def stats(self, request: Request):
        """Batching so far: classify forwards and rows, the decode loop's steps and rows, the adapter cache
        (summed over one replica of each group)."""
        self._auth(request)
        out: dict = {}
        for s in await self._each("stats"):
            for k, v in s.items():
                out[k] = out.get(k, 0) + v
        return out

    # ---------------------------------------------------------------- the live registry (admin key)
    @api.get("/v1/adapters", response_model=AdapterList, responses=error_responses(401, 403, 500, 503))
    async def list_adapters(self, request: Request):
        """The adapters the application serves (its registry), and which of them the replicas asked hold now."""
        self._admin(request)
        answers = await self._each("resident")
        resident = {n for a in answers for n in a["resident"]}
        _, refs = await self.registry.get.remote()
        methods = {m["id"]: m["method"] for a in await self._each("models") for m in a["resident"]}
        return {"object": "list", "data": [{"name": n, "ref": ref, "resident": n in resident, "method": methods.get(n)}
                                           for n, ref in sorted(refs.items())]}

    @api.post("/v1/adapters", response_model=AdapterEntry, status_code=201,
              responses=error_responses(400, 401, 403, 404, 409, 422, 500, 503))
    async def load_adapter(self, body: AdapterLoad, request: Request):
        """Serve `ref` as `name` on every replica of its group (a new version if `name` is served): checked
        and loaded on one replica first, so a bad adapter is refused before any replica serves it."""
        from serve.registry import allowed

        self._admin(request)
        if not allowed(body.ref, self.roots):
            raise ForbiddenError(f"ref {body.ref!r}: only registry references (models:/NAME@ALIAS, models:/NAME/N) and "
                                 f"folders under serve.adapter_roots ({', '.join(self.roots) or 'none'}) can be loaded")
        if await self._call(self.default, "serves_base", body.name):
            raise RequestError(f"name {body.name!r} is the base model's; choose another")
        group = await self._group_of_ref(body.ref)
        loaded = await self._call(group, "load_adapter", body.name, body.ref, model=body.name)
        await self.registry.put.remote(body.name, body.ref, group)
        self.groups[body.name] = group
        return {"name": body.name, "ref": body.ref, "resident": True, "method": loaded["method"]}

    async def _group_of_ref(self, ref: str) -> str:
        """Which model deployment an adapter goes to: the only one, or the one of its method's replica group."""
        if len(self.models) == 1:
            return self.default
        import asyncio

        from workers.methods import method_for_manifest
        from workers.store import resolve

        _, manifest = await asyncio.to_thread(resolve, ref, tracking_uri=self.tracking_uri)
        group = method_for_manifest(manifest).replica_group()
        if group not in self.models:
            raise AdapterIntegrityError(
                f"{ref}: a {manifest['method']} adapter (replica group {group!r}); this application's replicas "
                f"serve the groups {', '.join(sorted(self.models))}: deploy it with adapters of its group")
        return group

    @api.delete("/v1/adapters/{name}", response_model=AdapterDeleted, responses=error_responses(401, 403, 404, 500, 503))
    async def unload_adapter(self, name: str, request: Request):
        """Stop serving `name` on every replica (requests already running finish)."""
        self._admin(request)
        group = await self._group(name)
        if not await self.registry.delete.remote(name):
            raise UnknownAdapterError(f"unknown adapter {name!r}")
        self.groups.pop(name, None)
        await self._call(group, "drop_adapter", name, model=name)
        return {"name": name, "deleted": True}

    # ---------------------------------------------------------------- classify
    @api.post("/v1/classify", response_model=ClassifyResponse, response_model_exclude_none=True,
              responses=error_responses(400, 401, 404, 409, 413, 422, 500, 503))
    async def classify(self, body: ClassifyRequest, request: Request, response: Response):
        self._auth(request)
        self._count(len(body.inputs), "inputs")
        group = await self._group(body.adapter)
        out = await self._call(group, "classify", body.adapter, body.inputs, body.samples, body.seed, model=body.adapter,
                               retry=True)
        if out["replica"]:
            response.headers["x-adapterflow-replica"] = out["replica"]
        return {"adapter": body.adapter, "results": out["results"]}

    # ---------------------------------------------------------------- completions
    def _params(self, body, max_tokens: int) -> dict:
        return {"max_tokens": max_tokens, "temperature": body.temperature, "top_p": body.top_p, "seed": body.seed,
                "stop": body.stops(), "ignore_eos": body.ignore_eos, "conversation": body.conversation,
                "samples": getattr(body, "samples", None)}

    @staticmethod
    def _usage(ends) -> dict:
        n_prompt = sum(e["prompt_tokens"] for e in ends)
        n_out = sum(e["completion_tokens"] for e in ends)
        return {"prompt_tokens": n_prompt, "completion_tokens": n_out, "total_tokens": n_prompt + n_out}

    async def _stream(self, model: str, prompts, params: dict, chunk, usage: bool, messages=None):
        """Server-sent events: `chunk(index, text, finish)` per piece, a usage chunk if asked, [DONE].
        Errors before the first piece (unknown adapter, a limit) answer with their status as usual."""
        group = await self._group(model)
        handle = self.models[group].options(stream=True, **({"multiplexed_model_id": model} if self.affine else {}))
        gen = handle.stream.remote(model, prompts, params, messages)
        try:
            head = await gen.__anext__()
        except Exception as exc:  # noqa: BLE001 - the replica's own error, with its status
            raise replica_error(exc) from None
        n = head["rows"]

        async def lines():
            ends: list[dict | None] = [None] * n
            try:
                for i in range(n):
                    first = chunk(i, None, None)
                    if first is not None:
                        yield f"data: {json.dumps(first)}\n\n"
                async for event in gen:
                    if "error" in event:  # the headers are out: the error goes in the stream
                        err = {"type": "internal_error", **event["error"]}
                        yield f"data: {json.dumps({'error': err})}\n\n"
                        return
                    i = event["index"]
                    if "finish_reason" in event:
                        ends[i] = event
                    if event["text"] or "finish_reason" in event:
                        yield f"data: {json.dumps(chunk(i, event['text'], event.get('finish_reason')))}\n\n"
                if usage:
                    yield f"data: {json.dumps({**chunk(0, '', None), 'choices': [], 'usage': self._usage(ends)})}\n\n"
                yield "data: [DONE]\n\n"
            except Exception as exc:  # noqa: BLE001 - a replica lost mid-stream: the client hears it
                err = {"type": "internal_error", "message": str(replica_error(exc)), "code": 500}
                yield f"data: {json.dumps({'error': err})}\n\n"
            finally:
                gen.cancel()

        return StreamingResponse(lines(), media_type="text/event-stream", background=BackgroundTask(gen.cancel))

    @api.post("/v1/completions", response_model=CompletionResponse, response_model_exclude_none=True,
              responses={**error_responses(400, 401, 404, 409, 413, 422, 500, 503), **STREAM})
    async def completions(self, body: CompletionRequest, request: Request):
        self._auth(request)
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        self._count(len(prompts), "prompts")
        meta = {"id": f"cmpl-{uuid.uuid4().hex[:24]}", "object": "text_completion", "created": int(time.time()),
                "model": body.model}
        params = self._params(body, self._max_tokens(body.max_tokens))
        if body.stream:
            def chunk(i, text, finish):
                if text is None:
                    return None
                return {**meta, "choices": [{"index": i, "text": text, "logprobs": None, "finish_reason": finish}]}

            return await self._stream(body.model, prompts, params, chunk,
                                      bool(body.stream_options and body.stream_options.include_usage))
        group = await self._group(body.model)
        results = await self._call(group, "complete", body.model, prompts, params, model=body.model, retry=True)
        choices = []
        for i, r in enumerate(results):
            choice = {"index": i, "text": r["text"], "logprobs": None, "finish_reason": r["finish_reason"]}
            if "monte_carlo" in r:
                choice["monte_carlo"] = r["monte_carlo"]
            choices.append(choice)
        return {**meta, "choices": choices, "usage": self._usage(results)}

    @api.post("/v1/chat/completions", response_model=ChatCompletionResponse,
              responses={**error_responses(400, 401, 404, 409, 413, 422, 500, 503), **STREAM})
    async def chat_completions(self, body: ChatCompletionRequest, request: Request):
        self._auth(request)
        self._count(len(body.messages), "messages")
        messages = [m.model_dump() for m in body.messages]
        params = self._params(body, self._max_tokens(body.max_completion_tokens or body.max_tokens or 16))
        meta = {"id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "created": int(time.time()), "model": body.model}
        if body.stream:
            def chunk(i, text, finish):
                delta = {"role": "assistant", "content": ""} if text is None else (
                    {"content": text} if text else {})
                return {**meta, "object": "chat.completion.chunk",
                        "choices": [{"index": i, "delta": delta, "logprobs": None, "finish_reason": finish}]}

            return await self._stream(body.model, None, params, chunk,
                                      bool(body.stream_options and body.stream_options.include_usage), messages)
        group = await self._group(body.model)
        (r,) = await self._call(group, "complete", body.model, None, params, messages, model=body.model, retry=True)
        return {**meta, "object": "chat.completion",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": r["text"]},
                             "logprobs": None, "finish_reason": r["finish_reason"]}],
                "usage": self._usage([r])}
