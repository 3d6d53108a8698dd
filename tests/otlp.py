"""An OTLP/HTTP receiver on 127.0.0.1 that keeps what it is sent in memory: the spans and
the latest cumulative metric points of every process that exports to it."""

from __future__ import annotations

import gzip
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
    ExportMetricsServiceResponse,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue


def _value(v: AnyValue) -> Any:
    return getattr(v, v.WhichOneof("value")) if v.WhichOneof("value") else None


def _attrs(kvs: Any) -> dict[str, Any]:
    return {kv.key: _value(kv.value) for kv in kvs}


@dataclass
class Span:
    trace_id: str
    span_id: str
    parent_id: str
    name: str
    attributes: dict[str, Any]
    pid: int
    error: bool


@dataclass
class Received:
    spans: list[Span] = field(default_factory=list)
    bodies: list[bytes] = field(default_factory=list)  # every export as it arrived
    # (pid, metric, sorted attributes) -> (time, value): cumulative, the latest wins
    points: dict[tuple[int, str, tuple[tuple[str, Any], ...]], tuple[int, float]] = field(
        default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def total(self, metric: str, **attrs: str) -> float:
        with self.lock:
            return sum(v for (_, name, a), (_, v) in self.points.items() if name == metric
                       and all(dict(a).get(k) == want for k, want in attrs.items()))

    def add_traces(self, body: bytes) -> None:
        req = ExportTraceServiceRequest.FromString(body)
        with self.lock:
            for rs in req.resource_spans:
                pid = int(_attrs(rs.resource.attributes).get("process.pid", 0))
                for ss in rs.scope_spans:
                    for s in ss.spans:
                        self.spans.append(Span(
                            s.trace_id.hex(), s.span_id.hex(), s.parent_span_id.hex(), s.name,
                            _attrs(s.attributes), pid, s.status.code == 2))

    def add_metrics(self, body: bytes) -> None:
        req = ExportMetricsServiceRequest.FromString(body)
        with self.lock:
            for rm in req.resource_metrics:
                pid = int(_attrs(rm.resource.attributes).get("process.pid", 0))
                for sm in rm.scope_metrics:
                    for m in sm.metrics:
                        kind = m.WhichOneof("data")
                        for p in getattr(m, kind).data_points:
                            value = (p.count if kind == "histogram" else
                                     p.as_int if p.WhichOneof("value") == "as_int"
                                     else p.as_double)
                            key = (pid, m.name, tuple(sorted(_attrs(p.attributes).items())))
                            if key not in self.points or self.points[key][0] <= p.time_unix_nano:
                                self.points[key] = (p.time_unix_nano, float(value))


@contextmanager
def receiver() -> Iterator[tuple[str, Received]]:
    """Serve OTLP/HTTP (protobuf) on a free port; the endpoint and what arrives."""
    received = Received()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            if self.headers.get("Content-Encoding") == "gzip":
                body = gzip.decompress(body)
            with received.lock:
                received.bodies.append(body)
            if self.path == "/v1/traces":
                received.add_traces(body)
                answer = ExportTraceServiceResponse().SerializeToString()
            elif self.path == "/v1/metrics":
                received.add_metrics(body)
                answer = ExportMetricsServiceResponse().SerializeToString()
            else:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        def log_message(self, *_: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}", received
    finally:
        server.shutdown()
        server.server_close()
