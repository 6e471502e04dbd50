"""Ray Serve application: one base model per replica, adapters by name, an HTTP API.

Routes: `GET /healthz`, `GET /v1/models`, `POST /v1/classify` (seq-cls adapters) and
`POST /v1/completions` (causal-LM adapters, OpenAI request and response shape, non-streaming).
Errors are JSON `{"error": {"type", "message", "code"}}`: unknown adapter 404, malformed body 422,
wrong task for the adapter 400, missing or wrong API key 401.
"""



import hmac
import logging
import os
import time
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator
from ray import serve

log = logging.getLogger(__name__)

api = FastAPI(title="adapterflow", version="0.1.0")


def error(status: int, kind: str, message: str) -> JSONResponse:
    return JSONResponse(status_code=status, content={"error": {"type": kind, "message": message,
                                                               "code": status}})


@api.exception_handler(RequestValidationError)
async def _malformed(request: Request, exc: RequestValidationError):
    parts = []
    for e in exc.errors():
        loc = ".".join(str(x) for x in e["loc"] if x != "body")
        parts.append(f"{loc or 'body'}: {e['msg']}")
    return error(422, "invalid_request", "; ".join(parts))


class ClassifyRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    adapter: str
    inputs: list[str | dict[str, Any]] = Field(..., min_length=1, max_length=1024)
    samples: int | None = Field(None, ge=0, le=1024, description="PVeRA Monte-Carlo forwards (0 = off).")
    seed: int = 0


class CompletionRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")  # OpenAI clients send fields we do not use
    model: str
    prompt: str | list[str]
    max_tokens: int = Field(16, ge=1, le=4096)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1, le=1)
    stream: bool = False
    seed: int | None = None
    stop: str | list[str] | None = None
    samples: int | None = Field(None, ge=0, le=1024)  # PVeRA Monte-Carlo log-probabilities (extension)

    @field_validator("stream")
    @classmethod
    def _no_stream(cls, v: bool) -> bool:
        if v:
            raise ValueError("streaming is not supported yet; send stream: false")
        return v


@serve.deployment
@serve.ingress(api)
class AdapterServer:
    def __init__(self, adapters: dict[str, str], tracking_uri: str | None = None,
                 threads: int = 1, api_key_env: str | None = None, max_new_tokens: int = 64):
        from workers.inference import Engine
        from workers.store import resolve

        self.api_key = None
        if api_key_env:
            self.api_key = os.environ.get(api_key_env)
            if not self.api_key:
                raise RuntimeError(
                    f"serve.api_key_env is {api_key_env!r} but that variable is not set on the replica"
                )
        if not adapters:
            raise ValueError("no adapters to serve")
        resolved = {name: resolve(ref, tracking_uri=tracking_uri) for name, ref in adapters.items()}
        first = next(iter(resolved.values()))[1]
        self.engine = Engine(first["model"], threads=threads)
        for name, (folder, manifest) in resolved.items():
            self.engine.add_adapter(name, folder, manifest)
        self.max_new_tokens = max_new_tokens

    def _auth(self, request: Request) -> JSONResponse | None:
        if self.api_key is None:
            return None
        header = request.headers.get("authorization", "")
        token = header[7:] if header.lower().startswith("bearer ") else ""
        if not hmac.compare_digest(token.encode(), self.api_key.encode()):
            return error(401, "unauthorized", "missing or wrong API key: send 'Authorization: Bearer <key>'")
        return None

    def _adapter_error(self, name: str) -> JSONResponse | None:
        if name not in self.engine.adapters:
            known = ", ".join(sorted(self.engine.adapters))
            return error(404, "adapter_not_found", f"unknown adapter {name!r}; served adapters: {known}")
        return None

    @api.get("/healthz")
    def healthz(self):
        return {"status": "ok", "adapters": sorted(self.engine.adapters)}

    @api.get("/v1/models")
    def models(self, request: Request):
        if (denied := self._auth(request)) is not None:
            return denied
        return {"object": "list", "data": [
            {"id": name, "object": "model", "owned_by": "adapterflow", "task": m["task"],
             "method": m["method"], "base_model": m["base_model"]["name"]}
            for name, m in sorted(self.engine.adapters.items())
        ]}

    @api.post("/v1/classify")
    def classify(self, body: ClassifyRequest, request: Request):
        from workers.inference import WrongTaskError

        if (denied := self._auth(request) or self._adapter_error(body.adapter)) is not None:
            return denied
        try:
            results = self.engine.classify(body.adapter, body.inputs, samples=body.samples, seed=body.seed)
        except WrongTaskError as exc:
            return error(400, "wrong_task", str(exc))
        return {"adapter": body.adapter, "results": results}

    @api.post("/v1/completions")
    def completions(self, body: CompletionRequest, request: Request):
        from workers.inference import WrongTaskError

        if (denied := self._auth(request) or self._adapter_error(body.model)) is not None:
            return denied
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        stop = [body.stop] if isinstance(body.stop, str) else body.stop
        choices, n_prompt, n_out = [], 0, 0
        try:
            for i, p in enumerate(prompts):
                r = self.engine.complete(body.model, p, max_tokens=body.max_tokens,
                                         temperature=body.temperature, top_p=body.top_p,
                                         seed=body.seed, stop=stop, samples=body.samples)
                choice = {"index": i, "text": r["text"], "logprobs": None, "finish_reason": r["finish_reason"]}
                if "monte_carlo" in r:
                    choice["monte_carlo"] = r["monte_carlo"]
                choices.append(choice)
                n_prompt += r["prompt_tokens"]
                n_out += r["completion_tokens"]
        except WrongTaskError as exc:
            return error(400, "wrong_task", str(exc))
        return {"id": f"cmpl-{uuid.uuid4().hex[:24]}", "object": "text_completion",
                "created": int(time.time()), "model": body.model, "choices": choices,
                "usage": {"prompt_tokens": n_prompt, "completion_tokens": n_out,
                          "total_tokens": n_prompt + n_out}}


def build_app(adapters: dict[str, str], *, tracking_uri: str | None = None, num_replicas: int = 1,
              num_cpus: float = 0.5, threads: int = 1, api_key_env: str | None = None,
              max_new_tokens: int = 64):
    return AdapterServer.options(
        num_replicas=num_replicas, ray_actor_options={"num_cpus": num_cpus},
    ).bind(adapters, tracking_uri, threads, api_key_env, max_new_tokens)


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
    serve.run(build_app(adapters, **kwargs), name=name, route_prefix=route_prefix)
    return f"http://{host}:{port}{route_prefix.rstrip('/')}"


def shutdown(name: str | None = None) -> None:
    if name:
        serve.delete(name)
    else:
        serve.shutdown()
