"""One streamed request to an OpenAI-compatible server, timed chunk by chunk.

Only the public OpenAI API is used: ``POST /v1/completions`` or ``POST /v1/chat/completions`` with
``stream: true`` and ``stream_options: {"include_usage": true}``. The server-sent events are parsed
by hand (httpx streaming) so each chunk is timestamped the moment it arrives.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

import httpx

from tandem.bench.config import BenchConfig
from tandem.bench.datasets import SampledRequest

# How much of an error body is kept in the record (enough for the server's message).
ERROR_BODY_CHARS = 300


@dataclass(slots=True)
class RequestRecord:
    """What happened to one request. Times are seconds; ``start_s`` is since the benchmark start.

    ``ttft_s`` is the time to the first chunk carrying content; ``itl_s`` holds the gaps between
    consecutive content chunks; ``e2e_s`` runs to ``[DONE]`` (or the end of the body, or the
    failure). ``prompt_tokens`` and ``output_tokens`` come from the server's ``usage`` when
    ``usage_reported``; otherwise they are estimates (the dataset's prompt length and the number of
    content chunks).
    """

    index: int
    expected_prompt_len: int
    max_tokens: int
    group: str | None = None
    start_s: float = 0.0
    success: bool = False
    error: str | None = None
    status_code: int | None = None
    ttft_s: float | None = None
    itl_s: list[float] = field(default_factory=list)
    e2e_s: float | None = None
    prompt_tokens: int = 0
    output_tokens: int = 0
    usage_reported: bool = False
    num_content_chunks: int = 0
    output_chars: int = 0
    finish_reason: str | None = None

    @property
    def tpot_s(self) -> float | None:
        """Time per output token after the first: ``(e2e - ttft) / (output_tokens - 1)``."""
        if not self.success or self.ttft_s is None or self.e2e_s is None or self.output_tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1)

    def chunk_times_s(self) -> list[float]:
        """Arrival time of every content chunk, in seconds since the benchmark start."""
        if self.ttft_s is None:
            return []
        times = [self.start_s + self.ttft_s]
        for gap in self.itl_s:
            times.append(times[-1] + gap)
        return times


def endpoint_url(base_url: str, endpoint: str) -> str:
    """The request URL; ``base_url`` may or may not already end in ``/v1`` (the openai client's form)."""
    path = "/chat/completions" if endpoint == "chat" else "/completions"
    return f"{base_url}{path}" if base_url.endswith("/v1") else f"{base_url}/v1{path}"


def request_body(config: BenchConfig, sample: SampledRequest) -> dict:
    """The JSON body for ``sample``: streamed, with usage in the last chunk."""
    body: dict = {
        "model": config.model,
        "max_tokens": sample.output_len,
        "temperature": config.temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if config.endpoint == "chat":
        body["messages"] = sample.chat_messages()
    else:
        body["prompt"] = sample.completion_prompt()
    if config.ignore_eos:
        # A vLLM extension (not in OpenAI's API): only sent when asked for.
        body["ignore_eos"] = True
    return body


def _chunk_text(chunk: dict, endpoint: str) -> tuple[str, str | None]:
    """Content text and finish reason of one streamed chunk (empty text when it carries none)."""
    text = ""
    finish_reason = None
    for choice in chunk.get("choices") or []:
        if endpoint == "chat":
            text += (choice.get("delta") or {}).get("content") or ""
        else:
            text += choice.get("text") or ""
        finish_reason = choice.get("finish_reason") or finish_reason
    return text, finish_reason


async def send_request(
    client: httpx.AsyncClient,
    config: BenchConfig,
    sample: SampledRequest,
    index: int,
    bench_start: float,
) -> RequestRecord:
    """Send ``sample`` once, streaming, and time it. Never raises for server or network failures:
    they end up in ``RequestRecord.error``. ``bench_start`` is a ``time.perf_counter()`` value."""
    record = RequestRecord(
        index=index, expected_prompt_len=sample.expected_prompt_len, max_tokens=sample.output_len, group=sample.group
    )
    headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}
    url = endpoint_url(config.base_url, config.endpoint)
    body = request_body(config, sample)
    start = time.perf_counter()
    record.start_s = start - bench_start
    last_content: float | None = None
    stream_end: float | None = None
    try:
        async with client.stream("POST", url, json=body, headers=headers) as response:
            record.status_code = response.status_code
            if response.status_code != 200:
                text = (await response.aread()).decode("utf-8", "replace")
                record.error = f"HTTP {response.status_code}: {text[:ERROR_BODY_CHARS]}"
                return record
            async for line in response.aiter_lines():
                now = time.perf_counter()
                if not line.startswith("data:") or stream_end is not None:
                    # Blank separators, SSE comments, event names; after [DONE] the body is read to
                    # its end anyway so the connection goes back to the pool.
                    continue
                payload = line[len("data:") :].strip()
                if payload == "[DONE]":
                    stream_end = now
                    continue
                chunk = json.loads(payload)
                if "error" in chunk:
                    # Servers report failures after the 200 header as an error event in the stream.
                    record.error = f"stream error: {json.dumps(chunk['error'])[:ERROR_BODY_CHARS]}"
                    return record
                text, finish_reason = _chunk_text(chunk, config.endpoint)
                record.finish_reason = finish_reason or record.finish_reason
                if text:
                    if last_content is None:
                        record.ttft_s = now - start
                    else:
                        record.itl_s.append(now - last_content)
                    last_content = now
                    record.num_content_chunks += 1
                    record.output_chars += len(text)
                usage = chunk.get("usage")
                if usage:
                    record.prompt_tokens = int(usage.get("prompt_tokens") or 0)
                    record.output_tokens = int(usage.get("completion_tokens") or 0)
                    record.usage_reported = True
    except (httpx.HTTPError, httpx.StreamError, ValueError, TypeError, AttributeError) as exc:
        # ValueError covers bad JSON; TypeError/AttributeError a chunk that is not an object.
        record.error = f"{type(exc).__name__}: {exc}"[:ERROR_BODY_CHARS]
        return record
    finally:
        # E2E ends at [DONE] (or at the end of the body for servers that send none); failures get
        # the time to the failure too, so the in-flight plot sees every request.
        record.e2e_s = (stream_end if stream_end is not None else time.perf_counter()) - start
    if not record.usage_reported:
        # Flagged in the summary; these estimates keep throughput meaningful for servers without usage.
        record.prompt_tokens = sample.expected_prompt_len
        record.output_tokens = record.num_content_chunks
    record.success = True
    return record
