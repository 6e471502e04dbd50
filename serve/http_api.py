"""The HTTP plumbing of the ingress: the FastAPI app, its request limits, and the one error mapping
(every error is JSON in OpenAI's shape, `{"error": {"type", "message", "param", "code"}}`): the error
tree's statuses, malformed bodies 422, bodies over the limit 413 (chunked ones too), a model replica's
back-pressure 503, anything else 500 without a remote traceback."""

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

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
# the ingress's request limits (one deployment per replica process; set by Ingress from its ServeSpec)
LIMITS = {"max_body_bytes": 1_048_576, "max_inputs": 256, "max_prompt_tokens": 2048, "max_tokens": 1024}


def error(status: int, kind: str, message: str, param: str | None = None) -> JSONResponse:
    """The one error shape (OpenAI's): {"error": {"type", "message", "param", "code"}}."""
    return JSONResponse(status_code=status, content={"error": {"type": kind, "message": message, "param": param,
                                                               "code": status}})


@api.exception_handler(AdapterflowError)
async def _platform_error(request: Request, exc: AdapterflowError):
    kind = next((name for cls, name in ERROR_TYPES.items() if isinstance(exc, cls)),
                "invalid_request" if isinstance(exc, UserError) else "internal_error")
    if not isinstance(exc, UserError):
        log.error("request failed: %s", exc)
    return error(exc.http_status, kind, str(exc))


@api.exception_handler(Exception)
async def _unexpected(request: Request, exc: Exception):
    """Anything else is still JSON in the same shape: a model replica that is overloaded is a 503 (retry
    later), one that failed or went away a 500; the message never carries a remote traceback."""
    from ray.serve.exceptions import BackPressureError

    exc = replica_error(exc)
    if isinstance(exc, AdapterflowError):
        return await _platform_error(request, exc)
    if isinstance(exc, BackPressureError):
        return error(503, "overloaded", "the model replicas are at their queue limit; retry shortly")
    if replica_lost(exc):
        return error(503, "replica_unavailable", "the model replica serving this request went away and the "
                     "retries (serve.replica_retries) did not reach another; retry shortly")
    log.error("request failed: %s: %s", type(exc).__name__, exc)
    return error(500, "internal_error", f"the request failed on the server ({type(exc).__name__}); it was logged")


def _too_large(size: str) -> JSONResponse:
    return error(413, "request_too_large", f"the request body has {size} bytes, over this server's limit of "
                 f"{LIMITS['max_body_bytes']} (serve.max_body_bytes)")


@api.middleware("http")
async def _body_limit(request: Request, call_next):
    """Bodies over serve.max_body_bytes are refused, also those sent in chunks (no content-length),
    which are read only up to the limit."""
    limit, length = LIMITS["max_body_bytes"], request.headers.get("content-length", "")
    if length.isdigit():
        if int(length) > limit:
            return _too_large(length)
    elif request.method in ("POST", "PUT", "PATCH"):
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                return _too_large(f"more than {limit}")
        request._body = bytes(body)  # what the route reads
    return await call_next(request)


@api.exception_handler(RequestValidationError)
async def _malformed(request: Request, exc: RequestValidationError):
    parts, params = [], []
    for e in exc.errors():
        loc = ".".join(str(x) for x in e["loc"] if x != "body")
        parts.append(f"{loc or 'body'}: {e['msg']}")
        params.append(loc)
    return error(422, "invalid_request", "; ".join(parts), params[0] if len(params) == 1 and params[0] else None)


def replica_lost(exc: BaseException) -> bool:
    """Whether a handle call failed because its replica died or could not be reached (not because of
    what the replica answered): safe to send again when the call only computes an answer."""
    from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError, RayTaskError

    if isinstance(exc, RayTaskError):  # the replica ran the request and raised: its own answer
        return False
    return isinstance(exc, (ActorDiedError, ActorUnavailableError, RayActorError))


def replica_error(exc: BaseException) -> BaseException:
    """The error a model replica raised, out of Ray's wrapper (which carries the remote traceback)."""
    from ray.exceptions import RayTaskError

    while isinstance(exc, RayTaskError) and getattr(exc, "cause", None) is not None:
        exc = exc.cause
    return exc
