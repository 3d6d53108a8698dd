"""Job planning: which (service, table) pairs to pull and how each splits into chunks."""

from __future__ import annotations

import math
import uuid
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

from canonflow.config import Settings
from canonflow.connectors.spec import (
    PageRangeChunking,
    SequentialChunking,
    TimeWindowChunking,
)
from canonflow.errors import ConfigError
from canonflow.model import (
    TERMINAL,
    ChunkSpec,
    TableRef,
    first_page_key,
    validate_identifier,
)
from canonflow.telemetry import tracing

if TYPE_CHECKING:
    from canonflow.runtime import Runtime


@dataclass(frozen=True)
class JobPlan:
    job_id: str
    tenant_id: str
    chunks: list[ChunkSpec]

    @property
    def tables(self) -> list[TableRef]:
        return list(dict.fromkeys(c.table for c in self.chunks))


def new_job_id() -> str:
    return f"job-{datetime.now(UTC):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:8]}"


ISO = "%Y-%m-%dT%H:%M:%SZ"


def time_windows(start: str, end: datetime, hours: float) -> list[tuple[str, str]]:
    """Half-open windows [since, before) from ``start`` to ``end``, ``hours`` wide."""
    try:
        begin = datetime.strptime(start, ISO).replace(tzinfo=UTC)
    except ValueError:
        raise ConfigError(f"time window start {start!r}: expected {ISO}") from None
    windows, step = [], timedelta(hours=hours)
    while begin < end:
        windows.append((begin.strftime(ISO), min(begin + step, end).strftime(ISO)))
        begin += step
    return windows or [(start, end.strftime(ISO))]


def page_ranges(
    total_records: int | None, page_size: int, pages_per_chunk: int
) -> list[tuple[int, int | None]]:
    """Inclusive page ranges covering ``total_records``. The last range is open: its chunk
    keeps following the pagination while pages are full, so records the total did not
    announce are fetched too (an API's count may lag behind its data)."""
    if total_records is None:
        return [(1, None)]
    pages = max(1, math.ceil(total_records / page_size))
    starts = range(1, pages + 1, pages_per_chunk)
    return [(start, start + pages_per_chunk - 1) for start in starts[:-1]] + [(starts[-1], None)]


TASK_BATCH_CHUNKS = 32  # at most this many chunks in one task


def task_batches(specs: list[ChunkSpec]) -> list[list[ChunkSpec]]:
    """The chunks of one job as tasks. Those that need next to nothing from the API go
    together, up to ``TASK_BATCH_CHUNKS`` a task (a task of its own would cost more to
    dispatch and record than to run): the page planning read is all they read (page 1
    alone, or a table read page after page whose page 1 named no next page), or their
    table's total fits in that page (then they ask at most once more, for the empty page
    after a full one). Every other chunk is a task of its own, first: they run in
    parallel, and the longest work starts first."""
    small: list[ChunkSpec] = []
    alone: list[list[ChunkSpec]] = []
    for spec in specs:
        whole = spec.end_page == 1 or spec.announced_total is None \
            or spec.announced_total <= spec.page_size
        if spec.first_page_stored and spec.first_page_next is None and whole:
            small.append(spec)
        else:
            alone.append([spec])
    return alone + [small[i:i + TASK_BATCH_CHUNKS]
                    for i in range(0, len(small), TASK_BATCH_CHUNKS)]


def plan_job(settings: Settings, rt: Runtime, tenant_id: str, job_id: str | None = None,
             full_refresh: bool = False) -> JobPlan:
    """Read each table's total (first page) and split it into page-range chunks, the last
    one open-ended; every chunk carries the total as ``announced_total`` so the aggregator
    can tell a table that came up short. The first page is read once: what paging reads of
    it is stored for the first chunk. Tables synced incrementally ask only for what changed
    since their high-water mark."""
    validate_identifier(tenant_id, "tenant_id")
    job_id = validate_identifier(job_id or new_job_id(), "job_id")
    for src in settings.sources:  # every source's tenant values, before any request
        settings.connection(tenant_id, src.service)
    chunks: list[ChunkSpec] = []
    marks: dict[TableRef, str] = {}
    if not full_refresh:  # every incremental table's high-water mark, in one read
        marks = rt.state.sync_cursors([
            TableRef(tenant_id=tenant_id, service_name=src.service, table_name=table)
            for src in settings.sources
            for table in src.tables or list(settings.spec_for(src.service).tables)
            if settings.spec_for(src.service).table(table).incremental is not None])
    for src in settings.sources:
        spec = settings.spec_for(src.service)
        for table in src.tables or list(spec.tables):
            tspec = spec.table(table)
            page_size = src.page_size or tspec.pagination.page_size
            most = tspec.pagination.max_page_size
            if most is not None and page_size > most:
                raise ConfigError(f"source {src.service}: page_size {page_size} is above the "
                                  f"API's maximum for {table} (max_page_size {most})")
            per_chunk = src.pages_per_chunk or (
                tspec.chunking.pages_per_chunk
                if isinstance(tspec.chunking, PageRangeChunking) else 1)
            ref = TableRef(tenant_id=tenant_id, service_name=src.service, table_name=table)
            params: dict[str, str] = {}
            inc = tspec.incremental
            full = True  # the query lists the whole table (no mark narrows it)
            if inc is not None:
                mark = marks.get(ref)
                full = mark is None
                since = mark or inc.start
                if since is not None:  # time windows start at the mark (ISO)
                    params[inc.cursor_param] = since if isinstance(
                        tspec.chunking, TimeWindowChunking) else inc.render(since)
            total, first_body, after_first = None, None, None
            if isinstance(tspec.chunking, PageRangeChunking):  # read the total first
                with rt.client(tenant_id, src.service) as client:
                    first, first_body = client.first_page(table, page_size, params)
                total = first.total
            elif isinstance(tspec.chunking, SequentialChunking):  # page 1 for the chunk
                with rt.client(tenant_id, src.service) as client:
                    opened = client.opening(table, page_size, params)
                if opened is not None:
                    first_body, after_first = opened
            work: list[tuple[int, int | None, dict[str, str]]]
            if isinstance(tspec.chunking, TimeWindowChunking):
                tw = tspec.chunking
                since = params.pop(tspec.incremental.cursor_param, None) \
                    if tspec.incremental else None
                until = (datetime.strptime(tw.end, ISO).replace(tzinfo=UTC) if tw.end
                         else datetime.now(UTC) + timedelta(seconds=1))
                windows = time_windows(max(since or tw.start, tw.start), until, tw.window_hours)
                work = [(1, None, {**params, tw.since_param: a, tw.before_param: b})
                        for a, b in windows]
            else:
                work = [(a, b, params) for a, b in page_ranges(total, page_size, per_chunk)]
            for n, (start, last, chunk_params) in enumerate(work):
                chunk_id = f"{src.service}-{table}-{n:05d}"
                handed = False
                if first_body is not None and start == 1:
                    rt.objects.put(first_page_key(ref, job_id, chunk_id), first_body)
                    handed = True
                chunks.append(ChunkSpec(
                    job_id=job_id, chunk_id=chunk_id, table=ref,
                    start_page=start, end_page=last, page_size=page_size,
                    batch_records=settings.batch_records, trigger_mode=settings.trigger_mode,
                    params=chunk_params, announced_total=total, full_extraction=full,
                    first_page_stored=handed,
                    first_page_next=asdict(after_first) if handed and after_first else None,
                    trace_context=tracing.carrier() or None,  # the job's span, if traced
                ))
    return JobPlan(job_id, tenant_id, chunks)


PLAN_PREFIX = "plan/"
# a job's pages are stored while it is planned, before the state store knows the job: one
# it does not know is taken as gone (its planning failed, or it was deleted) only after this
UNKNOWN_JOB_GRACE = timedelta(hours=1)


def forget_pages(rt: Runtime, retention_hours: float) -> int:
    """Delete the page 1 bodies planning left for chunks (:func:`first_page_key`) of jobs
    that ended (done, failed, cancelled, or unknown to the state store for
    ``UNKNOWN_JOB_GRACE``), and of any job after ``retention_hours`` (a chunk that still
    runs then asks the API for its first page again, as it would without them). Returns how
    many were deleted."""
    now = datetime.now(UTC)
    cutoff = now - timedelta(hours=retention_hours)
    ended: dict[str, bool | None] = {}  # None: a job the state store does not know
    gone: list[str] = []
    for obj in rt.objects.list(PLAN_PREFIX):
        parts = obj.key.split("/")
        if len(parts) != 7:  # not a page planning left
            continue
        job_id = parts[4]
        if job_id not in ended:
            job = rt.state.job(job_id)
            ended[job_id] = None if job is None else job.status in TERMINAL
        over = ended[job_id] if ended[job_id] is not None \
            else obj.last_modified < now - UNKNOWN_JOB_GRACE
        if over or obj.last_modified < cutoff:
            gone.append(obj.key)
    rt.objects.delete(gone)
    return len(gone)
