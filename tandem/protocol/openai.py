"""OpenAI request schemas (completions, chat, tokenize), shared by the engine server and the router.

Unknown fields are a 400 naming them (``extra="forbid"``), and so are known OpenAI fields this server cannot
honour (``UNSUPPORTED``): a client must never believe a field took effect when it did not. vLLM's extras
(``top_k``, ``min_p``, ``repetition_penalty``, ``structured_outputs``, ``guided_*``, ...) are accepted.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, model_validator

from tandem.protocol.continuation import Continuation
from tandem.protocol.kv_transfer import KVTransferParams

# Known OpenAI fields we do not implement -> the values that are harmless (the field's default behaviour).
UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "audio": (None,),
    "modalities": (None, ["text"]),
    "prediction": (None,),
    "web_search_options": (None,),
    "functions": (None,),  # the deprecated spelling of tools
    "function_call": (None,),
    "reasoning_effort": (None,),
    "verbosity": (None,),
    "store": (None, False),
    "metadata": (None,),
    "service_tier": (None, "auto", "default"),
    "prompt_cache_key": (None,),
    "safety_identifier": (None,),
}


def reject_unsupported(body: Any) -> None:
    """Raise ValueError naming the first known-but-unsupported field given a value that would change behaviour."""
    if not isinstance(body, dict):
        return
    for name, harmless in UNSUPPORTED.items():
        if name in body and body[name] not in harmless:
            raise ValueError(f"{name}: not supported by this server")


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _unsupported(cls, data: Any) -> Any:
        reject_unsupported(data)
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if k not in UNSUPPORTED}
        return data


class StreamOptions(BaseModel):
    """``stream_options``."""

    model_config = ConfigDict(extra="forbid")
    include_usage: StrictBool = False
    continuous_usage_stats: StrictBool = False

    @model_validator(mode="after")
    def _check(self) -> "StreamOptions":
        if self.continuous_usage_stats:
            raise ValueError("continuous_usage_stats: not supported (usage comes once, at the end, with include_usage)")
        return self


class SamplingFields(_Request):
    """Fields shared by completions and chat, including vLLM's extras sent through ``extra_body``."""

    model: str | None = None
    n: StrictInt = 1
    temperature: float | None = None
    top_p: float | None = None
    top_k: StrictInt | None = None
    min_p: float | None = None
    seed: StrictInt | None = None
    presence_penalty: float | None = 0.0
    frequency_penalty: float | None = 0.0
    repetition_penalty: float | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[StrictInt] | None = None
    include_stop_str_in_output: StrictBool = False
    ignore_eos: StrictBool = False
    min_tokens: StrictInt = 0
    skip_special_tokens: StrictBool = True
    prompt_logprobs: StrictInt | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    best_of: StrictInt | None = None
    logit_bias: dict[str, float] | None = None
    # Structured output (read by tandem.protocol.structured_output.parse_structured_output).
    response_format: dict[str, Any] | None = None
    structured_outputs: dict[str, Any] | None = None
    guided_json: Any = None
    guided_regex: Any = None
    guided_choice: Any = None
    guided_grammar: Any = None
    guided_json_object: Any = None
    guided_decoding_backend: Any = None
    guided_whitespace_pattern: Any = None
    # Disaggregated prefill/decode (vLLM-compatible shape), parsed into KVTransferParams at the edge.
    kv_transfer_params: dict[str, Any] | None = None
    # Not an OpenAI field: lets a caller pick the engine request id (prefill/decode pairing).
    request_id: str | None = None
    # Mid-stream migration (tandem.protocol.continuation): token ids on every choice (vLLM's field), and the
    # router's internal resume of a request whose worker failed.
    return_token_ids: StrictBool = False
    tandem_continuation: Continuation | None = None

    def kv_params(self) -> KVTransferParams | None:
        """The typed ``kv_transfer_params`` (ValueError naming the bad field)."""
        return KVTransferParams.parse(self.kv_transfer_params)


class CompletionRequest(SamplingFields):
    """``POST /v1/completions``."""

    prompt: str | list[StrictInt] | list[str] | list[list[StrictInt]]
    max_tokens: StrictInt | None = 16
    logprobs: StrictInt | None = None
    echo: StrictBool = False
    suffix: str | None = None
    add_special_tokens: StrictBool = True


class ChatCompletionRequest(SamplingFields):
    """``POST /v1/chat/completions``. Messages stay plain dicts: ``tandem.protocol.chat`` validates them."""

    messages: list[dict[str, Any]] = Field(min_length=1)
    max_tokens: StrictInt | None = None
    max_completion_tokens: StrictInt | None = None
    logprobs: StrictBool = False
    top_logprobs: StrictInt | None = None
    add_generation_prompt: StrictBool = True
    continue_final_message: StrictBool = False
    chat_template_kwargs: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = None
    parallel_tool_calls: StrictBool | None = None

    @model_validator(mode="after")
    def _check_logprobs(self) -> "ChatCompletionRequest":
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs: requires logprobs to be true")
        return self


class TokenizeRequest(_Request):
    """``POST /tokenize``: a prompt, or chat messages rendered through the chat template."""

    model: str | None = None
    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None
    tools: list[dict[str, Any]] | None = None
    add_special_tokens: StrictBool = True
    add_generation_prompt: StrictBool = True
    chat_template_kwargs: dict[str, Any] | None = None


class DetokenizeRequest(_Request):
    """``POST /detokenize``."""

    model: str | None = None
    tokens: list[StrictInt]
