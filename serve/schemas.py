"""The HTTP API's request, response and error bodies: what the OpenAPI schema (`/openapi.json`)
declares is what goes over the wire, errors included."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator


class ErrorDetail(BaseModel):
    type: str = Field(..., description="adapter_not_found, wrong_task, invalid_request, unauthorized, "
                      "request_too_large, adapter_integrity, forbidden, overloaded or internal_error")
    message: str
    param: str | None = Field(None, description="The request field at fault, when one is.")
    code: int = Field(..., description="The HTTP status.")


class ErrorBody(BaseModel):
    error: ErrorDetail


def error_responses(*codes: int) -> dict:
    """Route decorator `responses=`: each status answered with an ErrorBody."""
    what = {400: "The request does not fit the adapter (wrong task, missing template field, ...).",
            401: "Missing or wrong API key.", 403: "Refused whoever asks (admin routes off, a folder outside "
            "the allow-listed roots).", 404: "Unknown adapter.", 409: "The adapter does not fit this replica.",
            413: "Over a request limit (body bytes, inputs, prompt tokens, max_tokens).", 422: "Malformed request.",
            500: "The request failed on the server.", 503: "The model replicas are at their queue limit; retry."}
    return {c: {"model": ErrorBody, "description": what[c]} for c in codes}


class ClassifyRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    adapter: str
    inputs: list[str | dict[str, Any]] = Field(..., min_length=1, max_length=1024)
    samples: int | None = Field(None, ge=0, le=1024, description="Monte-Carlo forwards (PVeRA; 0 = off).")
    seed: int = 0


class MonteCarlo(BaseModel):
    samples: int
    mean: dict[str, float]
    low: dict[str, float]
    high: dict[str, float]


class ClassifyResult(BaseModel):
    probabilities: dict[str, float]
    label: str
    label_id: int
    monte_carlo: MonteCarlo | None = None


class ClassifyResponse(BaseModel):
    adapter: str
    results: list[ClassifyResult]


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class Sampling(BaseModel):
    """What OpenAI completion and chat requests share."""

    model_config = ConfigDict(extra="ignore")  # OpenAI clients send fields we do not use
    model: str
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1, le=1)
    stream: bool = Field(False, description="Server-sent events, one chunk per piece of text, then [DONE].")
    stream_options: StreamOptions | None = None
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    stop: str | list[str] | None = Field(None, description="Up to 4 strings that end the text (not included).")
    ignore_eos: bool = Field(False, description="Decode to max_tokens even past the end-of-sequence token "
                             "(extension, for benchmarks).")
    conversation: str | None = Field(None, min_length=1, max_length=256, description="A conversation id "
                                     "(extension): an aLoRA adapter, or the base model, reuses the base's cache of "
                                     "what this conversation sent before and prefills only what is new.")

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        stops = [v] if isinstance(v, str) else v or []
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("at most 4 stop strings, none empty")
        return v

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class CompletionRequest(Sampling):
    prompt: str | list[str] = Field(..., min_length=1)
    max_tokens: int = Field(16, ge=1, le=4096)
    samples: int | None = Field(None, ge=0, le=1024, description="Monte-Carlo log-probabilities (PVeRA; extension).")


class TokenMonteCarlo(BaseModel):
    samples: int
    tokens: list[str]
    mean: list[float]
    low: list[float]
    high: list[float]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: None = None
    finish_reason: str
    monte_carlo: TokenMonteCarlo | None = None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionResponse(BaseModel):
    id: str
    object: str = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class ModelEntry(BaseModel):
    id: str
    object: str = "model"
    owned_by: str
    task: str | None = Field(None, description="Known once the adapter is resident on the replica that answers.")
    method: str | None = Field(None, description="The adapter method, 'base' for the base model itself.")
    base_model: str


ADAPTER_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"


class AdapterLoad(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(..., pattern=ADAPTER_NAME, description="The name requests use (model / adapter).")
    ref: str = Field(..., min_length=1, max_length=4096, description="A registry reference (models:/NAME@ALIAS, "
                     "models:/NAME/N) or an adapter folder under one of serve.adapter_roots.")


class AdapterEntry(BaseModel):
    name: str
    ref: str
    resident: bool = Field(..., description="Loaded on the replica that answered.")
    method: str | None = None


class AdapterList(BaseModel):
    object: str = "list"
    data: list[AdapterEntry]


class AdapterDeleted(BaseModel):
    name: str
    deleted: bool


class ModelList(BaseModel):
    object: str = "list"
    data: list[ModelEntry]


class GroupHealth(BaseModel):
    replica: str | None = Field(None, description="The id of the model replica that answered for its group.")
    adapters: list[str] = Field(..., description="The adapters that replica holds now.")


class Health(BaseModel):
    status: str
    adapters: list[str] | None = Field(None, description="With replicas=true: the adapters the answering model "
                                       "replicas hold now.")
    replica: str | None = Field(None, description="With replicas=true: the id of the model replica that answered "
                                "(the first group's).")
    groups: dict[str, GroupHealth] | None = Field(None, description="With replicas=true: replica group -> the model "
                                                  "replica that answered for it and its adapters.")


class Stats(BaseModel):
    cache_hits: int = Field(0, description="Requests whose adapter the replica held.")
    cache_misses: int = Field(0, description="Requests whose adapter the replica loaded first.")
    evictions: int = Field(0, description="Adapters the replica let go to stay within its bounds.")
    reloads: int = Field(0, description="New versions loaded (a registry alias moved, a reference changed).")
    forwards: int = Field(..., description="Classify forwards.")
    rows: int = Field(..., description="Rows those forwards held.")
    mixed_forwards: int = Field(..., description="Classify forwards that mixed adapters.")
    decode_steps: int = Field(0, description="Steps of the decode loop (every running row gets one token).")
    decode_forwards: int = Field(0, description="Decode forwards (one per lane and step).")
    decode_rows: int = Field(0, description="Rows those forwards held.")
    prefill_forwards: int = Field(0, description="Forwards that prefilled newly arrived prompts.")
    joined_mid_decode: int = Field(0, description="Requests that joined a lane while it was decoding.")
    mixed_decode_forwards: int = Field(0, description="Decode and prefill forwards that mixed adapters.")
    prefix_tokens_computed: int = Field(0, description="Prompt tokens prefilled for requests of a conversation.")
    prefix_tokens_reused: int = Field(0, description="Prompt tokens a conversation's cached prefix spared.")
    prefix_hits: int = Field(0, description="Requests that reused a conversation's cached prefix.")
    prefix_evictions: int = Field(0, description="Conversation caches let go (LRU, serve.max_conversations).")


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: str = Field(..., min_length=1)
    content: str


class ChatCompletionRequest(Sampling):
    messages: list[ChatMessage] = Field(..., min_length=1, max_length=1024)
    max_tokens: int | None = Field(None, ge=1, le=4096)
    max_completion_tokens: int | None = Field(None, ge=1, le=4096)


class AssistantMessage(BaseModel):
    role: str = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: None = None
    finish_reason: str


class ChatCompletionResponse(BaseModel):
    id: str
    object: str = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
