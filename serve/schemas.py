"""The HTTP API's request, response and error bodies: what the OpenAPI schema (`/openapi.json`)
declares is what goes over the wire, errors included."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator


class ErrorDetail(BaseModel):
    type: str = Field(..., description="adapter_not_found, wrong_task, invalid_request, unauthorized, "
                      "request_too_large, adapter_integrity or internal_error")
    message: str
    code: int = Field(..., description="The HTTP status.")


class ErrorBody(BaseModel):
    error: ErrorDetail


def error_responses(*codes: int) -> dict:
    """Route decorator `responses=`: each status answered with an ErrorBody."""
    what = {400: "The request does not fit the adapter (wrong task, missing template field, ...).",
            401: "Missing or wrong API key.", 404: "Unknown adapter.", 409: "The adapter does not fit this replica.",
            413: "Over a request limit (body bytes, inputs, prompt tokens).", 422: "Malformed request."}
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


class Sampling(BaseModel):
    """What OpenAI completion and chat requests share."""

    model_config = ConfigDict(extra="ignore")  # OpenAI clients send fields we do not use
    model: str
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1, le=1)
    stream: bool = False
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    stop: str | list[str] | None = None

    @field_validator("stream")
    @classmethod
    def _no_stream(cls, v: bool) -> bool:
        if v:
            raise ValueError("streaming is not supported yet; send stream: false")
        return v


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
    task: str
    method: str
    base_model: str


class ModelList(BaseModel):
    object: str = "list"
    data: list[ModelEntry]


class Health(BaseModel):
    status: str
    adapters: list[str]


class Stats(BaseModel):
    forwards: int
    rows: int
    mixed_forwards: int


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
