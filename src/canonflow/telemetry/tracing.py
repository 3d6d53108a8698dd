"""Spans for a job, its chunks, its aggregation and its transforms: one trace per job.

The context travels inside the contracts (``ChunkSpec.trace_context``,
``TransformRequest.trace_context``: W3C ``traceparent``/``tracestate``), so it crosses every
dispatcher (a process pool, a Celery broker, a queue) and survives in the state store: a chunk
run again by a runner that adopted an orphaned job still joins the job's trace.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.trace import Span, Status, StatusCode, Tracer

from canonflow.redact import redact

_tracer: Tracer = trace.get_tracer("canonflow")


def use(provider: trace.TracerProvider | None) -> None:
    """Take spans from ``provider`` (None: the global one, the default)."""
    global _tracer
    _tracer = (provider or trace.get_tracer_provider()).get_tracer("canonflow")


def carrier(span: Span | None = None) -> dict[str, str]:
    """The current context (or ``span``'s) as W3C headers; empty when nothing is traced."""
    ctx = trace.set_span_in_context(span) if span is not None else None
    headers: dict[str, str] = {}
    propagate.inject(headers, context=ctx)
    return headers


def _attributes(fields: Mapping[str, Any]) -> dict[str, Any]:
    return {f"canonflow.{k}": v for k, v in fields.items()
            if v is not None and isinstance(v, str | bool | int | float)}


def start(name: str, parent: Mapping[str, str] | None = None, **fields: Any) -> Span:
    """A span that outlives a block (a job's): end it with :func:`finish`."""
    ctx = propagate.extract(parent) if parent else None
    return _tracer.start_span(name, context=ctx, attributes=_attributes(fields))


def finish(span: Span, error: str | None = None, **fields: Any) -> None:
    span.set_attributes(_attributes(fields))
    if error is not None:
        span.set_status(Status(StatusCode.ERROR, redact(error)))
    span.end()


@contextmanager
def current(span: Span) -> Iterator[Span]:
    """Make ``span`` the current one inside the block without ending it."""
    token = otel_context.attach(trace.set_span_in_context(span))
    try:
        yield span
    finally:
        otel_context.detach(token)


@contextmanager
def span(name: str, parent: Mapping[str, str] | None = None, **fields: Any) -> Iterator[Span]:
    """A span around a block, child of ``parent`` (a carrier) or of the current span; an
    exception marks it failed, with its redacted message (and still propagates)."""
    ctx = propagate.extract(parent) if parent else None
    with _tracer.start_as_current_span(name, context=ctx, attributes=_attributes(fields),
                                       record_exception=False,
                                       set_status_on_exception=False) as s:
        try:
            yield s
        except BaseException as exc:
            s.set_status(Status(StatusCode.ERROR, redact(f"{type(exc).__name__}: {exc}")))
            raise


def annotate(span: Span, error: str | None = None, **fields: Any) -> None:
    """Add what a block learned (counts, outcome) to its span; ``error`` marks it failed."""
    if span.is_recording():
        span.set_attributes(_attributes(fields))
        if error is not None:
            span.set_status(Status(StatusCode.ERROR, redact(error)))


def ids() -> tuple[str, str] | None:
    """The current (trace id, span id) in hex, for log lines; None outside a span."""
    ctx = trace.get_current_span().get_span_context()
    if not ctx.is_valid:
        return None
    return format(ctx.trace_id, "032x"), format(ctx.span_id, "016x")
