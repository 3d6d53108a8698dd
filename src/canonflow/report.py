"""Job reports: one JSON-compatible document per job, built from the state store."""

from __future__ import annotations

from collections import defaultdict
from datetime import UTC, datetime
from typing import Any

from canonflow.lease import event_driven, runner_alive
from canonflow.model import TERMINAL, ChunkResult, TriggerMode
from canonflow.stores.state import JobRecord, RequestRecord, StateStore


def _table_row(**counts: Any) -> dict[str, Any]:
    row: dict[str, Any] = {
        "chunks": 0, "chunks_failed": 0, "records_extracted": 0, "files_written": 0,
        "transforms_triggered": 0, "files_read": 0, "records_read": 0,
        "records_canonical": 0, "records_quarantined": 0, "records_merged": 0,
        "child_rows_written": 0, "child_rows_rejected": 0, "errors": [],
        "chunk_seconds": 0.0, "transform_seconds": 0.0, "records_deleted": 0,
        "fields_nulled": {},
        "first_chunk_started_at": None, "last_chunk_finished_at": None,
        "transform_started_at": None, "extraction_seconds": None,
        "aggregation_wait_seconds": None,
    }
    row.update(counts)
    return row


def job_report(state: StateStore, job_id: str) -> dict[str, Any]:
    job = state.job(job_id)
    if job is None:
        return {"job_id": job_id, "status": "unknown"}
    tables: dict[str, dict[str, Any]] = {}
    for label, t in job.report.get("tables", {}).items():
        tables[label] = _table_row(
            chunks=t["chunks"], chunks_failed=t["chunks_failed"],
            records_extracted=t["records_extracted"], files_written=t["files_written"],
            errors=t.get("errors", []), chunk_seconds=t.get("chunk_seconds", 0.0))
    transforms = []
    per_table: dict[str, list[RequestRecord]] = defaultdict(list)
    for rec in state.requests(job_id):
        req = rec.request
        label = req.table.label
        per_table[label].append(rec)
        transforms.append({
            "request_id": req.request_id, "table": label, "trigger": req.trigger,
            "processing_mode": req.processing_mode.value, "status": rec.status,
            "attempts": rec.attempts, "error": rec.error,
            "seconds": rec.result.seconds if rec.result else None,
            "started_at": _iso(rec.result.started_at) if rec.result else None,
            "worker": rec.result.worker if rec.result else None,
            **({k: v for k, v in rec.result.model_dump(mode="json").items()
                if k.startswith(("records_", "files_", "child_rows_", "fields_"))}
               if rec.result else {}),
        })
    for label, recs in per_table.items():
        row = tables.setdefault(label, _table_row())
        row["transforms_triggered"] = len(recs)
        for rec in recs:
            if rec.result is None:
                continue
            row["files_read"] += rec.result.files_read
            row["records_read"] += rec.result.records_read
            row["records_canonical"] += rec.result.records_written
            row["records_quarantined"] += rec.result.records_quarantined
            row["records_merged"] += rec.result.records_merged
            row["child_rows_written"] += rec.result.child_rows_written
            row["child_rows_rejected"] += rec.result.child_rows_rejected
            row["records_deleted"] += rec.result.records_deleted
            for why, n in rec.result.fields_nulled.items():
                row["fields_nulled"][why] = row["fields_nulled"].get(why, 0) + n
            row["transform_seconds"] = round(row["transform_seconds"] + rec.result.seconds, 3)
    _add_timings(tables, state.chunk_results(job_id), per_table,
                 aggregated=job.trigger_mode == TriggerMode.AGGREGATED.value)
    for row in tables.values():
        # the seed's headline: records read by transforms per record extracted (1.00 when
        # each record is canonicalized once); files per transform
        row["read_per_extracted"] = (round(row["records_read"] / row["records_extracted"], 3)
                                     if row["records_extracted"] else None)
        row["files_per_transform"] = (round(row["files_read"] / row["transforms_triggered"], 1)
                                      if row["transforms_triggered"] else None)
    return {
        "job_id": job.job_id, "tenant_id": job.tenant_id, "pipeline": job.pipeline,
        "status": job.status, "outcome": job.outcome, "trigger_mode": job.trigger_mode,
        "chunks": {"total": job.total_chunks, "completed": job.completed_chunks,
                   "failed": job.failed_chunks},
        "created_at": job.created_at.isoformat(), "updated_at": job.updated_at.isoformat(),
        "seconds": round((job.updated_at - job.created_at).total_seconds(), 3),
        "aggregated_at": _iso(job.report.get("aggregated_at")),
        "tables": tables, "transforms": transforms,
        **({"error": job.report["error"]} if job.report.get("error") else {}),
        "runner": _runner_state(state, job),
        "events": [{"at": e.at.isoformat(), "kind": e.kind, "chunk_id": e.chunk_id,
                    "detail": e.detail} for e in state.events(job_id)],
    }


def _iso(ts: float | None) -> str | None:
    return None if ts is None else datetime.fromtimestamp(ts, UTC).isoformat(
        timespec="milliseconds")


def _add_timings(tables: dict[str, dict[str, Any]], results: list[ChunkResult],
                 requests: dict[str, list[RequestRecord]], aggregated: bool) -> None:
    """Per table, from the workers' clocks: extraction (its first chunk's start to its last
    chunk's end), the wait for aggregation (its last chunk's end to its transform's start;
    aggregated mode only: per-batch transforms start while chunks still run) and when the
    transform started. Results recorded before chunks carried their times count for
    nothing: a table none of whose chunks has times shows None."""
    spans: dict[str, tuple[float, float]] = {}
    for r in results:
        if r.started_at is None or r.finished_at is None:
            continue
        label = r.table_metadata.label
        first, last = spans.get(label, (r.started_at, r.finished_at))
        spans[label] = (min(first, r.started_at), max(last, r.finished_at))
    for label, row in tables.items():
        starts = [rec.result.started_at for rec in requests.get(label, [])
                  if rec.result is not None and rec.result.started_at is not None]
        transform_start = min(starts) if starts else None
        row["transform_started_at"] = _iso(transform_start)
        if label not in spans:
            continue
        first, last = spans[label]
        row["first_chunk_started_at"] = _iso(first)
        row["last_chunk_finished_at"] = _iso(last)
        row["extraction_seconds"] = round(last - first, 3)
        if aggregated and transform_start is not None:
            row["aggregation_wait_seconds"] = round(transform_start - last, 3)


def _runner_state(state: StateStore, job: JobRecord) -> str | None:
    """"alive" or "lost" for an unfinished job driven by a runner, "events" for one its
    events drive (functions on queues); None otherwise."""
    if job.status in TERMINAL or job.runner is None:
        return None
    if event_driven(job):
        return "events"
    return "alive" if runner_alive(state, job) else "lost"


def totals(report: dict[str, Any]) -> dict[str, int]:
    keys = ("chunks", "records_extracted", "files_written", "transforms_triggered",
            "records_read", "records_canonical", "records_quarantined", "records_merged",
            "child_rows_written", "child_rows_rejected")
    return {k: sum(t.get(k, 0) for t in report.get("tables", {}).values()) for k in keys}
