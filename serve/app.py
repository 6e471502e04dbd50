"""Ray Serve application: one base model per replica, adapters by name, an HTTP API.

Routes: `GET /healthz`, `GET /v1/models`, `GET /v1/stats` (batching counters), `POST /v1/classify`
(seq-cls adapters; concurrent requests are batched, see `AdapterServer._classify_batch`) and
`POST /v1/completions` and `POST /v1/chat/completions` (causal-LM adapters, OpenAI request and
response shapes, non-streaming).
Errors are JSON `{"error": {"type", "message", "code"}}`, from one handler over the error tree
(`workers.errors`): unknown adapter 404, malformed body 422, wrong task for the adapter 400, missing
or wrong API key 401, an adapter that does not fit the replica 409, a platform fault 500.
"""



import asyncio
import hmac
import logging
import os
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from ray import serve

from serve.schemas import (
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
               RequestTooLargeError: "request_too_large"}
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

    def __init__(self, adapters: dict[str, str], tracking_uri: str | None = None,
                 threads: int = 1, api_key_env: str | None = None, max_new_tokens: int = 64,
                 base: dict | None = None, max_batch_size: int = 32, batch_wait_timeout_s: float = 0.005,
                 limits: dict | None = None, app_name: str = "adapterflow"):
        from serve import app as module  # the class travels by value: the module's own globals

        module.LIMITS.update(limits or {})
        self._classify_batch.set_max_batch_size(max_batch_size)
        self._classify_batch.set_batch_wait_timeout_s(batch_wait_timeout_s)
        self.api_key = None
        if api_key_env:
            self.api_key = os.environ.get(api_key_env)
            if not self.api_key:
                from workers.errors import SpecError

                raise SpecError(
                    f"serve.api_key_env is {api_key_env!r} but that variable is not set on the replica"
                )
        from serve.app import build_engine  # the class travels by value: import what it calls
        from serve.metrics import ReplicaMetrics

        self.engine = build_engine(adapters, base, tracking_uri, threads)
        self.engine.max_prompt_tokens = module.LIMITS["max_prompt_tokens"]
        self.metrics = ReplicaMetrics(app_name)
        self.engine.on_forward = self.metrics.forward
        self.metrics.adapters(len(self.engine.adapters), list(self.engine.load_seconds.values()))
        self.max_new_tokens = max_new_tokens

    def _auth(self, request: Request) -> None:
        if self.api_key is None:
            return
        header = request.headers.get("authorization", "")
        token = header[7:] if header.lower().startswith("bearer ") else ""
        if not hmac.compare_digest(token.encode(), self.api_key.encode()):
            raise AuthError("missing or wrong API key: send 'Authorization: Bearer <key>'")

    @staticmethod
    def _count(n: int, what: str) -> None:
        from serve.app import LIMITS

        if n > LIMITS["max_inputs"]:
            raise RequestTooLargeError(f"{n} {what} in one request, over this server's limit of "
                                       f"{LIMITS['max_inputs']} (serve.max_inputs); split the request")

    @api.get("/healthz", response_model=Health)
    def healthz(self):
        return {"status": "ok", "adapters": sorted(self.engine.adapters)}

    @api.get("/v1/models", response_model=ModelList, responses=error_responses(401))
    def models(self, request: Request):
        self._auth(request)
        return {"object": "list", "data": [
            {"id": name, "object": "model", "owned_by": "adapterflow", "task": m["task"],
             "method": m["method"], "base_model": m["base_model"]["name"]}
            for name, m in sorted(self.engine.adapters.items())
        ]}

    @api.get("/v1/stats", response_model=Stats, responses=error_responses(401))
    def stats(self, request: Request):
        """Batching so far on this replica: forwards, rows, forwards that mixed adapters."""
        self._auth(request)
        return dict(self.engine.stats)

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

    @api.post("/v1/completions", response_model=CompletionResponse, response_model_exclude_none=True,
              responses=error_responses(400, 401, 404, 413, 422))
    def completions(self, body: CompletionRequest, request: Request):
        self._auth(request)
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        self._count(len(prompts), "prompts")
        stop = [body.stop] if isinstance(body.stop, str) else body.stop
        choices, n_prompt, n_out = [], 0, 0
        for i, p in enumerate(prompts):
            r = self.engine.complete(body.model, p, max_tokens=body.max_tokens, temperature=body.temperature,
                                     top_p=body.top_p, seed=body.seed, stop=stop, samples=body.samples)
            choice = {"index": i, "text": r["text"], "logprobs": None, "finish_reason": r["finish_reason"]}
            if "monte_carlo" in r:
                choice["monte_carlo"] = r["monte_carlo"]
            choices.append(choice)
            n_prompt += r["prompt_tokens"]
            n_out += r["completion_tokens"]
        return {"id": f"cmpl-{uuid.uuid4().hex[:24]}", "object": "text_completion",
                "created": int(time.time()), "model": body.model, "choices": choices,
                "usage": {"prompt_tokens": n_prompt, "completion_tokens": n_out,
                          "total_tokens": n_prompt + n_out}}


    @api.post("/v1/chat/completions", response_model=ChatCompletionResponse,
              responses=error_responses(400, 401, 404, 413, 422))
    def chat_completions(self, body: ChatCompletionRequest, request: Request):
        self._auth(request)
        self._count(len(body.messages), "messages")
        prompt = self.engine.chat_prompt(body.model, [m.model_dump() for m in body.messages])
        stop = [body.stop] if isinstance(body.stop, str) else body.stop
        r = self.engine.complete(body.model, prompt, max_tokens=body.max_completion_tokens or body.max_tokens or 16,
                                 temperature=body.temperature, top_p=body.top_p, seed=body.seed, stop=stop)
        return {"id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "object": "chat.completion", "created": int(time.time()),
                "model": body.model, "choices": [{"index": 0, "message": {"role": "assistant", "content": r["text"]},
                                                  "logprobs": None, "finish_reason": r["finish_reason"]}],
                "usage": {"prompt_tokens": r["prompt_tokens"], "completion_tokens": r["completion_tokens"],
                          "total_tokens": r["prompt_tokens"] + r["completion_tokens"]}}

def build_engine(adapters: dict[str, str], base: dict | None, tracking_uri: str | None = None, threads: int = 1):
    """What a replica holds: the operator's base with the adapters loaded (each resolved, verified and
    checked against that base)."""
    from workers.errors import SpecError
    from workers.inference import Engine
    from workers.store import resolve
    from workers.trust import serving_spec

    if not adapters:
        raise SpecError("no adapters to serve")
    base = base or operator_base(adapters, tracking_uri)
    resolved = {name: resolve(ref, tracking_uri=tracking_uri) for name, ref in adapters.items()}
    first_folder, first = next(iter(resolved.values()))
    engine = Engine(serving_spec(first, base, first_folder), threads=threads)
    for name, (folder, manifest) in resolved.items():
        engine.add_adapter(name, folder, manifest)
    return engine


def operator_base(adapters: dict[str, str], tracking_uri: str | None = None) -> dict:
    """The base the registry recorded for these adapters (the operator's pipeline wrote it); a plain
    folder has none, and then the operator must name the base."""
    from workers.errors import SpecError
    from workers.store import registered_base

    bases = {ref: registered_base(ref, tracking_uri) for ref in adapters.values()}
    known = [b for b in bases.values() if b]
    if not known or len(known) < len(bases):
        missing = ", ".join(ref for ref, b in bases.items() if not b)
        raise SpecError(f"no base model for {missing}: name it (adapterflow serve --base MODEL, or a spec's "
                        "model section); an adapter's own manifest never chooses the base a server builds")
    return known[0]


def build_app(adapters: dict[str, str], *, tracking_uri: str | None = None, num_replicas: int = 1,
              num_cpus: float = 0.5, threads: int = 1, api_key_env: str | None = None,
              max_new_tokens: int = 64, base: dict | None = None, max_ongoing_requests: int = 64,
              max_batch_size: int = 32, batch_wait_timeout_s: float = 0.005, limits: dict | None = None,
              app_name: str = "adapterflow"):
    if base is None:  # fail in the driver, before any replica starts
        base = operator_base(adapters, tracking_uri)
    return AdapterServer.options(
        num_replicas=num_replicas, ray_actor_options={"num_cpus": num_cpus},
        max_ongoing_requests=max_ongoing_requests,
    ).bind(adapters, tracking_uri, threads, api_key_env, max_new_tokens, base, max_batch_size,
           batch_wait_timeout_s, limits, app_name)


def deploy(adapters: dict[str, str], *, host: str = "127.0.0.1", port: int = 8000, name: str = "adapterflow",
           route_prefix: str = "/", **kwargs) -> str:
    """Start Serve's HTTP proxy on host:port (0: a free port), run the app, return its base URL.
    A proxy already running keeps its address; the URL returned is the one it listens on."""
    if port == 0:
        import socket

        with socket.socket() as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
    serve.start(http_options={"host": host, "port": port})
    try:
        from ray.serve.context import _get_global_client

        opts = _get_global_client().http_config
        host, port = opts.host, opts.port
    except (ImportError, AttributeError):
        pass
    serve.run(build_app(adapters, app_name=name, **kwargs), name=name, route_prefix=route_prefix)
    return f"http://{host}:{port}{route_prefix.rstrip('/')}"


def shutdown(name: str | None = None) -> None:
    if name:
        serve.delete(name)
    else:
        serve.shutdown()
