"""Turning telemetry on: the OpenTelemetry SDK, configured from the environment.

- ``OTEL_EXPORTER_OTLP_ENDPOINT`` (or ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` /
  ``..._METRICS_ENDPOINT``): spans and metrics go there over OTLP/HTTP (the exporter reads its
  headers, timeouts and certificates from the standard ``OTEL_EXPORTER_OTLP_*`` variables).
  ``OTEL_SERVICE_NAME`` and ``OTEL_RESOURCE_ATTRIBUTES`` name the process as usual;
  ``OTEL_SDK_DISABLED=true`` turns everything off.
- ``CANONFLOW_METRICS_DIR``: set by ``canonflow worker --metrics-port`` for its pool
  processes, whose metrics its Prometheus endpoint serves (:mod:`.prometheus`).

Every process canonflow starts calls :func:`configure` (the CLI, local pool workers, Celery
pool processes). A pool process ends without running exit handlers, so it exports at its
end through a multiprocessing finalizer, and after a task (:func:`flush`) once a second at
most: what it measured is never lost with it, and a run of many small tasks does not wait
on an export after each one.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from typing import Any

log = logging.getLogger("canonflow.telemetry")
METRICS_DIR = "CANONFLOW_METRICS_DIR"
_ENDPOINTS = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
              "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT")
_providers: list[Any] = []  # what configure installed in this process, for flush()
_configured_pid: int | None = None
_last_flush = 0.0


def wanted() -> bool:
    """Does the environment ask for telemetry?"""
    if os.environ.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return False
    return any(os.environ.get(v) for v in (*_ENDPOINTS, METRICS_DIR))


def resource() -> Any:
    from opentelemetry.sdk.resources import Resource

    return Resource.create({
        "service.name": os.environ.get("OTEL_SERVICE_NAME", "canonflow"),
        "host.name": socket.gethostname(), "process.pid": os.getpid()})


def configure() -> bool:
    """Install the SDK as this process's global provider when the environment asks for
    it (once per process); False when telemetry stays off."""
    global _configured_pid
    if _configured_pid == os.getpid() or not wanted():
        return _configured_pid == os.getpid()
    try:
        from opentelemetry import metrics, trace
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import MetricReader, PeriodicExportingMetricReader
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ModuleNotFoundError:
        log.warning("telemetry is configured in the environment but the OpenTelemetry SDK "
                    "is missing: pip install 'canonflow[otel]'")
        return False
    _configured_pid = os.getpid()
    res = resource()
    readers: list[MetricReader] = []
    otlp = any(os.environ.get(v) for v in _ENDPOINTS)
    if otlp:
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        readers.append(PeriodicExportingMetricReader(OTLPMetricExporter()))
        tracer_provider = TracerProvider(resource=res)
        tracer_provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        trace.set_tracer_provider(tracer_provider)
        _providers.append(tracer_provider)
    if directory := os.environ.get(METRICS_DIR):
        from canonflow.telemetry.prometheus import SnapshotExporter

        readers.append(PeriodicExportingMetricReader(SnapshotExporter(directory),
                                                     export_interval_millis=5000))
    meter_provider = MeterProvider(resource=res, metric_readers=readers)
    metrics.set_meter_provider(meter_provider)
    _providers.append(meter_provider)
    from multiprocessing import util

    util.Finalize(None, flush, exitpriority=10)  # a pool process's end (atexit does not run)
    log.debug("telemetry on", extra={"otlp": otlp, "metrics_dir": bool(os.environ.get(
        METRICS_DIR))})
    return True


def enabled() -> bool:
    """Did :func:`configure` turn telemetry on in this process?"""
    return _configured_pid == os.getpid()


def flush(timeout_millis: int = 5000, every: float = 0.0) -> None:
    """Export what this process has measured and traced so far (no-op when off); with
    ``every``, only if the last export is at least that many seconds old."""
    global _last_flush
    if _configured_pid != os.getpid():
        return
    now = time.monotonic()
    if every and now - _last_flush < every:
        return
    _last_flush = now
    for provider in _providers:
        try:
            provider.force_flush(timeout_millis)
        except Exception as exc:  # telemetry never fails the work it measures
            log.warning("telemetry export failed", extra={"error": f"{type(exc).__name__}"})
