"""OpenTelemetry tracing across router -> prefill -> decode, configured by the standard ``OTEL_*`` variables.

Off by default: spans are recorded only when ``OTEL_TRACES_EXPORTER`` names an exporter (``otlp`` or ``console``)
or an OTLP endpoint is set (``OTEL_EXPORTER_OTLP_ENDPOINT`` / ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``), and not
with ``OTEL_SDK_DISABLED=true``. The service name is ``OTEL_SERVICE_NAME`` (else the default given here);
sampling follows ``OTEL_TRACES_SAMPLER``. Otherwise the OpenTelemetry API's no-op tracer costs next to nothing.

Every hop carries W3C ``traceparent``: the router injects it into each upstream request, engines continue the
trace from it (``TracingMiddleware``), and the decode hop's ``kv_transfer_params`` carry it too, so the KV
transfer (run on the connector's threads, outside any request context) is a span of its own in the same trace.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.propagate import extract, inject
from opentelemetry.trace import SpanKind, Status, StatusCode

logger = logging.getLogger(__name__)

TRACEPARENT = "traceparent"


def tracing_requested(env: dict[str, str] | os._Environ = os.environ) -> bool:
    """Whether the standard variables ask for traces."""
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    exporter = env.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if exporter:
        return exporter != "none"
    return bool(env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))


def setup_tracing(default_service_name: str) -> bool:
    """Install the SDK's tracer provider for this process when the environment asks for traces (once; later
    calls are no-ops). Returns whether traces are recorded."""
    if not tracing_requested():
        return False
    if getattr(trace.get_tracer_provider(), "_tandem", False):
        return True
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

    name = os.environ.get("OTEL_SERVICE_NAME") or default_service_name
    provider = TracerProvider(resource=Resource.create({"service.name": name}))
    exporter_name = os.environ.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower() or "otlp"
    if exporter_name == "console":
        exporter: Any = ConsoleSpanExporter()
    elif exporter_name == "otlp":
        protocol = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
        if protocol not in (None, "", "http/protobuf"):
            raise ValueError(f"OTEL_EXPORTER_OTLP_PROTOCOL: only http/protobuf is supported, got {protocol!r}")
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        exporter = OTLPSpanExporter()  # endpoint, headers and timeout from the OTEL_EXPORTER_OTLP_* variables
    else:
        raise ValueError(f"OTEL_TRACES_EXPORTER: expected otlp, console or none, got {exporter_name!r}")
    provider.add_span_processor(BatchSpanProcessor(exporter))
    provider._tandem = True  # type: ignore[attr-defined]  # (marks our provider: set up once per process)
    trace.set_tracer_provider(provider)
    logger.info("tracing: exporting spans of %s with %s", name, exporter_name)
    return True


def shutdown_tracing() -> None:
    """Flush and stop the exporter (at process exit)."""
    provider = trace.get_tracer_provider()
    if getattr(provider, "_tandem", False):
        provider.shutdown()


def tracer(name: str) -> trace.Tracer:
    return trace.get_tracer(name)


def inject_headers(headers: dict[str, str]) -> dict[str, str]:
    """``headers`` plus the current span's ``traceparent`` (unchanged when no span is recording)."""
    inject(headers)
    return headers


def current_traceparent() -> str | None:
    carrier: dict[str, str] = {}
    inject(carrier)
    return carrier.get(TRACEPARENT)


@contextlib.contextmanager
def span_from_traceparent(tracer_: trace.Tracer, name: str, traceparent: str | None,
                          kind: SpanKind = SpanKind.INTERNAL, **attributes: Any) -> Iterator[trace.Span]:
    """A span whose parent is given as a W3C ``traceparent`` (work on a thread of its own, like a KV transfer)."""
    parent = extract({TRACEPARENT: traceparent}) if traceparent else otel_context.Context()
    with tracer_.start_as_current_span(name, context=parent, kind=kind, attributes=attributes) as span:
        yield span


def mark_error(span: trace.Span, message: str) -> None:
    span.set_status(Status(StatusCode.ERROR, message))


class TracingMiddleware:
    """ASGI middleware for an engine's server: each POST continues the caller's trace (its ``traceparent``) in a
    server span covering the whole response, streams included."""

    def __init__(self, app: Any, role: str) -> None:
        self.app = app
        self.role = role
        self._tracer = tracer("tandem.engine")

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        carrier = {name.decode("latin-1"): value.decode("latin-1") for name, value in scope["headers"]
                   if name in (b"traceparent", b"tracestate")}
        status: dict[str, int] = {}

        async def send_status(message: dict) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        with self._tracer.start_as_current_span(f"{self.role} {scope['path']}", context=extract(carrier),
                                                kind=SpanKind.SERVER,
                                                attributes={"http.route": scope["path"], "tandem.role": self.role}) as span:
            await self.app(scope, receive, send_status)
            span.set_attribute("http.status_code", status.get("code", 0))
            if status.get("code", 0) >= 500:
                mark_error(span, f"status {status['code']}")
