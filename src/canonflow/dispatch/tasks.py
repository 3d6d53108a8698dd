"""The task bodies every dispatcher runs: a chunk (then its completion), or a transform.

Each worker process builds one :class:`Runtime` from the pipeline settings (``init_worker``);
task arguments and return values are plain JSON-compatible payloads.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from opentelemetry.trace import Span
from pydantic import ValidationError

from canonflow import jsonio, log, memory, retry
from canonflow.aggregate import complete_chunk, complete_chunks
from canonflow.chunk import process_chunk
from canonflow.config import Settings
from canonflow.dispatch.base import TaskOutcome
from canonflow.errors import CanonflowError, error_payload
from canonflow.lease import Heartbeat, exit_with
from canonflow.model import ChunkResult, ChunkSpec, TransformRequest
from canonflow.redact import redact
from canonflow.runtime import Runtime
from canonflow.telemetry import metrics, setup, tracing
from canonflow.transform import run_transform

logger = logging.getLogger("canonflow.tasks")
_runtime: Runtime | None = None


def init_worker(settings_json: str, parent: str | None = None,
                logging_as: tuple[int, str] | None = None,
                report_failure: str | None = None) -> None:
    """Build the worker's runtime and open its stores now, while the parent plans; with
    ``parent`` (its holder id), exit when that process is gone; with ``logging_as`` (level,
    format), log as the parent does (structured, redacted, with the task's context) instead
    of Python's bare fallback. With ``report_failure`` (a file path), a worker that cannot
    start writes why there (one redacted line, its type, whether a retry may help) and
    exits, instead of printing a traceback: its parent turns it into one clear error."""
    global _runtime
    try:
        if logging_as is not None:
            log.configure(*logging_as)
        setup.configure()
        if parent is not None:
            exit_with(parent)
        memory.tune()
        _runtime = Runtime(Settings.model_validate_json(settings_json))
        _runtime.warm_up()
    except Exception as exc:
        if report_failure is None:
            raise
        payload = error_payload(exc)
        if isinstance(exc, ValidationError):  # settings a retry cannot fix
            first = exc.errors()[0]
            where = ".".join(str(x) for x in first["loc"]) or "(top level)"
            payload.update(retryable=False,
                           message=f"its settings do not validate: at {where}: {first['msg']}")
        # written whole, then renamed: the parent may look for it at any moment (while the
        # first tasks are submitted) and must never read it half written
        report = Path(report_failure)
        partial = report.with_name(f"{report.name}.{os.getpid()}.partial")
        partial.write_bytes(jsonio.dumps(payload))
        os.replace(partial, report)
        os._exit(3)


def ping() -> bool:
    return True


def run_marked(marks: str, key: str, fn: Callable[[str], TaskOutcome],
               payload: str) -> TaskOutcome:
    """Run a task with a mark naming it in ``marks/PID``: if this worker dies, the mark
    left behind tells which task died with it (the others only waited behind it)."""
    mark = Path(marks) / str(os.getpid())
    mark.write_text(key)
    try:
        return fn(payload)
    finally:
        mark.unlink(missing_ok=True)


def current_runtime() -> Runtime:
    if _runtime is None:
        raise RuntimeError("worker runtime not initialised: call init_worker first")
    return _runtime


def run_chunk(spec_json: str, rt: Runtime | None = None) -> TaskOutcome:
    """Process a chunk, again (bounded, with backoff) while it fails with a retryable
    error, then record its result: a brief S3 or database error does not fail its table."""
    rt = rt or current_runtime()
    spec = ChunkSpec.model_validate_json(spec_json)
    try:
        with _chunk_scope(spec, rt) as span:
            result = _processed(spec, rt, span)
            completion = complete_chunk(rt, result)
    finally:
        setup.flush(every=1.0)
    return {"result": result.model_dump(mode="json"), "new": completion.new,
            "aggregated": completion.claimed}


def specs_json(specs: list[ChunkSpec]) -> str:
    """The payload of :func:`run_chunks`: the specs as one JSON array."""
    return "[" + ",".join(spec.model_dump_json() for spec in specs) + "]"


def run_chunks(payload: str, rt: Runtime | None = None) -> TaskOutcome:
    """Several chunks of one job in one task (its small tables, see
    :func:`canonflow.plan.task_batches`): each processed as :func:`run_chunk` does, then
    their results recorded in one state-store step. The task's fixed costs (its dispatch,
    a state-store transaction) are paid once for them all."""
    rt = rt or current_runtime()
    specs = [ChunkSpec.model_validate(spec) for spec in jsonio.loads(payload)]
    results = []
    try:
        for spec in specs:
            with _chunk_scope(spec, rt) as span:
                results.append(_processed(spec, rt, span))
        with log.bind(pipeline=rt.settings.name, tenant_id=specs[0].table.tenant_id,
                      job_id=specs[0].job_id):
            completions = complete_chunks(rt, results)
    finally:
        setup.flush(every=1.0)
    return {"results": [r.model_dump(mode="json") for r in results],
            "new": [c.new for c in completions],
            "aggregated": any(c.claimed for c in completions)}


@contextmanager
def _chunk_scope(spec: ChunkSpec, rt: Runtime) -> Iterator[Span]:
    """The chunk's log context and its span (a child of its job's)."""
    t = spec.table
    with log.bind(pipeline=rt.settings.name, tenant_id=t.tenant_id, job_id=spec.job_id,
                  chunk_id=spec.chunk_id, service=t.service_name, table=t.table_name), \
            tracing.span("canonflow.chunk", parent=spec.trace_context, job_id=spec.job_id,
                         chunk_id=spec.chunk_id, tenant_id=t.tenant_id,
                         service=t.service_name, table=t.table_name) as span:
        yield span


def _processed(spec: ChunkSpec, rt: Runtime, span: Span) -> ChunkResult:
    """The chunk's result: processed, again while it fails with a retryable error."""
    result = retry.chunk(rt.settings.chunk_attempts)(process_chunk, spec, rt)
    metrics.chunk_finished(result)
    tracing.annotate(span, error=result.error.message if result.error else None,
                     records=result.records_processed, files=result.s3_files_count)
    return result


def run_transform_task(request_json: str, rt: Runtime | None = None) -> TaskOutcome:
    """Run a transform with a heartbeat on its lease. A retryable failure (or any
    unexpected one) gives the request back to the outbox until its attempts run out; then
    it fails, visibly, and its job settles."""
    rt = rt or current_runtime()
    request = TransformRequest.model_validate_json(request_json)
    try:
        return _transform(request, rt)
    finally:
        setup.flush(every=1.0)


def _transform(request: TransformRequest, rt: Runtime) -> TaskOutcome:
    lease = rt.settings.transform_lease_seconds
    started = time.perf_counter()
    try:
        with log.bind(pipeline=rt.settings.name, tenant_id=request.tenant_id,
                      job_id=request.job_id, request_id=request.request_id,
                      service=request.service_name, table=request.table_name), \
                tracing.span("canonflow.transform", parent=request.trace_context,
                             job_id=request.job_id, request_id=request.request_id,
                             tenant_id=request.tenant_id, service=request.service_name,
                             table=request.table_name, trigger=request.trigger,
                             processing_mode=request.processing_mode.value) as span, \
                Heartbeat(lease / 4, lambda: rt.state.touch_request(request.request_id,
                                                                    rt.holder),
                          request.request_id):
            result = run_transform(request, rt)
            metrics.transform_finished(request, result)
            tracing.annotate(span, skipped=result.skipped, files_read=result.files_read,
                             records_read=result.records_read,
                             records_canonical=result.records_written,
                             records_quarantined=result.records_quarantined)
    except Exception as exc:
        metrics.transform_failed(request, time.perf_counter() - started)
        retryable = exc.retryable if isinstance(exc, CanonflowError) else True
        message = redact(str(exc) if isinstance(exc, CanonflowError)
                         else f"{type(exc).__name__}: {exc}")
        again = retryable and rt.state.retry_later(
            request.request_id, message, rt.settings.transform_max_attempts, holder=rt.holder)
        if not isinstance(exc, CanonflowError):
            logger.exception("transform failed unexpectedly", extra={
                "request_id": request.request_id, "will_retry": again})
        else:
            logger.error("transform failed", extra={"request_id": request.request_id,
                                                 "error": message, "will_retry": again})
        return {"request_id": request.request_id, "error": message, "retryable": retryable,
                "will_retry": again}
    return {"request_id": request.request_id, "result": result.model_dump(mode="json")}
