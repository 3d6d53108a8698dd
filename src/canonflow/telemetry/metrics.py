"""The instruments and the events that record them.

Names follow OpenTelemetry's conventions (``canonflow.<thing>.<measure>``; Prometheus shows
``canonflow_<thing>_<measure>_total`` and so on). Attributes are low-cardinality on purpose:
service, table, processing mode, trigger, outcome — never a tenant, job or chunk id (those
are on the spans and log lines).

The duplicate-processing factor of a table is ``records.read / records.extracted``: 1.0 when
every raw record is canonicalized once (aggregated trigger), above 1 with the legacy per-batch
trigger, which re-reads the lookback window after every batch file.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from opentelemetry import metrics
from opentelemetry.metrics import CallbackOptions, Meter, MeterProvider, Observation

if TYPE_CHECKING:
    from canonflow.model import ChunkResult, TransformRequest, TransformResult
    from canonflow.stores.state import Backlog

SECONDS = [0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900, 3600]
FILES = [1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 5000, 10000]


class _Instruments:
    def __init__(self, meter: Meter) -> None:
        self.meter = meter
        c, h = meter.create_counter, meter.create_histogram
        self.chunks = c("canonflow.chunks", "{chunk}", "chunks run, by outcome")
        self.chunk_duration = h("canonflow.chunk.duration", "s", "one chunk's run",
                                explicit_bucket_boundaries_advisory=SECONDS)
        self.extracted = c("canonflow.records.extracted", "{record}",
                           "records fetched from a source and written to raw batch files")
        self.files_written = c("canonflow.files.written", "{file}", "raw batch files written")
        self.transforms = c("canonflow.transform.invocations", "{invocation}",
                            "canonical transforms that ran (a replay that found its request "
                            "done is a duplicate, not an invocation)")
        self.duplicates = c("canonflow.transform.duplicates", "{delivery}",
                            "transform deliveries skipped because the request was already "
                            "claimed or done (exactly-once at work)")
        self.transform_duration = h("canonflow.transform.duration", "s", "one transform's run",
                                    explicit_bucket_boundaries_advisory=SECONDS)
        self.files_per_transform = h("canonflow.transform.files", "{file}",
                                     "raw files read by one transform",
                                     explicit_bucket_boundaries_advisory=FILES)
        self.read = c("canonflow.records.read", "{record}",
                      "raw records read by transforms (read / extracted is the "
                      "duplicate-processing factor)")
        self.canonical = c("canonflow.records.canonical", "{record}",
                           "records written to canonical tables")
        self.quarantined = c("canonflow.records.quarantined", "{record}",
                             "records quarantined by transforms")
        self.merged = c("canonflow.records.merged", "{record}",
                        "records merged into another of the same key in one transform")
        self.jobs = c("canonflow.jobs", "{job}", "jobs ended, by status and outcome")
        self.job_duration = h("canonflow.job.duration", "s", "a job from plan to its end",
                              explicit_bucket_boundaries_advisory=SECONDS)
        self.job_transforms = h("canonflow.job.transform_invocations", "{invocation}",
                                "transform invocations per job (one per table when "
                                "aggregated)", explicit_bucket_boundaries_advisory=FILES)
        self.http = c("canonflow.http.requests", "{request}",
                      "requests to source APIs, by service and status code")
        self.throttled = c("canonflow.http.throttled", "{response}",
                           "HTTP 429 answers from source APIs, by service")
        self.retries = c("canonflow.retries", "{retry}",
                         "retries, by kind (http, state, commit, lock, chunk) and service")
        self.takeovers = c("canonflow.lease.takeovers", "{takeover}",
                           "work taken over from a process that died or stalled, by kind")


_i = _Instruments(metrics.get_meter("canonflow"))


def use(provider: MeterProvider | None) -> None:
    """Record into ``provider`` (None: the global one, the default)."""
    global _i
    _i = _Instruments((provider or metrics.get_meter_provider()).get_meter("canonflow"))


def _table(service: str, table: str) -> dict[str, str]:
    return {"service": service, "table": table}


def chunk_finished(result: ChunkResult) -> None:
    t = result.table_metadata
    attrs = _table(t.service_name, t.table_name)
    outcome = "completed" if result.completed else "failed"
    _i.chunks.add(1, {**attrs, "outcome": outcome})
    _i.chunk_duration.record(result.processing_time, {**attrs, "outcome": outcome})
    _i.extracted.add(result.records_processed, attrs)
    _i.files_written.add(result.s3_files_count, attrs)


def transform_finished(request: TransformRequest, result: TransformResult) -> None:
    attrs = _table(request.service_name, request.table_name)
    if result.skipped:
        _i.duplicates.add(1, attrs)
        return
    _i.transforms.add(1, {**attrs, "processing_mode": result.processing_mode.value,
                          "trigger": request.trigger, "outcome": "done"})
    _i.transform_duration.record(result.seconds, {**attrs, "outcome": "done"})
    _i.files_per_transform.record(result.files_read, attrs)
    _i.read.add(result.records_read, attrs)
    _i.canonical.add(result.records_written, attrs)
    _i.quarantined.add(result.records_quarantined, attrs)
    _i.merged.add(result.records_merged, attrs)


def transform_failed(request: TransformRequest, seconds: float) -> None:
    attrs = _table(request.service_name, request.table_name)
    _i.transforms.add(1, {**attrs, "processing_mode": request.processing_mode.value,
                          "trigger": request.trigger, "outcome": "failed"})
    _i.transform_duration.record(seconds, {**attrs, "outcome": "failed"})


def job_finished(status: str, outcome: str | None, seconds: float, transforms: int) -> None:
    attrs = {"status": status, "outcome": outcome or "none"}
    _i.jobs.add(1, attrs)
    _i.job_duration.record(seconds, attrs)
    _i.job_transforms.record(transforms, attrs)


def http_response(service: str, status: int | None) -> None:
    """``status`` None: the request never got an answer (timeout, connection error)."""
    _i.http.add(1, {"service": service, "status_code": str(status) if status else "none"})
    if status == 429:
        _i.throttled.add(1, {"service": service})


def retried(kind: str, service: str | None) -> None:
    _i.retries.add(1, {"kind": kind, **({"service": service} if service else {})})


def taken_over(kind: str, count: int = 1) -> None:
    """``kind``: job (an orphaned job's runner), aggregation, transform."""
    if count:
        _i.takeovers.add(count, {"kind": kind})


def watch_backlog(read: Callable[[], Backlog], pipeline: str | None,
                  provider: MeterProvider | None = None) -> None:
    """Observe the outbox backlog (requests waiting for a worker, the oldest one's age) at
    every collection, in this process only (a forked child that inherits the callback
    observes nothing: one series per deployment, not one per pool process)."""
    attrs = {"pipeline": pipeline} if pipeline else {}
    owner = os.getpid()
    meter = provider.get_meter("canonflow") if provider is not None else _i.meter

    def observe(pick: Callable[[Any], float | None]) -> Callable[[CallbackOptions],
                                                                   Iterable[Observation]]:
        def callback(_: CallbackOptions) -> Iterable[Observation]:
            if os.getpid() != owner:
                return []
            try:
                value = pick(read())
            except Exception:  # a collection never breaks on a busy or gone store
                return []
            return [] if value is None else [Observation(value, attrs)]
        return callback

    meter.create_observable_gauge(
        "canonflow.outbox.backlog", [observe(lambda b: b.waiting)], "{request}",
        "transform requests waiting for a worker (pending or dispatched)")
    meter.create_observable_gauge(
        "canonflow.outbox.oldest_age", [observe(lambda b: b.oldest_age if b.waiting else 0.0)],
        "s", "how long the oldest waiting transform request has waited")
