"""Contracts: the JSON-compatible payloads that travel through every dispatcher.

Field names of :class:`ChunkResult` and :class:`TransformRequest` are the pipeline's public
contract (see docs/architecture.md); keep them stable.
"""

from __future__ import annotations

import re
import uuid
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from canonflow.errors import InvalidIdentifier

_IDENT = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]*")
MAX_IDENT = 128
RAW_EXT = "jsonl.zst"


def validate_identifier(value: str, what: str = "identifier") -> str:
    """Reject ids that could escape a key prefix or confuse a log line."""
    if not isinstance(value, str) or not value:
        raise InvalidIdentifier(f"invalid {what} {value!r}: must be a non-empty string")
    if len(value) > MAX_IDENT:
        raise InvalidIdentifier(f"invalid {what} {value[:40]!r}...: longer than {MAX_IDENT}")
    if ".." in value or not _IDENT.fullmatch(value):
        raise InvalidIdentifier(
            f"invalid {what} {value!r}: use letters, digits, '_', '-' and '.', "
            "no '/', '..', spaces or control characters"
        )
    return value


def _ident(what: str) -> AfterValidator:
    def check(value: str) -> str:
        try:
            return validate_identifier(value, what)
        except InvalidIdentifier as exc:
            raise ValueError(str(exc)) from None

    return AfterValidator(check)


TenantId = Annotated[str, _ident("tenant_id")]
ServiceName = Annotated[str, _ident("service_name")]
TableName = Annotated[str, _ident("table_name")]
JobId = Annotated[str, _ident("job_id")]
ChunkId = Annotated[str, _ident("chunk_id")]


class Contract(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TableRef(Contract):
    tenant_id: TenantId
    service_name: ServiceName
    table_name: TableName

    @property
    def raw_prefix(self) -> str:
        return f"raw/{self.tenant_id}/{self.service_name}/{self.table_name}/"

    @property
    def label(self) -> str:
        return f"{self.tenant_id}/{self.service_name}.{self.table_name}"


def raw_key(table: TableRef, job_id: str, chunk_id: str, part: int, ext: str = RAW_EXT) -> str:
    """Deterministic batch-file key: a retried chunk rewrites exactly the same keys."""
    return f"{table.raw_prefix}{job_id}/{chunk_id}/part-{part:05d}.{ext}"


def first_page_key(table: TableRef, job_id: str, chunk_id: str) -> str:
    """Where planning leaves the page 1 it read for the chunk that starts there (outside
    ``raw/``: no transform ever reads it as a batch file)."""
    return (f"plan/{table.tenant_id}/{table.service_name}/{table.table_name}/{job_id}/"
            f"{chunk_id}/page-00001.json")


class TriggerMode(StrEnum):
    AGGREGATED = "aggregated"
    PER_BATCH = "per_batch"  # rollback flag: the legacy per-batch time-based trigger


class ChunkSpec(Contract):
    """One unit of extraction work: a table and a page range (``end_page`` inclusive)."""

    job_id: JobId
    chunk_id: ChunkId
    table: TableRef
    start_page: int = Field(ge=1)
    end_page: int | None = Field(default=None, ge=1)
    page_size: int = Field(gt=0)
    batch_records: int = Field(gt=0)
    trigger_mode: TriggerMode = TriggerMode.AGGREGATED
    params: dict[str, str] = Field(
        default_factory=dict, description="extra query parameters, e.g. an incremental filter")
    announced_total: int | None = Field(
        default=None, ge=0,
        description="records the source announced for the whole table when it was planned "
        "(page 1's total); the aggregator compares what was extracted with it")
    full_extraction: bool = Field(
        default=False, description="the chunk's query lists the whole table (no incremental "
        "mark): when all of a table's chunks succeed, keys it no longer lists are deleted")
    first_page_stored: bool = Field(
        default=False, description="planning read page 1 and stored its body (at "
        "first_page_key): the chunk uses it instead of asking the API again")
    first_page_next: dict[str, Any] | None = Field(
        default=None, description="with first_page_stored, on a sequential chunk: the request "
        "for the page after page 1 as page 1 named it (a next link, a cursor: what the stored "
        "body no longer holds), never one holding a secret; None when page 1 named none")
    trace_context: dict[str, str] | None = Field(
        default=None, description="W3C trace context (traceparent, tracestate) of the job's "
        "trace: the task's span joins it whichever dispatcher carried the task")


class ChunkError(Contract):
    type: str
    message: str
    retryable: bool


class ChunkResult(Contract):
    job_id: JobId
    chunk_id: ChunkId
    completed: bool
    records_processed: int = Field(ge=0)
    processing_time: float = Field(ge=0)
    final_page: int | None = None
    final_offset: int | None = None
    s3_files_written: list[str] = Field(default_factory=list)
    s3_files_count: int = Field(ge=0)
    table_metadata: TableRef
    error: ChunkError | None = None
    announced_total: int | None = Field(
        default=None, ge=0,
        description="records the source announced for this chunk's own query (a chunk that "
        "reads its query from the first page, e.g. sequential or a time window)")
    started_at: float | None = Field(
        default=None, description="when the chunk's (last) attempt started, epoch seconds")
    finished_at: float | None = Field(
        default=None, description="when it ended, epoch seconds (the worker's clock)")
    worker: str | None = Field(default=None, description="the process that ran it: host:pid")

    @model_validator(mode="after")
    def _count_matches(self) -> ChunkResult:
        if self.s3_files_count != len(self.s3_files_written):
            raise ValueError("s3_files_count must equal len(s3_files_written)")
        if self.completed and self.error is not None:
            raise ValueError("a completed chunk carries no error")
        return self


class ProcessingMode(StrEnum):
    FILE_SPECIFIC = "file_specific"
    TIME_BASED = "time_based"


MAX_LOOKBACK_HOURS = 24 * 366 * 10


class TransformRequest(Contract):
    """Starts one canonical transform for one table.

    ``source_files`` present → file_specific; absent (and no manifest) → time_based.
    """

    tenant_id: TenantId
    service_name: ServiceName
    table_name: TableName
    job_id: JobId | None = None
    source_files: list[str] | None = None
    source_files_manifest: str | None = None
    # at most ten years back: a finite window the calendar can subtract (inf, NaN and
    # 1e12 hours are refused as bad input, not failed as an overflow)
    lookback_hours: float = Field(default=72.0, gt=0, le=MAX_LOOKBACK_HOURS,
                                  allow_inf_nan=False)
    request_id: str = Field(default_factory=lambda: f"manual-{uuid.uuid4().hex}")
    trigger: Literal["aggregated", "per_batch", "manual"] = "manual"
    reprocess: bool = Field(
        default=False, description="time_based: also read files the ledger marks as done")
    reconcile: bool = Field(
        default=False, description="the files are a complete full-refresh extraction of the "
        "table: its rows from this table whose keys they do not list are marked deleted")
    trace_context: dict[str, str] | None = Field(
        default=None, description="W3C trace context (traceparent, tracestate) of the job's "
        "trace: the task's span joins it whichever dispatcher carried the task")

    @property
    def table(self) -> TableRef:
        return TableRef(
            tenant_id=self.tenant_id, service_name=self.service_name, table_name=self.table_name
        )

    @property
    def processing_mode(self) -> ProcessingMode:
        if self.source_files is not None or self.source_files_manifest is not None:
            return ProcessingMode.FILE_SPECIFIC
        return ProcessingMode.TIME_BASED

    def payload(self) -> dict[str, Any]:
        """The event as it travels: absent fields stay absent (absence selects the mode)."""
        return self.model_dump(mode="json", exclude_none=True)


def group_target(request: TransformRequest) -> str | None:
    """The outbox ``target`` of a request a group commit may take: an aggregated request
    for an explicit, inline list of files (a job's small table); None for any other."""
    if (request.trigger != "aggregated" or request.source_files_manifest is not None
            or request.reprocess or request.processing_mode is not ProcessingMode.FILE_SPECIFIC):
        return None
    return f"{request.service_name}:{request.table_name}"


def aggregated_request_id(job_id: str, table: TableRef) -> str:
    """The outbox's unique key: exactly one transform request per (job, table)."""
    return f"{job_id}:{table.service_name}:{table.table_name}"


class TransformResult(Contract):
    request_id: str
    tenant_id: str
    service_name: str
    table_name: str
    entity: str
    processing_mode: ProcessingMode
    files_read: int = 0
    records_read: int = 0
    records_written: int = 0
    records_quarantined: int = 0
    records_merged: int = 0
    child_rows_written: int = 0
    child_rows_rejected: int = 0  # child rows that failed their mapping (quarantined)
    # optional values that could not be cast and became null (or an enum's fallback), by
    # "field: reason"; their records landed
    fields_nulled: dict[str, int] = Field(default_factory=dict)
    records_deleted: int = 0  # rows marked deleted (_deleted_at): tombstones, reconciliation
    files_skipped: int = 0  # time_based: already canonicalized, per the ledger
    high_water: str | None = None  # newest ordering value written (ISO UTC)
    skipped: bool = False
    seconds: float = 0.0
    started_at: float | None = None  # epoch seconds, the worker's clock
    finished_at: float | None = None
    worker: str | None = None  # the process that ran it: host:pid


class JobStatus(StrEnum):
    RUNNING = "running"
    AGGREGATING = "aggregating"
    TRANSFORMS_ENQUEUED = "transforms_enqueued"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


TERMINAL = frozenset({JobStatus.DONE.value, JobStatus.FAILED.value, JobStatus.CANCELLED.value})


class JobOutcome(StrEnum):
    COMPLETED = "completed"
    PARTIAL_SUCCESS = "partial_success"
    FAILED = "failed"
