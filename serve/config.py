"""The `serve` section of a pipeline spec."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from workers.common import StrictModel


class AutoscalingSpec(StrictModel):
    min_replicas: int = Field(1, ge=0, description="Fewest replicas of a model deployment.")
    max_replicas: int = Field(2, gt=0, description="Most replicas of a model deployment.")
    target_ongoing_requests: float = Field(
        16.0, gt=0, description="Ongoing requests per replica the autoscaler aims for.")

    @model_validator(mode="after")
    def _check(self):
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"serve.autoscaling: min_replicas ({self.min_replicas}) is above max_replicas "
                             f"({self.max_replicas})")
        return self


class ServeSpec(StrictModel):
    host: str = Field("127.0.0.1", description="Address the HTTP proxy binds.")
    port: int = Field(8000, ge=0, le=65535, description="HTTP port (0 = pick a free one).")
    route_prefix: str = Field("/", description="URL prefix of the app.")
    app_name: str = Field("adapterflow", description="Ray Serve application name.")
    adapters: dict[str, str] = Field(
        default_factory=dict,
        description="More adapters to serve beside the pipeline's own: name -> registry reference "
        "(models:/NAME@ALIAS) or adapter folder. All share the replica's base model.",
    )
    num_replicas: int = Field(1, gt=0, description="Replicas of each model deployment (each holds one base model); "
                              "with `autoscaling`, where it starts.")
    autoscaling: AutoscalingSpec | None = Field(
        None, description="Scale each model deployment between min_replicas and max_replicas on its ongoing requests "
        "(Ray Serve's autoscaler); null: a fixed num_replicas.",
    )
    ingress_replicas: int = Field(1, gt=0, description="Replicas of the HTTP ingress (auth, validation, routing).")
    ingress_num_cpus: float = Field(0.0, ge=0, description="CPUs per ingress replica (it waits on the model replicas).")
    num_cpus: float = Field(
        0.5, gt=0, description="CPUs per replica (fractional so serving and training coexist)."
    )
    threads: int = Field(1, gt=0, description="torch threads per replica.")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per model replica (Ray resource; fractional GPUs share one).")
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="Where a model replica puts the base and its adapters: auto = cuda when num_gpus > 0, "
        "else cpu. The dtype is the model section's (model.dtype).",
    )
    max_ongoing_requests: int = Field(
        64, gt=0, description="Requests a replica accepts at once (Ray Serve's default, 5, would cap every batch at 5)."
    )
    max_batch_size: int = Field(32, gt=0, description="Classify requests that may share one batch of forwards.")
    replica_retries: int = Field(
        3, ge=0, le=20, description="Times the ingress sends a classify or a non-streaming completion again when the "
        "model replica it went to died or was unreachable (another replica, or the one Serve starts in its place, "
        "answers); streams are never resent. 0: the client gets the 503.",
    )
    batch_wait_timeout_s: float = Field(
        0.005, ge=0, description="How long a batch waits for more requests once it has one."
    )
    api_key_env: str | None = Field(
        None,
        description="Name of an environment variable holding the API key; when set, requests "
        "need 'Authorization: Bearer <key>'. The key itself never goes in a spec.",
    )
    admin_key_env: str | None = Field(
        None, description="Name of an environment variable holding the admin key, which the adapter routes "
        "(GET/POST/DELETE /v1/adapters) need; unset: those routes are off. Never the client key.",
    )
    adapter_roots: list[str] = Field(
        default_factory=list, description="Folders under which POST /v1/adapters may load adapter folders "
        "(registry references, models:/NAME@ALIAS or models:/NAME/N, are always allowed; runs:/ and "
        "artifact-store URIs never). Empty: registry references only.",
    )
    max_adapters: int = Field(64, gt=0, description="Adapters one replica holds at once (LRU beyond).")
    max_adapter_bytes: int = Field(4 << 30, gt=0, description="Adapter weight bytes one replica holds (LRU beyond).")
    registry_sync_s: float = Field(2.0, gt=0, description="How often a replica re-reads the app's adapter registry.")
    alias_refresh_s: float = Field(
        30.0, gt=0, description="How often a replica checks whether a registry alias it serves moved to another "
        "version (then loads it; requests running finish on the old one).",
    )
    max_conversations: int = Field(64, gt=0, description="Conversations whose base prefix cache a replica keeps "
                                   "(requests with `conversation`; LRU beyond).")
    max_conversation_tokens: int = Field(65_536, gt=0, description="Tokens those caches hold in all (LRU beyond).")
    max_new_tokens: int = Field(64, gt=0, description="Default completion length.")
    max_body_bytes: int = Field(1_048_576, gt=0, description="Largest request body accepted (413 beyond).")
    max_inputs: int = Field(256, gt=0, description="Inputs (classify) or prompts (completions) per request (413 beyond).")
    max_prompt_tokens: int = Field(2048, gt=0, description="Tokens of one formatted prompt (413 beyond).")
    max_tokens: int = Field(1024, gt=0, description="Largest max_tokens a completion may ask for (413 beyond).")
    samples: list[str] = Field(
        default_factory=list, description="Inputs sent to the deployment by `adapterflow run`."
    )

    def resolved_device(self) -> str:
        if self.device == "auto":
            return "cuda" if self.num_gpus > 0 else "cpu"
        return self.device

    def actor_options(self) -> dict:
        """A model replica's Ray resources."""
        return {"num_cpus": self.num_cpus, **({"num_gpus": self.num_gpus} if self.num_gpus else {})}

    def autoscaling_options(self) -> dict:
        """A model deployment's replica options: a fixed count, or the autoscaler's config."""
        if self.autoscaling is None:
            return {"num_replicas": self.num_replicas}
        a = self.autoscaling
        return {"num_replicas": "auto", "autoscaling_config": {
            "min_replicas": a.min_replicas, "max_replicas": a.max_replicas,
            "initial_replicas": min(max(self.num_replicas, a.min_replicas), a.max_replicas),
            "target_ongoing_requests": a.target_ongoing_requests}}

    def cache(self) -> dict:
        return {"max_adapters": self.max_adapters, "max_bytes": self.max_adapter_bytes,
                "registry_sync_s": self.registry_sync_s, "alias_refresh_s": self.alias_refresh_s}

    def limits(self) -> dict:
        return {"max_body_bytes": self.max_body_bytes, "max_inputs": self.max_inputs,
                "max_prompt_tokens": self.max_prompt_tokens, "max_tokens": self.max_tokens}
