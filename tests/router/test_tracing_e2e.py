"""Tracing: one disaggregated request is one trace across a client (the SDK's in-memory exporter, in this process),
the router, the prefill worker, the decode worker and its KV transfer (real processes exporting OTLP/HTTP, as the
standard OTEL_* variables tell them, to a collector this test runs)."""

from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
from opentelemetry.propagate import inject
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import set_span_in_context

from .peers import free_port
from .test_e2e import MODEL, Proc, stop_all
from .test_migration_e2e import ENGINE_ARGS

pytestmark = pytest.mark.slow


class Collector:
    """An OTLP/HTTP trace receiver: every span as (service, name, trace id, span id, parent span id)."""

    def __init__(self) -> None:
        self.spans: list[tuple[str, str, str, str, str]] = []
        lock = threading.Lock()
        spans = self.spans

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_POST(self) -> None:
                request = ExportTraceServiceRequest()
                request.ParseFromString(self.rfile.read(int(self.headers["content-length"])))
                with lock:
                    for resource_spans in request.resource_spans:
                        service = next(a.value.string_value for a in resource_spans.resource.attributes
                                       if a.key == "service.name")
                        for scope_spans in resource_spans.scope_spans:
                            for span in scope_spans.spans:
                                spans.append((service, span.name, span.trace_id.hex(), span.span_id.hex(),
                                              span.parent_span_id.hex()))
                self.send_response(200)
                self.send_header("content-type", "application/x-protobuf")
                self.send_header("content-length", "0")
                self.end_headers()

        self.port = free_port()
        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def env(self, service: str) -> dict[str, str]:
        return {"OTEL_SERVICE_NAME": service, "OTEL_TRACES_EXPORTER": "otlp",
                "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": f"http://127.0.0.1:{self.port}/v1/traces",
                "OTEL_BSP_SCHEDULE_DELAY": "100"}


def test_a_disaggregated_request_is_one_trace_across_router_prefill_decode_and_the_kv_transfer(tmp_path):
    collector = Collector()
    procs: list[Proc] = []
    try:
        urls = {}
        for role in ("prefill", "decode"):
            port = free_port()
            urls[role] = f"http://127.0.0.1:{port}"
            procs.append(Proc([role, "--host", "127.0.0.1", "--port", str(port), "--advertise-url", urls[role],
                               *ENGINE_ARGS, "--kv-port", str(free_port())], tmp_path / f"{role}.log",
                              env=collector.env(f"test-{role}")).start())
        for proc, url in zip(procs, urls.values()):
            proc.wait_healthy(url)
        port = free_port()
        router_url = f"http://127.0.0.1:{port}"
        procs.append(Proc(["router", "--port", str(port), "--model", MODEL, "--prefill", urls["prefill"],
                           "--decode", urls["decode"], "--disagg-threshold", "16", "--health-interval", "0.5"],
                          tmp_path / "router.log", env=collector.env("test-router")).start())
        procs[-1].wait_healthy(router_url, 60)

        # The client's own span, in this process's in-memory exporter; its traceparent goes with the request.
        exporter = InMemorySpanExporter()
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(exporter))
        with provider.get_tracer("test-client").start_as_current_span("client request") as client_span:
            headers: dict[str, str] = {}
            inject(headers, context=set_span_in_context(client_span))
            reply = httpx.post(router_url + "/v1/completions", headers=headers, timeout=120, json={
                "model": MODEL, "prompt": "A long story about a fox who lived in a forest near a river. " * 4,
                "max_tokens": 4, "temperature": 0})
        assert reply.status_code == 200, reply.text
        (client,) = exporter.get_finished_spans()
        trace_id = format(client.context.trace_id, "032x")

        wanted = {("test-router", "router /v1/completions"), ("test-router", "router prefill"),
                  ("test-router", "router decode"), ("test-prefill", "prefill /v1/completions"),
                  ("test-decode", "decode /v1/completions"), ("test-decode", "kv_transfer")}
        deadline = time.monotonic() + 30
        while not wanted <= {(s[0], s[1]) for s in collector.spans if s[2] == trace_id}:
            assert time.monotonic() < deadline, (wanted, collector.spans)
            time.sleep(0.2)
        spans = {(s[0], s[1]): s for s in collector.spans if s[2] == trace_id}
        span_id = {key: s[3] for key, s in spans.items()}
        parent = {key: s[4] for key, s in spans.items()}
        # One tree: client -> router -> (prefill hop -> prefill server), (decode hop -> decode server), KV transfer.
        assert parent[("test-router", "router /v1/completions")] == format(client.context.span_id, "016x")
        root = span_id[("test-router", "router /v1/completions")]
        assert parent[("test-router", "router prefill")] == root
        assert parent[("test-router", "router decode")] == root
        assert parent[("test-prefill", "prefill /v1/completions")] == span_id[("test-router", "router prefill")]
        assert parent[("test-decode", "decode /v1/completions")] == span_id[("test-router", "router decode")]
        assert parent[("test-decode", "kv_transfer")] == root
    finally:
        stop_all(procs)
        collector.server.shutdown()
