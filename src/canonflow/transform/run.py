"""Run one transform request: claim it, stream its files in groups, map, dedupe, upsert.

Exactly-once effect: the request is claimed in the state store before any side effect; a
request already done is skipped (a replay); a re-claimed request (crash, redelivery) skips the
groups its commits already carry in the Delta log.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.compute as pc

from canonflow.errors import RequestRejected, TerminalError
from canonflow.mappings import Entity
from canonflow.model import TransformRequest, TransformResult
from canonflow.transform.discovery import resolve_files
from canonflow.transform.mapping import CompiledMapping
from canonflow.transform.reader import RawFile, read_raw
from canonflow.transform.writer import QUARANTINE_SCHEMA, QUARANTINE_TABLE, canonical_path

if TYPE_CHECKING:
    from canonflow.runtime import Runtime

log = logging.getLogger("canonflow.transform")
_SEQ = "_seq"


def dedupe_newest(rows: pa.Table, key: str, order: str) -> pa.Table:
    """One row per key: the greatest ``order``, ties broken by the later ``_seq``."""
    if rows.num_rows <= 1:
        return rows
    if pc.count_distinct(rows.column(key)).as_py() == rows.num_rows:
        return rows  # the common case: no duplicates, no sort
    rows = rows.sort_by([(key, "ascending", "at_start"), (order, "ascending", "at_start"),
                         (_SEQ, "ascending", "at_start")])
    ids = rows.column(key).combine_chunks()
    nxt = pa.concat_arrays([ids.slice(1), pa.nulls(1, ids.type)])
    keep = pc.fill_null(pc.not_equal(ids, nxt), True)
    return rows.filter(keep)


@dataclass
class _Group:
    canonical: list[pa.Table] = field(default_factory=list)
    quarantine: list[pa.Table] = field(default_factory=list)
    rows: int = 0


def _job_of(key: str) -> str:
    parts = key.split("/")
    return parts[4] if len(parts) > 5 else ""


class _Run:
    def __init__(self, request: TransformRequest, rt: Runtime, entity: Entity,
                 mapping: CompiledMapping, skip: set[tuple[str, int]]) -> None:
        self.request = request
        self.rt = rt
        self.entity = entity
        self.mapping = mapping
        self.skip = skip  # (table, group) pairs already committed by an earlier attempt
        self.group = _Group()
        self.group_index = 0
        self.seq = 0
        self.read = self.written = self.quarantined = self.merged = 0

    def add_file(self, raw: RawFile) -> None:
        r = self.request
        mapped = self.mapping.apply(raw.columns)
        n_good = mapped.canonical.num_rows
        self.read += raw.columns.num_rows + len(raw.broken)
        if n_good:
            good = mapped.canonical
            consts = {
                "_tenant_id": r.tenant_id, "_service_name": r.service_name,
                "_source_table": r.table_name, "_source_file": raw.key,
                "_job_id": r.job_id or _job_of(raw.key), "_request_id": r.request_id,
            }
            for name, value in consts.items():
                good = good.append_column(name, pa.array([value] * n_good, pa.string()))
            good = good.append_column(_SEQ, pa.array(range(self.seq, self.seq + n_good),
                                                     pa.int64()))
            self.seq += n_good
            self.group.canonical.append(good)
        rejected = [
            (raw.line_number(row), raw.raw_line(row), why, fld)
            for row, why, fld in zip(mapped.rejected.to_pylist(), mapped.reasons.to_pylist(),
                                     mapped.fields.to_pylist(), strict=True)
        ] + [(line, text, why, None) for line, text, why in raw.broken]
        if rejected:
            self.group.quarantine.append(self._quarantine_rows(raw.key, rejected))
        self.group.rows += raw.columns.num_rows
        if self.group.rows >= self.rt.settings.transform_group_records:
            self.flush()

    def _quarantine_rows(self, key: str,
                         rows: list[tuple[int, bytes, str, str | None]]) -> pa.Table:
        r, n = self.request, len(rows)
        now = datetime.now(UTC)
        return pa.table({
            "_tenant_id": [r.tenant_id] * n, "_service_name": [r.service_name] * n,
            "_source_table": [r.table_name] * n, "entity": [self.entity.name] * n,
            "_source_file": [key] * n, "line": [line for line, *_ in rows],
            "_job_id": [r.job_id or _job_of(key)] * n, "_request_id": [r.request_id] * n,
            "field": [f for *_, f in rows], "reason": [why for _, _, why, _ in rows],
            "raw": [text.decode("utf-8", "replace") for _, text, _, _ in rows],
            "quarantined_at": [now] * n,
        }, schema=QUARANTINE_SCHEMA)

    def flush(self) -> None:
        group, index = self.group, self.group_index
        self.group, self.group_index = _Group(), index + 1
        writer = self.rt.canonical
        if group.quarantine:
            q = pa.concat_tables(group.quarantine)
            self.quarantined += q.num_rows
            if (QUARANTINE_TABLE, index) not in self.skip:
                writer.quarantine(q, self.request.request_id, index)
        if group.canonical:
            rows = pa.concat_tables(group.canonical)
            unique = dedupe_newest(rows, self.entity.primary_key, self.entity.ordering)
            self.merged += rows.num_rows - unique.num_rows
            self.written += unique.num_rows
            if (canonical_path(self.entity.name), index) not in self.skip:
                writer.upsert(self.entity, self.request.tenant_id, self.request.service_name,
                              unique.drop_columns([_SEQ]), self.request.request_id, index)


def run_transform(request: TransformRequest, rt: Runtime) -> TransformResult:
    started = time.perf_counter()
    state = rt.state
    mode = request.processing_mode
    try:
        spec = rt.catalog.mapping_for(request.service_name, request.table_name)
        entity = rt.catalog.entities[spec.entity]
        files = resolve_files(request, rt.objects)
    except (RequestRejected, TerminalError) as exc:
        if state.request(request.request_id) is not None:
            state.finish_request(request.request_id, None, error=str(exc))
        log.info("transform request rejected", extra={
            "request_id": request.request_id, "table": request.table.label, "error": str(exc)})
        raise

    state.enqueue_request(request)
    attempt = state.claim_request(request.request_id, rt.settings.transform_lease_seconds)
    if attempt is None:
        record = state.request(request.request_id)
        log.info("transform request already claimed or done; skipped", extra={
            "request_id": request.request_id, "status": record.status if record else None})
        base = record.result if record and record.result else None
        return TransformResult(
            request_id=request.request_id, tenant_id=request.tenant_id,
            service_name=request.service_name, table_name=request.table_name,
            entity=entity.name, processing_mode=mode, skipped=True,
            files_read=base.files_read if base else 0,
            records_read=base.records_read if base else 0,
            records_written=base.records_written if base else 0,
            records_quarantined=base.records_quarantined if base else 0,
            records_merged=base.records_merged if base else 0,
        )

    log.info("canonical transform starting", extra={
        "request_id": request.request_id, "table": request.table.label,
        "processing_mode": mode.value, "file_count": len(files), "attempt": attempt})
    skip: set[tuple[str, int]] = set()
    if attempt > 1:
        skip = {
            (name, g)
            for name in (canonical_path(entity.name), QUARANTINE_TABLE)
            for g in rt.canonical.committed_groups(name, request.request_id)
        }
    run = _Run(request, rt, entity, CompiledMapping(spec, entity), skip)
    try:
        for key in files:
            try:
                data = rt.objects.get(key)
            except FileNotFoundError:
                raise TerminalError(f"source file {key!r} does not exist") from None
            run.add_file(read_raw(key, data, run.mapping.paths))
        run.flush()
    except TerminalError as exc:
        state.finish_request(request.request_id, None, error=str(exc))
        raise
    result = TransformResult(
        request_id=request.request_id, tenant_id=request.tenant_id,
        service_name=request.service_name, table_name=request.table_name, entity=entity.name,
        processing_mode=mode, files_read=len(files), records_read=run.read,
        records_written=run.written, records_quarantined=run.quarantined,
        records_merged=run.merged, seconds=round(time.perf_counter() - started, 4),
    )
    if run.read != run.written + run.quarantined + run.merged:
        log.error("record accounting mismatch", extra=result.model_dump(mode="json"))
    state.record_files(request, files)
    state.finish_request(request.request_id, result)
    log.info("canonical transform finished", extra=result.model_dump(mode="json"))
    return result
