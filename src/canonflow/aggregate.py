"""The result aggregator: record chunk results; the last one claims the job and requests
exactly one canonical transform per table, with that table's explicit file list."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from canonflow import jsonio
from canonflow.model import (
    ChunkResult,
    ChunkSpec,
    JobOutcome,
    TableRef,
    TransformRequest,
    TriggerMode,
    aggregated_request_id,
)
from canonflow.stores.state import Completion
from canonflow.telemetry import tracing
from canonflow.transform.request import manifest_prefix

if TYPE_CHECKING:
    from canonflow.runtime import Runtime

log = logging.getLogger("canonflow.aggregate")


@dataclass
class TableOutcome:
    table: TableRef
    chunks: int = 0
    chunks_failed: int = 0
    records_extracted: int = 0
    files: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    chunk_seconds: float = 0.0  # the chunks' own processing time, summed
    announced_total: int | None = None  # what the source said it holds, when it said
    full_extraction: bool = True  # every chunk's query listed the whole table

    @property
    def incomplete(self) -> bool:
        """Every chunk succeeded, yet fewer records came than the source announced."""
        return (self.chunks_failed == 0 and self.announced_total is not None
                and self.records_extracted < self.announced_total)

    @property
    def ok(self) -> bool:
        return self.chunks_failed == 0 and not self.incomplete


def _announced(specs: Sequence[ChunkSpec], results: dict[str, ChunkResult]) -> int | None:
    """A table's announced total: the one its plan read (page ranges), else the sum of what
    each chunk's own query announced when every chunk reported one; None when unknown."""
    planned = [s.announced_total for s in specs if s.announced_total is not None]
    if planned:
        return max(planned)
    own = [r.announced_total if (r := results.get(s.chunk_id)) else None for s in specs]
    if own and all(n is not None for n in own):
        return sum(n for n in own if n is not None)
    return None


def table_outcomes(specs: Sequence[ChunkSpec],
                   results: Sequence[ChunkResult]) -> dict[TableRef, TableOutcome]:
    """Per table: how its chunks ended, which files they wrote (a missing result is a
    failed chunk), and whether what was extracted falls short of what the source announced
    (invariant 8: such a table is incomplete, never completed)."""
    by_chunk = {r.chunk_id: r for r in results}
    tables: dict[TableRef, TableOutcome] = {}
    per_table: dict[TableRef, list[ChunkSpec]] = {}
    for spec in specs:
        t = tables.setdefault(spec.table, TableOutcome(spec.table))
        per_table.setdefault(spec.table, []).append(spec)
        t.chunks += 1
        t.full_extraction = t.full_extraction and spec.full_extraction
        result = by_chunk.get(spec.chunk_id)
        if result is None or not result.completed:
            t.chunks_failed += 1
            t.errors.append(result.error.message if result and result.error else "no result")
        if result is not None:
            t.records_extracted += result.records_processed
            t.chunk_seconds += result.processing_time
            t.files.extend(result.s3_files_written)
    for ref, t in tables.items():
        t.announced_total = _announced(per_table[ref], by_chunk)
        if t.incomplete:
            t.errors.append(f"incomplete: the source announced {t.announced_total} records, "
                            f"{t.records_extracted} were extracted")
    return tables


def job_outcome(tables: dict[TableRef, TableOutcome]) -> JobOutcome:
    if all(t.ok for t in tables.values()):
        return JobOutcome.COMPLETED
    if any(t.ok for t in tables.values()):
        return JobOutcome.PARTIAL_SUCCESS
    return JobOutcome.FAILED


def transform_requests(rt: Runtime, job_id: str,
                       tables: dict[TableRef, TableOutcome]) -> list[TransformRequest]:
    """One file-specific request per fully successful table that wrote files; lists longer
    than ``max_inline_files`` travel as a manifest object (claim check)."""
    requests = []
    for ref, t in tables.items():
        if not t.ok or not t.files:
            continue
        files = sorted(set(t.files))
        common: dict[str, Any] = dict(
            tenant_id=ref.tenant_id, service_name=ref.service_name, table_name=ref.table_name,
            job_id=job_id, request_id=aggregated_request_id(job_id, ref), trigger="aggregated",
            # a complete full refresh: keys the source no longer lists are deleted (only
            # here, where every chunk succeeded and nothing came up short)
            reconcile=t.full_extraction,
            trace_context=tracing.carrier() or None,  # the aggregation's span
        )
        if len(files) > rt.settings.max_inline_files:
            key = f"{manifest_prefix(ref)}{job_id}.json"
            rt.objects.put(key, jsonio.dumps(files))
            requests.append(TransformRequest(**common, source_files_manifest=key))
        else:
            requests.append(TransformRequest(**common, source_files=files))
    return requests


def aggregate_job(rt: Runtime, job_id: str) -> list[TransformRequest]:
    """Run by the one completer whose claim succeeded (or the sweeper that reclaimed)."""
    state = rt.state
    job = state.job(job_id)
    if job is None:
        return []
    specs = state.chunk_specs(job_id)
    # a child of the job's span (not of the last chunk's): the fan-in of all its chunks
    with tracing.span("canonflow.aggregate", parent=specs[0].trace_context if specs else None,
                      job_id=job_id, tenant_id=job.tenant_id, chunks=len(specs)) as span:
        tables = table_outcomes(specs, state.chunk_results(job_id))
        outcome = job_outcome(tables)
        requests: list[TransformRequest] = []
        if job.trigger_mode == TriggerMode.AGGREGATED.value:
            requests = transform_requests(rt, job_id, tables)
        report = {"tables": {ref.label: {
            "tenant_id": ref.tenant_id, "service_name": ref.service_name,
            "table_name": ref.table_name, "chunks": t.chunks, "chunks_failed": t.chunks_failed,
            "records_extracted": t.records_extracted, "files_written": len(set(t.files)),
            "transformed": t.ok and bool(t.files), "errors": t.errors[:5],
            "chunk_seconds": round(t.chunk_seconds, 3),
        } for ref, t in tables.items()}, "aggregated_at": round(time.time(), 3)}
        state.finish_aggregation(job_id, outcome.value, requests, report)
        tracing.annotate(span, outcome=outcome.value, transforms_requested=len(requests))
        log.info("job aggregated", extra={
            "job_id": job_id, "outcome": outcome.value,
            "transforms_requested": [r.request_id for r in requests],
            "not_transformed": [ref.label for ref, t in tables.items() if not t.ok],
        })
    return requests


def complete_chunk(rt: Runtime, result: ChunkResult) -> Completion:
    """Record one chunk result; if it was the job's last, aggregate (exactly once)."""
    completion = rt.state.complete_chunk(result)
    if completion.claimed:
        aggregate_job(rt, result.job_id)
    return completion


def complete_chunks(rt: Runtime, results: Sequence[ChunkResult]) -> list[Completion]:
    """Record the results of the chunks one task ran, in one step; aggregate each job whose
    last chunk was among them (exactly once)."""
    completions = rt.state.complete_chunks(results)
    for result, completion in zip(results, completions, strict=True):
        if completion.claimed:
            aggregate_job(rt, result.job_id)
    return completions
