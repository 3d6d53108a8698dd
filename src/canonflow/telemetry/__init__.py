"""Metrics and traces through OpenTelemetry.

The core depends on the OpenTelemetry *API* only: until an SDK is configured every
instrument and span is a no-op, so telemetry costs nothing where nobody reads it. The
``otel`` extra brings the SDK, the OTLP exporter and the Prometheus endpoint of
``canonflow worker --metrics-port`` (see :mod:`canonflow.telemetry.setup`).

- :mod:`~canonflow.telemetry.metrics`: the instruments and what records them.
- :mod:`~canonflow.telemetry.tracing`: spans per job, chunk, aggregation and transform, and
  the trace context that travels inside chunk specs and transform requests, so one job is
  one trace whichever dispatcher carries its tasks.
"""
