"""The engine server's configuration and state, and the checks every generation route makes first."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tandem.engine.async_engine import AsyncEngine
from tandem.engine.sampling_params import SamplingParams
from tandem.engine.server.kv_events_pub import KVEventHub, RedisKVEventPublisher
from tandem.engine.server.metrics import ServerMetrics
from tandem.protocol.chat import TemplateFeatures
from tandem.protocol.errors import APIError


@dataclass(slots=True)
class ServerConfig:
    """What ``tandem serve`` / prefill / decode configure about the HTTP side."""

    served_model_names: list[str]
    api_keys: list[str] = field(default_factory=list)
    max_waiting_requests: int | None = None
    advertise_url: str = "http://127.0.0.1:8000"
    kv_events_redis: str | None = None
    role: str = "aggregated"  # "aggregated" | "prefill" | "decode"

    @property
    def model_name(self) -> str:
        return self.served_model_names[0]


class ServerState:
    """Everything the routes need: the engine, config, metrics and the KV-event hub."""

    def __init__(self, engine: AsyncEngine, config: ServerConfig, registry: Any = None) -> None:
        self.engine = engine
        self.config = config
        self.metrics = ServerMetrics(config.model_name, lambda: engine.stats, registry)
        self.kv_hub = KVEventHub(config.advertise_url, config.model_name, engine.config.cache.block_size)
        self.redis_publisher = RedisKVEventPublisher(self.kv_hub, config.kv_events_redis) \
            if config.kv_events_redis else None
        self.engine.kv_event_listeners.append(self.kv_hub.publish_threadsafe)
        # Extra routes/hooks for worker roles (disaggregation) register here.
        self.extensions: list[Any] = []
        # Called once if the engine fails to start (e.g. ``tandem serve`` stops its server and exits 1); without
        # it the app stays up and answers 503 with the reason.
        self.on_engine_start_failure: Callable[[BaseException], None] | None = None

    @property
    def max_model_len(self) -> int:
        return self.engine.config.scheduler.max_model_len

    @property
    def llm(self):
        """The loaded ``LLMEngine`` (call after ``check_ready``)."""
        engine = self.engine.engine
        assert engine is not None
        return engine

    @property
    def vocab_size(self) -> int:
        return self.llm.model_config.vocab_size

    def template_features(self) -> TemplateFeatures:
        """What the model's chat template renders by itself (tools, tool calls)."""
        tokenizer = self.llm.tokenizer
        return TemplateFeatures.of(getattr(tokenizer, "chat_template", None) if tokenizer is not None else None)

    def token_text(self, token_id: int) -> str:
        tok = self.llm.tokenizer
        return tok.decode([token_id]) if tok is not None else str(token_id)

    def check_model(self, model: str | None) -> str:
        """The served model name the request is for (404 naming ``model`` for another one)."""
        names = self.config.served_model_names
        if model is None or model == "":
            return names[0]
        if model not in names:
            raise APIError(404, f"The model `{model}` does not exist. Served models: {', '.join(names)}",
                           param="model", code="model_not_found")
        return model

    def check_ready(self) -> None:
        """503 while the engine loads, after it failed, or when the waiting queue is full."""
        if self.engine.error is not None:
            raise APIError(503, f"engine failed to start: {self.engine.error}", code="engine_dead")
        if not self.engine.is_ready:
            raise APIError(503, "the model is still loading; retry shortly", code="model_loading")
        limit = self.config.max_waiting_requests
        stats = self.engine.stats
        if limit is not None and stats is not None and stats.num_waiting >= limit:
            raise APIError(503, f"server overloaded: {stats.num_waiting} requests already waiting (limit {limit})",
                           code="queue_full")

    def check_length(self, prompt_len: int, params: SamplingParams, param: str,
                     max_tokens_param: str = "max_tokens") -> None:
        """400 when the prompt (plus ``max_tokens``) does not fit the context."""
        limit = self.max_model_len
        if prompt_len >= limit:
            raise APIError(400, f"This model's maximum context length is {limit} tokens. However, your prompt has "
                                f"{prompt_len} tokens, leaving no room for output.", param=param,
                           code="context_length_exceeded")
        if params.max_tokens is not None and prompt_len + params.max_tokens > limit:
            raise APIError(400, f"This model's maximum context length is {limit} tokens. However, you requested "
                                f"{prompt_len + params.max_tokens} tokens ({prompt_len} in the {param}, "
                                f"{params.max_tokens} in the completion).", param=max_tokens_param,
                           code="context_length_exceeded")


def now() -> int:
    return int(time.time())
