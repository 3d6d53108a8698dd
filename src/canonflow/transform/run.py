"""Run one transform request: claim it, stream its files in groups, map, dedupe, upsert.

Exactly-once effect: the request is claimed in the state store before any side effect; a
request already done is skipped (a replay); a re-claimed request (crash, redelivery) skips the
groups its commits already carry in the Delta log.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, TypeVar

import pyarrow as pa
import pyarrow.compute as pc

from canonflow import jsonio, memory
from canonflow import log as logs
from canonflow.errors import CanonflowError, RequestRejected, RetryableError, TerminalError
from canonflow.lease import Heartbeat, holder_dead, worker_label
from canonflow.mappings import Entity, MappingSpec
from canonflow.model import ProcessingMode, TransformRequest, TransformResult
from canonflow.redact import redact
from canonflow.stores.state import Progress, RequestRecord
from canonflow.telemetry import metrics
from canonflow.transform.discovery import resolve_files
from canonflow.transform.mapping import (
    ChildMapped,
    CompiledMapping,
    constant,
    count_true,
    entity_schema,
    key_column,
    sequence,
)
from canonflow.transform.reader import RawFile, read_raw
from canonflow.transform.together import FileMapping, map_together
from canonflow.transform.writer import (
    QUARANTINE_SCHEMA,
    QUARANTINE_TABLE,
    CanonicalWriter,
    canonical_path,
)

if TYPE_CHECKING:
    from canonflow.runtime import Runtime

log = logging.getLogger("canonflow.transform")
_time_low: ContextVar[Callable[[], bool] | None] = ContextVar("canonflow_transform_time_low",
                                                             default=None)


class TransformContinues(RetryableError):
    """A transform stopped after a committed group because its time runs low (a Lambda's
    deadline); its next attempt skips the groups already committed."""


@contextmanager
def continue_when(time_low: Callable[[], bool]) -> Iterator[None]:
    """Inside this block a transform stops after a committed group once ``time_low()`` is
    true, raising :class:`TransformContinues` (a retryable failure: the request goes back
    to the outbox; its next attempt resumes after the committed groups)."""
    token = _time_low.set(time_low)
    try:
        yield
    finally:
        _time_low.reset(token)
_SEQ = "_seq"
_PARENT = "_parent_seq"  # a child row's parent: its _SEQ
T = TypeVar("T")


def dedupe_newest(rows: pa.Table, keys: str | list[str], order: str) -> pa.Table:
    """One row per key: the greatest ``order``, ties broken by the later ``_seq``."""
    if rows.num_rows <= 1:
        return rows
    key = key_column(rows, [keys] if isinstance(keys, str) else keys)
    # ``unique`` hashes 3x faster than ``count_distinct`` (14 against 47 ms for 200,000
    # keys); it counts null as a value, so rows with null keys take the sort only when
    # there are two or more (which keeps them all, as it did before)
    if len(pc.unique(key)) == rows.num_rows:
        return rows  # the common case: no duplicates, no sort
    rows = rows.append_column("_key", key).sort_by([
        ("_key", "ascending", "at_start"), (order, "ascending", "at_start"),
        (_SEQ, "ascending", "at_start")])
    ids = rows.column("_key").combine_chunks()
    nxt = pa.concat_arrays([ids.slice(1), pa.nulls(1, ids.type)])
    keep = pc.fill_null(pc.not_equal(ids, nxt), True)
    return rows.filter(keep).drop_columns(["_key"])


def record_keys(keys: pa.Array, raw: list[str]) -> list[str]:
    """The identity of each quarantined record: its key when it has one, else a hash of its
    raw text (the same bad record meets the same open entry on every re-sync)."""
    return [f"key:{k}" if k is not None else "raw:sha256:" + hashlib.sha256(
        text.encode()).hexdigest() for k, text in zip(keys.to_pylist(), raw, strict=True)]


def child_record_keys(parent_keys: list[str], child: ChildMapped) -> list[str]:
    """A rejected child row's identity: its parent's key and its own key, or (no key) a
    hash of the array element it came from."""
    own = record_keys(child.keys, [jsonio.dumps_str(v) for v in child.items.to_pylist()])
    return [f"{parent}/{mine}" for parent, mine in zip(parent_keys, own, strict=True)]


@dataclass
class Written:
    written: int = 0  # parent rows whose key is new to this request
    merged: int = 0  # parent rows that were a duplicate within the request
    children: int = 0  # child rows written
    partition_empty: bool = False  # the tenant's partition held nothing before the group


def write_family(writer: CanonicalWriter, mapping: CompiledMapping, tenant_id: str,
                 service: str, parents: pa.Table, children: dict[str, list[pa.Table]],
                 request_id: str, group: int, done: Callable[[str], set[str]]) -> Written:
    """Upsert one group's parent rows (``_SEQ``) and, for the parents whose version won,
    their children (``_PARENT``: the parent's ``_SEQ``), replacing the children each
    such parent had. Children of a version that lost (older than the table's, or than a
    duplicate in the group) are not written."""
    entity = mapping.entity
    unique = dedupe_newest(parents, entity.keys, entity.ordering)
    upserted = writer.upsert(entity, tenant_id, service, unique.drop_columns([_SEQ]),
                             request_id, group, done=done(canonical_path(entity.name)))
    out = Written(merged=parents.num_rows - unique.num_rows,
                  partition_empty=upserted.partition_empty)
    out.written = unique.num_rows - upserted.repeated
    out.merged += upserted.repeated
    # the winners' sequence numbers and parent keys only: a copy of the whole group's
    # parent rows (every column) would raise the transform's peak memory
    links = list(dict.fromkeys(p for _, child in mapping.children
                               for p in child.parent_key.values()))
    won = unique.select(list(dict.fromkeys([_SEQ, *links]))).filter(upserted.won)
    if won.num_rows == 0:
        return out
    for _, child in mapping.children:
        name = child.entity.name
        tables = children.get(name, [])
        rows = pa.concat_tables(tables) if tables else None
        if rows is not None:
            of_won = pc.is_in(rows.column(_PARENT), value_set=won.column(_SEQ))
            if not pc.all(of_won).as_py():  # every parent won (a first load): no copy
                rows = rows.filter(of_won)
            rows = dedupe_newest(rows, child.entity.keys, child.entity.ordering)
            out.children += rows.num_rows
        link = {c: won.column(p) for c, p in child.parent_key.items()}
        writer.upsert(child.entity, tenant_id, service,
                      _empty(child.entity) if rows is None else rows.drop_columns([_SEQ]),
                      request_id, group, done=done(canonical_path(name)),
                      parents=pa.table(link))
    return out


def _empty(entity: Entity) -> pa.Table:
    return entity_schema(entity).empty_table()


@dataclass
class _Group:
    canonical: dict[str, list[pa.Table]] = field(default_factory=dict)
    quarantine: list[pa.Table] = field(default_factory=list)
    rows: int = 0


def _job_of(key: str) -> str:
    parts = key.split("/")
    return parts[4] if len(parts) > 5 else ""


class _Run:
    def __init__(self, request: TransformRequest, rt: Runtime, entity: Entity,
                 mapping: CompiledMapping, skip: set[tuple[str, str]]) -> None:
        self.request = request
        self.rt = rt
        self.entity = entity
        self.mapping = mapping
        self.skip = skip  # (table, group) pairs already committed by an earlier attempt
        self.group = _Group()
        self.group_index = 0
        self.seq = 0
        self.read = self.written = self.quarantined = self.merged = 0
        self.child_rows = self.child_rejected = 0
        self.nulled: dict[str, int] = {}
        self.deleted = 0
        self.seen: list[pa.Array] = []  # keys listed by a full-refresh extraction
        self.keys_complete = True
        self.high_water: object = None
        # did the tenant's partition hold rows before this request wrote (None: not known
        # yet)? A first load's partition holds only what this extraction listed
        self.held_before: bool | None = None

    def _lineage(self, rows: pa.Table, key: str, extracted_at: datetime,
                 deleted: pa.Array | None = None,
                 deleted_at: pa.Array | None = None) -> pa.Table:
        r, n = self.request, rows.num_rows
        consts = {
            "_tenant_id": r.tenant_id, "_service_name": r.service_name,
            "_source_table": r.table_name, "_source_file": key,
            "_job_id": r.job_id or _job_of(key), "_request_id": r.request_id,
        }
        for name, value in consts.items():
            rows = rows.append_column(name, constant(value, n, pa.string()))
        at = constant(extracted_at, n, pa.timestamp("us", tz="UTC"))
        gone = pa.nulls(n, at.type) if deleted is None or deleted_at is None else pc.if_else(
            deleted, pc.coalesce(deleted_at, at), None)  # a deletion without a time: now
        return rows.append_column("_extracted_at", at).append_column("_deleted_at", gone)

    def add_file(self, raw: RawFile, extracted_at: datetime,
                 premapped: FileMapping | None = None) -> None:
        """Map the file (or take its part of a group's mapping) and add its rows."""
        mapped = premapped[0] if premapped else self.mapping.apply(raw.columns, raw.raw_line)
        self.read += raw.columns.num_rows + len(raw.broken)
        for why, n in mapped.nulled.items():
            self.nulled[why] = self.nulled.get(why, 0) + n
        if self.request.reconcile:  # every key the source listed, bad records too
            self.seen.append(key_column(mapped.canonical, self.entity.keys))
            self.seen.append(pc.drop_null(mapped.keys))
            if raw.broken or mapped.keys.null_count:
                self.keys_complete = False  # a record without a readable key
        first = self.seq
        if mapped.canonical.num_rows:
            n = mapped.canonical.num_rows
            self.group.canonical.setdefault(self.entity.name, []).append(
                self._lineage(mapped.canonical, raw.key, extracted_at, mapped.deleted,
                              mapped.deleted_at).append_column(_SEQ, sequence(first, n)))
            self.seq += n
        texts = [raw.raw_line(row).decode("utf-8", "replace")
                 for row in mapped.rejected.to_pylist()]
        rejected = [
            _Rejected(raw.line_number(row), text, why, fld, self.entity.name, ident)
            for row, text, why, fld, ident in zip(
                mapped.rejected.to_pylist(), texts, mapped.reasons.to_pylist(),
                mapped.fields.to_pylist(), record_keys(mapped.keys, texts), strict=True)
        ] + [_Rejected(line, text.decode("utf-8", "replace"), why, None, self.entity.name,
                       record_keys(pa.nulls(1, pa.string()),
                                   [text.decode("utf-8", "replace")])[0])
             for line, text, why in raw.broken]
        if self.mapping.children and mapped.canonical.num_rows:
            parent_keys = key_column(mapped.canonical, self.entity.keys)
            for child in (premapped[1] if premapped
                          else self.mapping.apply_children(raw.columns, mapped.kept)):
                # the parent's position among the kept rows is its offset from ``first``
                if child.rows.num_rows:
                    position = pc.index_in(child.parents, value_set=mapped.kept)
                    self.group.canonical.setdefault(child.entity.name, []).append(
                        self._lineage(child.rows, raw.key, extracted_at)
                        .append_column(_SEQ, sequence(self.seq, child.rows.num_rows))
                        .append_column(_PARENT, pc.add(pc.cast(position, pa.int64()), first)))
                    self.seq += child.rows.num_rows
                if len(child.rejected_parents):
                    self.child_rejected += len(child.rejected_parents)
                    rows = child.rejected_parents.to_pylist()
                    of = pc.take(parent_keys, pc.index_in(child.rejected_parents,
                                                          value_set=mapped.kept))
                    ids = child_record_keys(
                        record_keys(of, [""] * len(rows)), child)
                    rejected += [
                        _Rejected(raw.line_number(row), raw.raw_line(row).decode(
                            "utf-8", "replace"), why, fld, child.entity.name, ident)
                        for row, why, fld, ident in zip(
                            rows, child.reasons.to_pylist(), child.fields.to_pylist(), ids,
                            strict=True)]
        if rejected:
            self.group.quarantine.append(self._quarantine_rows(raw.key, rejected))
        self.group.rows += raw.columns.num_rows
        if self.group.rows >= self.rt.settings.transform_group_records:
            index = self.group_index
            self.flush()
            fresh = not any(label.split("/")[0] == str(index) for _, label in self.skip)
            if fresh and (time_low := _time_low.get()) is not None and time_low():
                raise TransformContinues(f"{self.request.request_id}: time runs low after "
                                         f"group {self.group_index - 1}; continues")

    def _quarantine_rows(self, key: str, rows: list[_Rejected]) -> pa.Table:
        r, n = self.request, len(rows)
        now = datetime.now(UTC)
        return pa.table({
            "_tenant_id": [r.tenant_id] * n, "_service_name": [r.service_name] * n,
            "_source_table": [r.table_name] * n, "entity": [q.entity for q in rows],
            "_source_file": [key] * n, "line": [q.line for q in rows],
            "_job_id": [r.job_id or _job_of(key)] * n, "_request_id": [r.request_id] * n,
            "field": [q.field for q in rows], "reason": [q.reason for q in rows],
            "raw": [q.raw for q in rows],
            "quarantined_at": [now] * n, "resolved_at": [None] * n, "resolved_by": [None] * n,
            "record_key": [q.record_key for q in rows], "last_seen_at": [now] * n,
            "occurrences": [1] * n,
        }, schema=QUARANTINE_SCHEMA)

    def done(self, table: str) -> set[str]:
        return {label for t, label in self.skip if t == table}

    def flush(self) -> None:
        group, index = self.group, self.group_index
        self.group, self.group_index = _Group(), index + 1
        writer = self.rt.canonical
        if group.quarantine:
            q = pa.concat_tables(group.quarantine)
            self.quarantined += int(pc.sum(pc.equal(q.column("entity"), self.entity.name))
                                    .as_py() or 0)
            if (QUARANTINE_TABLE, str(index)) not in self.skip:
                writer.quarantine(q, self.request.request_id, index)
        parents = group.canonical.pop(self.entity.name, [])
        if parents:
            rows = pa.concat_tables(parents)
            gone = pc.is_valid(rows.column("_deleted_at"))
            self.deleted += count_true(gone)
            marks = pc.and_(gone, pc.is_null(rows.column(self.entity.ordering)))
            if pc.any(marks).as_py():
                # deletions that carry no version (an id, a deleted event) only mark the
                # rows the table holds; they land as written
                label = f"{index}/delete"
                if (canonical_path(self.entity.name), label) not in self.skip:
                    self.rt.canonical.mark_deleted(
                        self.entity, self.request.tenant_id, self.request.service_name,
                        rows.filter(marks), self.request.request_id, label)
                self.written += count_true(marks)
                # their deletion times move the incremental mark (a table of deletions)
                self._newest(pc.max(pc.filter(rows.column("_deleted_at"), marks)).as_py())
                rows = rows.filter(pc.invert(marks))
        if parents and rows.num_rows:
            self._newest(pc.max(rows.column(self.entity.ordering)).as_py())
            out = write_family(writer, self.mapping, self.request.tenant_id,
                               self.request.service_name, rows, group.canonical,
                               self.request.request_id, index, self.done)
            self.written += out.written
            self.merged += out.merged
            self.child_rows += out.children
            if self.held_before is None:
                self.held_before = not out.partition_empty
        del group
        memory.release()


    def _newest(self, value: Any) -> None:
        if value is not None and (self.high_water is None or value > self.high_water):
            self.high_water = value

    def reconcile(self) -> None:
        """A complete full refresh: this table's live rows whose keys the extraction did not
        list are marked deleted. Not when a record's key could not be read (it might be one
        of them)."""
        if not self.keys_complete:
            log.warning("full-refresh reconciliation skipped: a record without a readable key",
                        extra={"request_id": self.request.request_id})
            return
        label = "reconcile"
        if (canonical_path(self.entity.name), label) in self.skip:
            return
        if self.held_before is False:  # a first load: every row there was listed
            return
        r = self.request
        seen = pc.unique(pa.concat_arrays([pc.cast(a, pa.string()) for a in self.seen])) \
            if self.seen else pa.array([], pa.string())
        absent = self.rt.canonical.absent_keys(self.entity, r.tenant_id, r.service_name,
                                               r.table_name, seen, r.request_id)
        if absent.num_rows == 0:
            return
        n = absent.num_rows
        marks = absent.append_column("_deleted_at", constant(
            datetime.now(UTC), n, pa.timestamp("us", tz="UTC"))).append_column(
            "_job_id", constant(r.job_id or "", n, pa.string()))
        marked = self.rt.canonical.mark_deleted(self.entity, r.tenant_id, r.service_name,
                                                marks, r.request_id, label)
        self.deleted += marked
        log.info("full refresh: rows no longer listed by the source marked deleted",
                 extra={"request_id": r.request_id, "rows": marked})


@dataclass(frozen=True)
class _Rejected:
    line: int
    raw: str
    reason: str
    field: str | None
    entity: str
    record_key: str


def _iso(value: object) -> str | None:
    if isinstance(value, datetime):
        return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return None if value is None else str(value)


def prefetch(keys: list[str], load: Callable[[str], T], window: int = 4) -> Iterator[T]:
    """``load`` each key on a small thread pool, ``window`` ahead of the consumer, in order:
    reading and JSON parsing (which release the GIL) overlap the mapping of the previous
    file, and memory stays bounded by the window. A single file is read in this thread
    (nothing to overlap; a small sync's transform saves starting a pool)."""
    if len(keys) == 1:
        yield load(keys[0])
        return
    with ThreadPoolExecutor(max_workers=2, thread_name_prefix="canonflow-read") as pool:
        pending: deque[Future[T]] = deque()
        upcoming = iter(keys)
        for key in itertools.islice(upcoming, window):
            pending.append(pool.submit(load, key))
        while pending:
            future = pending.popleft()
            nxt = next(upcoming, None)
            if nxt is not None:
                pending.append(pool.submit(load, nxt))
            yield future.result()


@dataclass
class _Claimed:
    """A request this worker holds: what its transform reads, and its attempt."""

    request: TransformRequest
    spec: MappingSpec
    entity: Entity
    files: list[str]
    files_skipped: int
    attempt: int
    started: float = field(default_factory=time.perf_counter)
    started_at: float = field(default_factory=time.time)


def _resolve(request: TransformRequest, rt: Runtime) -> tuple[MappingSpec, Entity, list[str]]:
    """The request's mapping, entity and files; a request that cannot run (no mapping, a
    file list it may not name) is finished as failed and raises."""
    try:
        spec = rt.catalog.mapping_for(request.service_name, request.table_name)
        return spec, rt.catalog.entities[spec.entity], resolve_files(request, rt.objects)
    except (RequestRejected, TerminalError) as exc:
        if rt.state.request(request.request_id) is not None:
            rt.state.finish_request(request.request_id, None, error=str(exc))
        log.info("transform request rejected", extra={
            "request_id": request.request_id, "table": request.table.label, "error": str(exc)})
        raise


def run_transform(request: TransformRequest, rt: Runtime) -> TransformResult:
    """Claim the request and run it; with group commits on (``group_commit_requests``),
    also claim waiting requests of the same source table and commit them together."""
    started, started_at = time.perf_counter(), time.time()
    state = rt.state
    mode = request.processing_mode
    spec, entity, files = _resolve(request, rt)

    files_skipped = 0
    if mode is ProcessingMode.TIME_BASED and not request.reprocess:
        done = state.processed_files(request, files)  # the ledger: canonicalized already
        fresh = [f for f in files if f not in done]
        files_skipped, files = len(files) - len(fresh), fresh

    # a request already finished (most deliveries of a request a group took with it) is
    # known from a read, which waits for no writer; only the others queue for a claim
    record = state.request(request.request_id)
    if record is not None and record.status in FINISHED:
        return _skipped(request, entity.name, record)
    # its outbox row added if it came without one (manual, an event); a request running
    # under a holder known dead (a killed worker) is taken over at once
    attempt = state.claim_request(request.request_id, rt.settings.transform_lease_seconds,
                                  holder=rt.holder, holder_dead=holder_dead,
                                  max_attempts=rt.settings.transform_max_attempts,
                                  enqueue=request)
    if attempt is None:
        return _skipped(request, entity.name, state.request(request.request_id))
    first = _Claimed(request, spec, entity, files, files_skipped, attempt, started, started_at)
    more = _claim_group(request, rt)
    if not more:
        return _finish([(first, _write(first, rt))], rt)[0]
    return _run_group(first, more, rt)


FINISHED = frozenset({"done", "failed"})  # request statuses no claim takes again


def _skipped(request: TransformRequest, entity: str,
             record: RequestRecord | None) -> TransformResult:
    """The outcome of a delivery that found its request claimed or finished: skipped, with
    the counts of the run that did it, if finished."""
    log.info("transform request already claimed or done; skipped", extra={
        "request_id": request.request_id, "status": record.status if record else None})
    base = record.result if record and record.result else None
    return TransformResult(
        request_id=request.request_id, tenant_id=request.tenant_id,
        service_name=request.service_name, table_name=request.table_name,
        entity=entity, processing_mode=request.processing_mode, skipped=True,
        files_read=base.files_read if base else 0,
        records_read=base.records_read if base else 0,
        records_written=base.records_written if base else 0,
        records_quarantined=base.records_quarantined if base else 0,
        records_merged=base.records_merged if base else 0,
        child_rows_written=base.child_rows_written if base else 0,
        child_rows_rejected=base.child_rows_rejected if base else 0,
    )


def _claim_group(request: TransformRequest, rt: Runtime) -> list[tuple[TransformRequest, int]]:
    """Waiting requests to commit with ``request`` (none for a request no group takes:
    the store checks :func:`canonflow.model.group_target` before any statement)."""
    return rt.state.claim_group(request, rt.settings.group_commit_requests - 1,
                                rt.settings.transform_lease_seconds, rt.holder,
                                rt.settings.transform_max_attempts, rt.settings.name)


def _run_group(first: _Claimed, more: list[tuple[TransformRequest, int]],
               rt: Runtime) -> TransformResult:
    """Group commit: each request is mapped and accounted on its own, their new rows go to
    each canonical table in one commit (:meth:`CanonicalWriter.grouped`), then each is
    finished on its own. A request that fails for good fails alone; any other failure
    gives every request of the group back to the outbox (nothing of the group was
    committed, or what was is skipped by their next attempts)."""
    group = [first]
    failed: dict[str, TerminalError] = {}
    for request, attempt in more:
        try:
            spec, entity, files = _resolve(request, rt)
        except (RequestRejected, TerminalError) as exc:
            failed[request.request_id] = exc
            continue
        group.append(_Claimed(request, spec, entity, files, 0, attempt))
    log.info("group commit", extra={"request_id": first.request.request_id,
                                    "requests": [c.request.request_id for c in group]})
    others = [c.request.request_id for c in group[1:]]
    lease = rt.settings.transform_lease_seconds
    written: list[tuple[_Claimed, _Run]] = []
    # the tenant partitions the group writes, their locks taken together (the quarantine's
    # only if a record is rejected: then as met)
    partitions = {(canonical_path(name), c.request.tenant_id) for c in group
                  for name in (c.spec.entity, *(child.entity for child in c.spec.children))}
    try:
        # the requests stay this worker's from here on, the up-front read of their files
        # included (slow storage can make it last longer than a lease)
        with Heartbeat(lease / 4, lambda: [rt.state.touch_request(i, rt.holder)
                                           for i in others], "group commit"):
            loaded = _load_together(group, rt)
            with rt.canonical.grouped(partitions):
                for claimed in group:
                    r = claimed.request
                    with logs.bind(tenant_id=r.tenant_id, job_id=r.job_id,
                                   request_id=r.request_id):
                        try:
                            written.append((claimed, _write(claimed, rt, loaded)))
                        except TerminalError as exc:  # finished as failed by _write
                            failed[r.request_id] = exc
    except Exception as exc:
        message = redact(str(exc) if isinstance(exc, CanonflowError)
                         else f"{type(exc).__name__}: {exc}")
        for request_id in others:
            if request_id not in failed:
                rt.state.retry_later(request_id, f"group commit failed: {message}",
                                     rt.settings.transform_max_attempts, holder=rt.holder)
        raise  # the first request: its task gives it back
    results = {}
    for (claimed, _), result in zip(written, _finish(written, rt), strict=True):
        results[claimed.request.request_id] = result
        if claimed is not first:
            metrics.transform_finished(claimed.request, result)
    if first.request.request_id in failed:
        raise failed[first.request.request_id]
    return results[first.request.request_id]


@dataclass
class _Loaded:
    raw: RawFile
    modified: datetime
    mapped: FileMapping | None = None  # its part of a group's mapping


def _load(key: str, mapping: CompiledMapping, rt: Runtime) -> _Loaded:
    try:
        data, modified = rt.objects.get_object(key)
    except FileNotFoundError:
        raise TerminalError(f"source file {key!r} does not exist") from None
    return _Loaded(read_raw(key, data, mapping.paths, mapping.text_paths), modified)


# a group commit whose requests hold at most this many files reads them up front (with
# batch files of 5,000 records, at most 160,000 records: about one transform group's
# memory, ``transform_group_records``), and maps them in one pass if they hold at most this
# many records in all (see ``transform/together.py``)
TOGETHER_FILES = 32
TOGETHER_RECORDS = 20_000


@dataclass
class _Failed:
    """A file of a group that could not be read: raised when its request reaches it."""

    error: Exception


def _load_together(group: list[_Claimed], rt: Runtime) -> dict[str, _Loaded | _Failed]:
    """The files of a group of small requests of one source table, read up front (a file
    that cannot be read fails its own request only, when that request reaches it) and
    mapped in one pass; {} for any other group (each request reads its own files)."""
    keys = [key for claimed in group for key in claimed.files]
    first = group[0]
    if len(keys) > TOGETHER_FILES or len(set(keys)) < len(keys) or any(
            c.spec != first.spec for c in group[1:]):
        return {}
    mapping = CompiledMapping(first.spec, first.entity, rt.catalog.entities)

    def attempt(key: str) -> _Loaded | _Failed:
        try:
            return _load(key, mapping, rt)
        except Exception as exc:  # raised again by its own request
            return _Failed(exc)

    loaded = dict(zip(keys, prefetch(keys, attempt), strict=True))
    # the files of the requests whose every file could be read
    files = [item for c in group
             if all(isinstance(loaded[k], _Loaded) for k in c.files)
             for item in (loaded[k] for k in c.files) if isinstance(item, _Loaded)]
    if sum(f.raw.columns.num_rows for f in files) <= TOGETHER_RECORDS:
        for item, part in zip(files, map_together(mapping, [f.raw for f in files]),
                              strict=True):
            item.mapped = part
    return loaded


def _write(claimed: _Claimed, rt: Runtime,
           loaded: dict[str, _Loaded | _Failed] | None = None) -> _Run:
    """Map the request's files and write its rows (group by group); a terminal failure
    finishes it as failed and raises. ``loaded``: its files, read (and mapped) already
    with the other requests of a group commit."""
    request, entity, attempt = claimed.request, claimed.entity, claimed.attempt
    log.info("canonical transform starting", extra={
        "request_id": request.request_id, "table": request.table.label,
        "processing_mode": request.processing_mode.value,
        "source_files_count": len(claimed.files), "files_skipped": claimed.files_skipped,
        "attempt": attempt})
    mapping = CompiledMapping(claimed.spec, entity, rt.catalog.entities)
    skip: set[tuple[str, str]] = set()
    if attempt > 1:
        tables = [canonical_path(entity.name), QUARANTINE_TABLE]
        tables += [canonical_path(child.entity.name) for _, child in mapping.children]
        skip = {(name, g) for name in tables
                for g in rt.canonical.committed_groups(name, request.request_id)}
    run = _Run(request, rt, entity, mapping, skip)

    try:
        for item in ((loaded[key] for key in claimed.files) if loaded
                     else prefetch(claimed.files, lambda key: _load(key, mapping, rt))):
            if isinstance(item, _Failed):
                raise item.error
            run.add_file(item.raw, item.modified, item.mapped)
        run.flush()
        if request.reconcile:
            run.reconcile()
    except TerminalError as exc:
        rt.state.finish_request(request.request_id, None, error=str(exc), holder=rt.holder)
        raise
    return run


def _finish(written: list[tuple[_Claimed, _Run]], rt: Runtime) -> list[TransformResult]:
    """Account each request, record its files in the ledger, move its table's cursor,
    finish it (settling its job): one state-store step for all of them (a group commit's
    requests end together); then compact their tenants' partitions where they need it."""
    ends = [_ended(claimed, run) for claimed, run in written]
    finished = rt.state.finish_requests(ends, holder=rt.holder)
    for (claimed, run), (result, _), ok in zip(written, ends, finished, strict=True):
        request = claimed.request
        with logs.bind(tenant_id=request.tenant_id, job_id=request.job_id,
                       request_id=request.request_id):
            if not ok:
                log.warning("transform finished after another worker took its request "
                            "over; that worker's outcome stands",
                            extra={"request_id": request.request_id})
            log.info("canonical transform finished", extra=result.model_dump(mode="json"))
            if run.written:
                children = [c.entity.name for _, c in run.mapping.children]
                # a first load written in one upsert left the partition the files of that
                # upsert: too few to compact, and counting them lists every file of the table
                first_load = run.held_before is False and run.group_index <= 1
                compact(rt, request.tenant_id,
                        children if first_load else [claimed.entity.name, *children])
    return [result for result, _ in ends]


def _ended(claimed: _Claimed, run: _Run) -> tuple[TransformResult, Progress]:
    """A written request's result, and what it moves forward: its files into the ledger,
    its table's incremental mark (an incremental sync moves on only once the table's
    transform has succeeded)."""
    request, entity = claimed.request, claimed.entity
    result = TransformResult(
        request_id=request.request_id, tenant_id=request.tenant_id,
        service_name=request.service_name, table_name=request.table_name, entity=entity.name,
        processing_mode=request.processing_mode, files_read=len(claimed.files),
        records_read=run.read, records_written=run.written,
        records_quarantined=run.quarantined, records_merged=run.merged,
        child_rows_written=run.child_rows, child_rows_rejected=run.child_rejected,
        fields_nulled=run.nulled, records_deleted=run.deleted,
        files_skipped=claimed.files_skipped,
        seconds=round(time.perf_counter() - claimed.started, 4),
        high_water=_iso(run.high_water), started_at=round(claimed.started_at, 3),
        finished_at=round(time.time(), 3), worker=worker_label(),
    )
    if run.read != run.written + run.quarantined + run.merged:
        log.error("record accounting mismatch", extra=result.model_dump(mode="json"))
    return result, Progress(request, claimed.files, result.high_water
                            if request.trigger == "aggregated" else None)


def compact(rt: Runtime, tenant_id: str, entities: list[str]) -> None:
    """Keep the tenant's partitions few-filed after a sync (best effort: a failure is
    logged, the transform stands, the next sync tries again)."""
    limit = rt.settings.compact_after_files
    if limit <= 0:
        return
    for name in entities:
        try:
            removed = rt.canonical.compact(canonical_path(name), tenant_id, limit)
        except CanonflowError as exc:
            log.warning("compaction failed", extra={"entity": name, "error": str(exc)})
            continue
        if removed:
            log.info("partition compacted", extra={"entity": name, "files_replaced": removed})
