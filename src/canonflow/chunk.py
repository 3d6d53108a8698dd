"""The chunk processor: fetch a page range, write raw batch files, return a chunk result.

It only writes. The transform is requested by the result aggregator once per table, except in
the ``per_batch`` rollback mode, which reproduces the legacy trigger: a time-based transform
request after every batch write.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from contextvars import ContextVar
from dataclasses import asdict
from typing import TYPE_CHECKING

import pyarrow as pa

from canonflow.connectors.pagination import PageRequest
from canonflow.connectors.rest import Page, storable
from canonflow.errors import error_payload
from canonflow.lease import worker_label
from canonflow.model import (
    ChunkError,
    ChunkResult,
    ChunkSpec,
    TransformRequest,
    TriggerMode,
    first_page_key,
    raw_key,
)
from canonflow.telemetry import tracing

if TYPE_CHECKING:
    from canonflow.runtime import Runtime

log = logging.getLogger("canonflow.chunk")
_time_low: ContextVar[Callable[[], bool] | None] = ContextVar("canonflow_chunk_time_low",
                                                             default=None)


class ChunkContinues(Exception):  # not an error: the chunk goes on elsewhere
    """A sequential chunk stopped at a checkpoint because its time runs low (a Lambda's
    deadline); running the same spec again resumes from that checkpoint."""


@contextmanager
def continue_when(time_low: Callable[[], bool]) -> Iterator[None]:
    """Inside this block a sequential chunk stops after a checkpoint once ``time_low()``
    is true, raising :class:`ChunkContinues` (the caller re-enqueues it)."""
    token = _time_low.set(time_low)
    try:
        yield
    finally:
        _time_low.reset(token)


def encode_batch(lines: list[bytes]) -> bytes:
    """zstd-compressed JSON Lines."""
    sink = pa.BufferOutputStream()
    with pa.CompressedOutputStream(sink, "zstd") as out:
        out.write(b"\n".join(lines) + b"\n")
    return bytes(sink.getvalue().to_pybytes())


class _BatchWriter:
    def __init__(self, spec: ChunkSpec, rt: Runtime) -> None:
        self.spec = spec
        self.rt = rt
        self.lines: list[bytes] = []
        self.files: list[str] = []

    def add(self, records: list[bytes]) -> None:
        self.lines.extend(records)
        size = self.spec.batch_records
        while len(self.lines) >= size:
            self._write(self.lines[:size])
            del self.lines[:size]

    def add_page(self, records: list[bytes]) -> bool:
        """Sequential chunks cut batches at page boundaries only, so that after a write
        every fetched record is in a file and a checkpoint is exact; True if it wrote."""
        self.lines.extend(records)
        if len(self.lines) < self.spec.batch_records:
            return False
        self._write(self.lines)
        self.lines = []
        return True

    def close(self) -> None:
        if self.lines:
            self._write(self.lines)
            self.lines = []

    def _write(self, lines: list[bytes]) -> None:
        spec = self.spec
        key = raw_key(spec.table, spec.job_id, spec.chunk_id, len(self.files))
        self.rt.objects.put(key, encode_batch(lines))  # a retry rewrites the same key
        self.files.append(key)
        if spec.trigger_mode is TriggerMode.PER_BATCH:
            t = spec.table
            self.rt.state.enqueue_request(TransformRequest(
                tenant_id=t.tenant_id, service_name=t.service_name, table_name=t.table_name,
                job_id=spec.job_id, trigger="per_batch", reprocess=True,  # legacy: re-read all
                request_id=f"{spec.job_id}:{spec.chunk_id}:{len(self.files) - 1:05d}",
                trace_context=tracing.carrier() or None,  # the chunk's span
            ))


def _handed_page(spec: ChunkSpec, rt: Runtime) -> bytes | None:
    """The body of page 1 that planning read for this chunk, if it is still there (else
    the chunk asks the API, as it would without it)."""
    if not spec.first_page_stored:
        return None
    try:
        return rt.objects.get(first_page_key(spec.table, spec.job_id, spec.chunk_id))
    except FileNotFoundError:
        return None


def process_chunk(spec: ChunkSpec, rt: Runtime) -> ChunkResult:
    started, started_at = time.perf_counter(), time.time()
    t = spec.table
    writer = _BatchWriter(spec, rt)
    records = 0
    page = spec.start_page
    final_page: int | None = None
    error = None
    sequential = spec.end_page is None
    # a chunk that reads its whole query (sequential, a time window, a table planned as one
    # open range) reports the total the source announced for it: the aggregator compares
    whole_query = sequential and spec.start_page == 1
    announced: int | None = None
    resume: PageRequest | None = None
    finished = False
    try:
        if sequential and (ckpt := rt.state.load_checkpoint(spec.job_id, spec.chunk_id)):
            # a retry of a sequential chunk resumes where its last checkpoint stands
            writer.files, records = list(ckpt["files"]), int(ckpt["records"])
            page, final_page = int(ckpt["page"]), ckpt["final_page"]
            resume = PageRequest(**ckpt["next"]) if ckpt["next"] else None
            announced = ckpt.get("announced_total")
            finished = resume is None
            log.info("chunk resumes from its checkpoint", extra={
                "chunk_id": spec.chunk_id, "records": records, "files": len(writer.files)})
        with ExitStack() as using:
            walk: Iterator[tuple[Page, PageRequest | None]] = iter(())
            if not finished:  # a checkpoint after the last page: nothing to ask the API
                client = using.enter_context(rt.client(t.tenant_id, t.service_name))
                after_first = PageRequest(**spec.first_page_next) \
                    if spec.first_page_next else None
                walk = client.walk(
                    t.table_name, spec.start_page, spec.end_page, spec.page_size,
                    resume=resume, params=spec.params,
                    first_body=None if resume else _handed_page(spec, rt),
                    first_next=after_first)
            for fetched, nxt in walk:
                if announced is None:
                    announced = fetched.total
                records += len(fetched.records)
                final_page = page
                page += 1
                if not sequential:
                    writer.add(fetched.records)
                elif writer.add_page(fetched.records) and (nxt is None or storable(nxt)):
                    # a next request the API signed with a secret of its own is never stored:
                    # a retry then resumes from an earlier checkpoint, or from the start
                    rt.state.save_checkpoint(spec.job_id, spec.chunk_id, {
                        "files": writer.files, "records": records, "page": page,
                        "final_page": final_page, "next": asdict(nxt) if nxt else None,
                        "announced_total": announced})
                    if (time_low := _time_low.get()) is not None and nxt is not None \
                            and time_low():
                        raise ChunkContinues(f"{spec.chunk_id}: continues from page {page}")
        writer.close()
    except ChunkContinues:
        raise
    except Exception as exc:  # every failure becomes part of the chunk result
        error = ChunkError(**error_payload(exc))
        log.warning("chunk failed", extra={"chunk_id": spec.chunk_id, "job_id": spec.job_id,
                                           "table": t.label, "error": error.message})
    return ChunkResult(
        job_id=spec.job_id, chunk_id=spec.chunk_id, completed=error is None,
        records_processed=records, processing_time=round(time.perf_counter() - started, 4),
        final_page=final_page, final_offset=(spec.start_page - 1) * spec.page_size + records,
        s3_files_written=writer.files, s3_files_count=len(writer.files),
        table_metadata=t, error=error, announced_total=announced if whole_query else None,
        started_at=round(started_at, 3), finished_at=round(time.time(), 3),
        worker=worker_label(),
    )
