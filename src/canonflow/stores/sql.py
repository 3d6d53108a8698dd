"""State store on SQL (SQLAlchemy Core): the schema and the atomic steps, dialect-neutral.

A backend module supplies the engine (and its transaction start); everything here runs in
short transactions, each one an atomic step of the coordination protocol.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from functools import cached_property
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import OperationalError, SQLAlchemyError

from canonflow import jsonio, retry
from canonflow.errors import ActiveJobExists, InvalidCompletion, StoreUnavailable, UnknownJob
from canonflow.model import (
    TERMINAL,
    ChunkResult,
    ChunkSpec,
    JobStatus,
    TableRef,
    TransformRequest,
    TransformResult,
    group_target,
)
from canonflow.redact import redact
from canonflow.stores import migrations
from canonflow.stores.state import (
    Activity,
    Backlog,
    Completion,
    JobEvent,
    JobRecord,
    Progress,
    RequestRecord,
)

TERMINAL_JOB = tuple(TERMINAL)
FINISHED_REQUEST = ("done", "failed", "cancelled")

metadata = sa.MetaData()

jobs = sa.Table(
    "jobs", metadata,
    sa.Column("job_id", sa.String(128), primary_key=True),
    sa.Column("tenant_id", sa.String(128), nullable=False),
    sa.Column("pipeline", sa.String(200), nullable=False),
    sa.Column("trigger_mode", sa.String(20), nullable=False),
    sa.Column("status", sa.String(24), nullable=False, index=True),
    sa.Column("outcome", sa.String(24)),
    sa.Column("total_chunks", sa.Integer, nullable=False),
    sa.Column("completed_chunks", sa.Integer, nullable=False, default=0),
    sa.Column("failed_chunks", sa.Integer, nullable=False, default=0),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("updated_at", sa.Float, nullable=False),
    sa.Column("report", sa.Text),
    sa.Column("runner", sa.String(200)),  # the runner's lease name (see JobRunner)
)
chunks = sa.Table(
    "chunks", metadata,
    sa.Column("job_id", sa.String(128), primary_key=True),
    sa.Column("chunk_id", sa.String(128), primary_key=True),
    sa.Column("spec", sa.Text, nullable=False),
)
chunk_results = sa.Table(
    "chunk_results", metadata,
    sa.Column("job_id", sa.String(128), primary_key=True),
    sa.Column("chunk_id", sa.String(128), primary_key=True),
    sa.Column("completed", sa.Boolean, nullable=False),
    sa.Column("result", sa.Text, nullable=False),
    sa.Column("recorded_at", sa.Float, nullable=False),
)
outbox = sa.Table(
    "outbox", metadata,
    sa.Column("request_id", sa.String(400), primary_key=True),
    sa.Column("job_id", sa.String(128), index=True),
    sa.Column("trigger", sa.String(20), nullable=False),
    sa.Column("payload", sa.Text, nullable=False),
    sa.Column("status", sa.String(16), nullable=False, index=True),
    sa.Column("attempts", sa.Integer, nullable=False, default=0),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("updated_at", sa.Float, nullable=False),
    sa.Column("result", sa.Text),
    sa.Column("error", sa.Text),
    sa.Column("holder", sa.String(200)),  # who runs it now (host:pid:token)
    # the request's source table, ``service:table``: what a group commit looks up
    sa.Column("target", sa.String(300)),
    sa.Index("ix_outbox_status_created_at", "status", "created_at"),
    sa.Index("ix_outbox_target_status", "target", "status"),
)
ledger = sa.Table(
    "ledger", metadata,
    sa.Column("tenant_id", sa.String(128), primary_key=True),
    sa.Column("service_name", sa.String(128), primary_key=True),
    sa.Column("table_name", sa.String(128), primary_key=True),
    sa.Column("file_key", sa.String(1024), primary_key=True),
    sa.Column("request_id", sa.String(400), nullable=False),
    sa.Column("processed_at", sa.Float, nullable=False),
)

sync_cursors = sa.Table(
    "sync_cursors", metadata,
    sa.Column("tenant_id", sa.String(128), primary_key=True),
    sa.Column("service_name", sa.String(128), primary_key=True),
    sa.Column("table_name", sa.String(128), primary_key=True),
    sa.Column("value", sa.String(64), nullable=False),
    sa.Column("job_id", sa.String(128)),
    sa.Column("updated_at", sa.Float, nullable=False),
)
checkpoints = sa.Table(
    "checkpoints", metadata,
    sa.Column("job_id", sa.String(128), primary_key=True),
    sa.Column("chunk_id", sa.String(128), primary_key=True),
    sa.Column("state", sa.Text, nullable=False),
    sa.Column("updated_at", sa.Float, nullable=False),
)
locks = sa.Table(
    "locks", metadata,
    sa.Column("name", sa.String(400), primary_key=True),
    sa.Column("holder", sa.String(200), nullable=False),
    sa.Column("expires_at", sa.Float, nullable=False),
)

active_jobs = sa.Table(  # at most one unfinished job per (pipeline, tenant) for runners
    "active_jobs", metadata,
    sa.Column("pipeline", sa.String(200), primary_key=True),
    sa.Column("tenant_id", sa.String(128), primary_key=True),
    sa.Column("job_id", sa.String(128), nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
)
job_events = sa.Table(  # what an operator must see: superseded results, conflicts, cancels
    "job_events", metadata,
    sa.Column("event_id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("job_id", sa.String(128), nullable=False, index=True),
    sa.Column("at", sa.Float, nullable=False),
    sa.Column("kind", sa.String(40), nullable=False),
    sa.Column("chunk_id", sa.String(128)),
    sa.Column("detail", sa.Text, nullable=False),
)

InsertFactory = Callable[[sa.Table], Any]  # dialect insert() with on_conflict_do_nothing


# The statements of the steps every chunk and request takes, built once: building a
# statement costs SQLAlchemy several times what executing it costs SQLite. Values are bound
# at execution (``b_*`` parameters).
_LOCK_JOB = sa.select(jobs.c.status, jobs.c.completed_chunks, jobs.c.total_chunks,
                      jobs.c.outcome).where(jobs.c.job_id == sa.bindparam("b_job")
                                            ).with_for_update()
_CHUNK_SPEC = sa.select(chunks.c.spec).where(chunks.c.job_id == sa.bindparam("b_job"),
                                             chunks.c.chunk_id == sa.bindparam("b_chunk"))
_COUNT_CHUNK = jobs.update().where(jobs.c.job_id == sa.bindparam("b_job")).values(
    completed_chunks=jobs.c.completed_chunks + 1,
    failed_chunks=jobs.c.failed_chunks + sa.bindparam("b_failed"),
    updated_at=sa.bindparam("b_now"),
).returning(jobs.c.completed_chunks, jobs.c.total_chunks)
_CLAIM_JOB = jobs.update().where(
    jobs.c.job_id == sa.bindparam("b_job"), jobs.c.status == JobStatus.RUNNING.value,
).values(status=JobStatus.AGGREGATING.value, updated_at=sa.bindparam("b_now"))
# a job's requests still open, and failed ones
_OPEN_AND_FAILED = sa.select(
    sa.func.coalesce(sa.func.sum(sa.case(
        (outbox.c.status.notin_(FINISHED_REQUEST), 1), else_=0)), 0),
    sa.func.coalesce(sa.func.sum(sa.case((outbox.c.status == "failed", 1), else_=0)), 0),
).where(outbox.c.job_id == sa.bindparam("b_job"))
_SETTLE = jobs.update().where(
    jobs.c.job_id == sa.bindparam("b_job"),
    jobs.c.status == JobStatus.TRANSFORMS_ENQUEUED.value,
).values(status=sa.bindparam("b_status"), updated_at=sa.bindparam("b_now"))
_NOT_ACTIVE = active_jobs.delete().where(active_jobs.c.job_id == sa.bindparam("b_job"))
_END_VALUES: dict[str, Any] = {
    "status": sa.bindparam("b_status"), "result": sa.bindparam("b_result"),
    "error": sa.bindparam("b_error"), "updated_at": sa.bindparam("b_now")}
_END_REQUEST = outbox.update().where(outbox.c.request_id == sa.bindparam("b_request")).values(
    _END_VALUES).returning(outbox.c.job_id)
_END_HELD_REQUEST = outbox.update().where(
    outbox.c.request_id == sa.bindparam("b_request"), outbox.c.status == "running",
    outbox.c.holder == sa.bindparam("b_holder")).values(_END_VALUES).returning(outbox.c.job_id)
_JOBS_OF_REQUESTS = sa.select(outbox.c.job_id).where(
    outbox.c.request_id.in_(sa.bindparam("b_requests", expanding=True)))
_REQUEST = sa.select(outbox).where(outbox.c.request_id == sa.bindparam("b_request"))
_JOB_OF_REQUEST = sa.select(outbox.c.job_id).where(
    outbox.c.request_id == sa.bindparam("b_request"))
_CHECKPOINT = sa.select(checkpoints.c.state).where(
    checkpoints.c.job_id == sa.bindparam("b_job"),
    checkpoints.c.chunk_id == sa.bindparam("b_chunk"))


READ_ONLY = "canonflow_read_only"  # an execution option: the transaction only reads
LEDGER_BATCH = 500  # file keys per ledger look-up (bound parameters stay few)


def _now() -> float:
    return time.time()


def _dt(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, tz=UTC)


@dataclass
class _Job:
    """A job's row as a transaction that locked it sees it (and keeps it, as it moves it)."""

    status: str
    completed_chunks: int
    total_chunks: int
    outcome: str | None


class SqlStateStore:
    """The protocol's atomic steps in portable SQL; see docs/architecture.md."""

    def __init__(self, url: str, engine: Engine, insert: InsertFactory) -> None:
        self.url = url
        self._engine = engine
        self._insert = insert
        self._run(self._create_schema)

    def _create_schema(self, conn: Connection) -> None:
        """The schema is created or migrated on first use (``canonflow db upgrade`` does it
        explicitly): see :mod:`canonflow.stores.migrations`."""
        migrations.upgrade(conn)

    # -- plumbing ---------------------------------------------------------------------------
    def _run(self, step: Callable[[Connection], Any], attempts: int = 8,
             engine: Engine | None = None) -> Any:
        """Run one atomic step in its own transaction, retrying only a busy database."""
        def once() -> Any:
            with (engine or self._engine).begin() as conn:
                return step(conn)

        try:
            return retry.state((OperationalError,), attempts)(once)
        except OperationalError as exc:
            raise StoreUnavailable(
                f"state store {self._safe_url()} unavailable: {redact(str(exc.orig))}"
            ) from exc
        except SQLAlchemyError as exc:
            raise StoreUnavailable(
                f"state store {self._safe_url()} failed: {type(exc).__name__}"
            ) from exc

    def _read(self, step: Callable[[Connection], Any]) -> Any:
        """Run a step that only reads, in a transaction marked ``READ_ONLY`` (SQLite does
        not queue it behind the writers: WAL readers see a snapshot)."""
        return self._run(step, engine=self._reader)

    @cached_property
    def _record_result(self) -> Any:
        """A chunk's result, unless one is recorded (RETURNING, not rowcount: drivers
        disagree on rowcount for ON CONFLICT)."""
        return self._insert(chunk_results).values(
            job_id=sa.bindparam("b_job"), chunk_id=sa.bindparam("b_chunk"),
            completed=sa.bindparam("b_completed"), result=sa.bindparam("b_result"),
            recorded_at=sa.bindparam("b_now"),
        ).on_conflict_do_nothing().returning(chunk_results.c.chunk_id)

    @cached_property
    def _move_cursor(self) -> Any:
        """A table's high-water mark set, or moved forward (never back)."""
        stmt = self._insert(sync_cursors).values(
            tenant_id=sa.bindparam("b_tenant"), service_name=sa.bindparam("b_service"),
            table_name=sa.bindparam("b_table"), value=sa.bindparam("b_value"),
            job_id=sa.bindparam("b_job"), updated_at=sa.bindparam("b_now"))
        return stmt.on_conflict_do_update(
            index_elements=[sync_cursors.c.tenant_id, sync_cursors.c.service_name,
                            sync_cursors.c.table_name],
            set_={"value": stmt.excluded.value, "job_id": stmt.excluded.job_id,
                  "updated_at": stmt.excluded.updated_at},
            where=sync_cursors.c.value < stmt.excluded.value,
        ).returning(sync_cursors.c.value)

    @cached_property
    def _reader(self) -> Engine:
        return self._engine.execution_options(**{READ_ONLY: True})

    def _lock_job(self, conn: Connection, job_id: str) -> _Job | None:
        """Serialize on the job's row for the rest of the transaction (PostgreSQL: a row
        lock; SQLite: the database write lock ``BEGIN IMMEDIATE`` holds already); the row
        as it stands."""
        row = conn.execute(_LOCK_JOB, {"b_job": job_id}).one_or_none()
        return None if row is None else _Job(row.status, row.completed_chunks,
                                             row.total_chunks, row.outcome)

    def _event(self, conn: Connection, job_id: str, kind: str, detail: str,
               chunk_id: str | None = None, now: float | None = None) -> None:
        conn.execute(job_events.insert().values(
            job_id=job_id, at=now or _now(), kind=kind, chunk_id=chunk_id,
            detail=redact(detail)))

    def upgrade(self) -> None:
        self._run(self._create_schema)

    def _safe_url(self) -> str:
        return self._engine.url.render_as_string(hide_password=True)

    def close(self) -> None:
        self._engine.dispose()

    # -- jobs and chunks --------------------------------------------------------------------
    def create_job(
        self, job_id: str, tenant_id: str, pipeline: str, trigger_mode: str,
        chunks_: Sequence[ChunkSpec], runner: str | None = None, exclusive: bool = False,
    ) -> None:
        now = _now()

        def step(conn: Connection) -> None:
            if exclusive:
                taken = conn.execute(
                    self._insert(active_jobs).values(
                        pipeline=pipeline, tenant_id=tenant_id, job_id=job_id, created_at=now)
                    .on_conflict_do_nothing().returning(active_jobs.c.job_id)
                ).first()
                if taken is None:
                    other = conn.execute(sa.select(active_jobs.c.job_id).where(
                        active_jobs.c.pipeline == pipeline,
                        active_jobs.c.tenant_id == tenant_id)).scalar_one()
                    raise ActiveJobExists(other, f"tenant {tenant_id!r} of pipeline "
                                          f"{pipeline!r} already has an unfinished job {other}")
            conn.execute(jobs.insert().values(
                job_id=job_id, tenant_id=tenant_id, pipeline=pipeline,
                trigger_mode=trigger_mode, status=JobStatus.RUNNING.value,
                total_chunks=len(chunks_), completed_chunks=0, failed_chunks=0,
                created_at=now, updated_at=now, runner=runner,
            ))
            if chunks_:
                conn.execute(chunks.insert(), [
                    {"job_id": job_id, "chunk_id": c.chunk_id, "spec": c.model_dump_json()}
                    for c in chunks_
                ])

        self._run(step)

    def record_failed_job(self, job_id: str, tenant_id: str, pipeline: str,
                          trigger_mode: str, error: str) -> None:
        """A job that could not even be planned (bad credentials, an API down): recorded as
        failed with its reason, so ``status`` shows it and the other tenants go on."""
        now = _now()
        report = jsonio.dumps_str({"tables": {}, "error": redact(error)})
        self._run(lambda c: c.execute(jobs.insert().values(
            job_id=job_id, tenant_id=tenant_id, pipeline=pipeline, trigger_mode=trigger_mode,
            status=JobStatus.FAILED.value, outcome="failed", total_chunks=0,
            completed_chunks=0, failed_chunks=0, created_at=now, updated_at=now,
            report=report)))

    def active_job(self, pipeline: str, tenant_id: str) -> str | None:
        row = self._read(lambda c: c.execute(sa.select(active_jobs.c.job_id).where(
            active_jobs.c.pipeline == pipeline, active_jobs.c.tenant_id == tenant_id)).first())
        return None if row is None else str(row.job_id)

    def adopt_job(self, job_id: str, runner: str, previous: str | None) -> bool:
        """Become the runner of an unfinished job whose runner was ``previous`` (a dead
        one); only one adopter wins."""
        now = _now()
        cond = jobs.c.runner.is_(None) if previous is None else jobs.c.runner == previous
        return bool(self._run(lambda c: c.execute(jobs.update().where(
            jobs.c.job_id == job_id, cond, jobs.c.status.notin_(TERMINAL_JOB),
        ).values(runner=runner, updated_at=now)).rowcount == 1))

    def complete_chunk(self, result: ChunkResult) -> Completion:
        """Record one chunk result. The rule for a chunk reported more than once:
        a success never gives way to a failure; before the job is claimed, a successful
        retry supersedes a recorded failure, and a success whose file list differs from
        the recorded one supersedes it too (its files are what the store holds now) and is
        reported as a conflict; after the claim, late results change nothing and are
        reported. Results for chunks that are not part of the job are refused."""
        now = _now()
        completion: Completion = self._run(lambda c: self._complete(c, result, now))
        return completion

    def complete_chunks(self, results: Sequence[ChunkResult]) -> list[Completion]:
        """Several chunk results (the chunks one task ran) recorded in one transaction,
        each as :meth:`complete_chunk` would in that order; their jobs' rows locked first,
        in one order. A refused result refuses them all (nothing recorded)."""
        now = _now()

        def step(conn: Connection) -> list[Completion]:
            locked = {job_id: self._lock_job(conn, job_id)
                      for job_id in sorted({r.job_id for r in results})}
            return [self._complete(conn, result, now, locked[result.job_id])
                    for result in results]

        completions: list[Completion] = self._run(step)
        return completions

    def _complete(self, conn: Connection, result: ChunkResult, now: float,
                  job: _Job | None = None) -> Completion:
        """One chunk result recorded (see :meth:`complete_chunk`), in ``conn``'s
        transaction; ``job``: its job's row, if this transaction locked it already (kept
        as this step moves it)."""
        job = job or self._lock_job(conn, result.job_id)
        if job is None:
            raise UnknownJob(f"unknown job {result.job_id!r}")
        spec_row = conn.execute(_CHUNK_SPEC, {"b_job": result.job_id,
                                              "b_chunk": result.chunk_id}).one_or_none()
        if spec_row is None:
            raise InvalidCompletion(
                f"chunk {result.chunk_id!r} is not part of job {result.job_id!r}")
        # the spec's table, compared as stored (validating the whole spec again costs more
        # than the rest of this step)
        table = jsonio.loads(spec_row.spec)["table"]
        if table != result.table_metadata.model_dump(mode="json"):
            raise InvalidCompletion(
                f"chunk {result.chunk_id!r} of job {result.job_id!r} belongs to "
                f"{TableRef.model_validate(table).label}, not {result.table_metadata.label}")
        inserted = conn.execute(self._record_result, {
            "b_job": result.job_id, "b_chunk": result.chunk_id, "b_completed": result.completed,
            "b_result": result.model_dump_json(), "b_now": now}).first()
        if inserted is None:
            return self._repeat_completion(conn, result, job, now)
        row = conn.execute(_COUNT_CHUNK, {"b_job": result.job_id, "b_now": now,
                                          "b_failed": 0 if result.completed else 1}).one()
        job.completed_chunks = row.completed_chunks
        claimed = False
        if row.completed_chunks >= row.total_chunks:
            claimed = conn.execute(_CLAIM_JOB, {"b_job": result.job_id,
                                                "b_now": now}).rowcount == 1
            if claimed:
                job.status = JobStatus.AGGREGATING.value
        return Completion(True, row.completed_chunks, row.total_chunks, claimed)

    def _repeat_completion(self, conn: Connection, result: ChunkResult, job: _Job,
                           now: float) -> Completion:
        """A second result for a recorded chunk (the job row is locked)."""
        recorded = ChunkResult.model_validate_json(conn.execute(
            sa.select(chunk_results.c.result).where(
                chunk_results.c.job_id == result.job_id,
                chunk_results.c.chunk_id == result.chunk_id)).scalar_one())
        same = Completion(False, job.completed_chunks, job.total_chunks, False)
        if not result.completed or (
                recorded.completed and recorded.s3_files_written == result.s3_files_written):
            return same  # a plain duplicate, or a failure after a success: nothing changes
        kind = "retry_succeeded" if not recorded.completed else "conflicting_success"
        detail = (f"a failed result ({recorded.error.message if recorded.error else '?'}) "
                  "superseded by a successful retry" if not recorded.completed else
                  f"a second success with {result.s3_files_count} file(s) "
                  f"({result.records_processed} records) instead of "
                  f"{recorded.s3_files_count} ({recorded.records_processed} records)")
        if job.status != JobStatus.RUNNING.value:
            self._event(conn, result.job_id, f"late_{kind}",
                        f"{detail}, after the job was aggregated: not used", result.chunk_id,
                        now)
            return same
        conn.execute(chunk_results.update().where(
            chunk_results.c.job_id == result.job_id,
            chunk_results.c.chunk_id == result.chunk_id,
        ).values(completed=True, result=result.model_dump_json(), recorded_at=now))
        if not recorded.completed:
            conn.execute(jobs.update().where(jobs.c.job_id == result.job_id).values(
                failed_chunks=jobs.c.failed_chunks - 1, updated_at=now))
        self._event(conn, result.job_id, kind, detail, result.chunk_id, now)
        return Completion(False, job.completed_chunks, job.total_chunks, False, superseded=True)

    def events(self, job_id: str) -> list[JobEvent]:
        rows = self._read(lambda c: c.execute(
            sa.select(job_events).where(job_events.c.job_id == job_id)
            .order_by(job_events.c.event_id)).all())
        return [JobEvent(at=_dt(r.at), kind=r.kind, chunk_id=r.chunk_id, detail=r.detail)
                for r in rows]

    def cancel_job(self, job_id: str, reason: str) -> bool:
        """Stop an unfinished job: no aggregation, no transform that has not started."""
        now = _now()

        def step(conn: Connection) -> bool:
            job = self._lock_job(conn, job_id)
            if job is None:
                raise UnknownJob(f"unknown job {job_id!r}")
            if job.status in TERMINAL_JOB:
                return False
            conn.execute(jobs.update().where(jobs.c.job_id == job_id).values(
                status=JobStatus.CANCELLED.value, outcome=sa.func.coalesce(
                    jobs.c.outcome, "cancelled"), updated_at=now))
            conn.execute(outbox.update().where(
                outbox.c.job_id == job_id, outbox.c.status.in_(["pending", "dispatched"]),
            ).values(status="cancelled", error=redact(reason), updated_at=now))
            conn.execute(active_jobs.delete().where(active_jobs.c.job_id == job_id))
            self._event(conn, job_id, "cancelled", reason, now=now)
            return True

        cancelled: bool = self._run(step)
        return cancelled

    def chunk_specs(self, job_id: str) -> list[ChunkSpec]:
        rows = self._read(lambda c: c.execute(
            sa.select(chunks.c.spec).where(chunks.c.job_id == job_id).order_by(chunks.c.chunk_id)
        ).all())
        return [ChunkSpec.model_validate_json(r.spec) for r in rows]

    def chunk_results(self, job_id: str) -> list[ChunkResult]:
        rows = self._read(lambda c: c.execute(
            sa.select(chunk_results.c.result).where(chunk_results.c.job_id == job_id)
            .order_by(chunk_results.c.chunk_id)
        ).all())
        return [ChunkResult.model_validate_json(r.result) for r in rows]

    def _rows_for(self, requests: Sequence[TransformRequest], now: float) -> list[dict[str, Any]]:
        return [{
            "request_id": r.request_id, "job_id": r.job_id, "trigger": r.trigger,
            "payload": jsonio.dumps_str(r.payload()), "status": "pending", "attempts": 0,
            "created_at": now, "updated_at": now, "target": group_target(r),
        } for r in requests]

    def finish_aggregation(
        self, job_id: str, outcome: str, requests: Sequence[TransformRequest],
        report: dict[str, Any],
    ) -> bool:
        now = _now()

        def step(conn: Connection) -> bool:
            job = self._lock_job(conn, job_id)  # a cancel in between must win: no rows
            if job is None or job.status != JobStatus.AGGREGATING.value:
                return False
            if requests:
                conn.execute(
                    self._insert(outbox).on_conflict_do_nothing(), self._rows_for(requests, now)
                )
            moved = conn.execute(
                jobs.update().where(
                    jobs.c.job_id == job_id, jobs.c.status == JobStatus.AGGREGATING.value
                ).values(
                    status=JobStatus.TRANSFORMS_ENQUEUED.value, outcome=outcome,
                    report=jsonio.dumps_str(report), updated_at=now,
                )
            ).rowcount == 1
            if moved:
                self._settle_job(conn, job_id, now, replace(
                    job, status=JobStatus.TRANSFORMS_ENQUEUED.value, outcome=outcome))
            return moved

        moved: bool = self._run(step)
        return moved

    def _settle_job(self, conn: Connection, job_id: str, now: float,
                    job: _Job | None = None) -> bool:
        """Move a job to done/failed once none of its transform requests is open.

        Locks the job's row first (``job``: its row, when this transaction locked it
        already): two transforms finishing at the same instant each see the other's row
        still open under READ COMMITTED unless they take turns here; the second one counts
        again after the first committed, and settles."""
        job = job or self._lock_job(conn, job_id)
        if job is None or job.status != JobStatus.TRANSFORMS_ENQUEUED.value:
            return False
        open_rows, failed = conn.execute(_OPEN_AND_FAILED, {"b_job": job_id}).one()
        if open_rows:
            return False
        final = JobStatus.FAILED if failed or job.outcome == "failed" else JobStatus.DONE
        moved = conn.execute(_SETTLE, {"b_job": job_id, "b_status": final.value,
                                       "b_now": now}).rowcount == 1
        if moved:
            conn.execute(_NOT_ACTIVE, {"b_job": job_id})
            job.status = final.value
        return moved

    def settle_jobs(self, job_ids: Collection[str] | None = None) -> list[str]:
        """The sweeper's settle: every job whose transform requests are all finished while
        the job is not; the ids of the jobs it moved."""
        open_req = sa.select(outbox.c.job_id).where(
            outbox.c.job_id == jobs.c.job_id, outbox.c.status.notin_(FINISHED_REQUEST))
        query = sa.select(jobs.c.job_id).where(
            jobs.c.status == JobStatus.TRANSFORMS_ENQUEUED.value, ~sa.exists(open_req))
        if job_ids is not None:
            query = query.where(jobs.c.job_id.in_(list(job_ids)))
        candidates = [r.job_id for r in self._read(lambda c: c.execute(query).all())]
        settled = []
        for job_id in candidates:
            def step(conn: Connection, job_id: str = job_id) -> bool:
                return self._settle_job(conn, job_id, _now())

            if self._run(step):
                settled.append(job_id)
        return settled

    def stuck_jobs(self, older_than: float) -> list[str]:
        cutoff = _now() - older_than
        rows = self._read(lambda c: c.execute(
            sa.select(jobs.c.job_id).where(
                sa.or_(
                    sa.and_(jobs.c.status == JobStatus.RUNNING.value,
                            jobs.c.completed_chunks >= jobs.c.total_chunks),
                    jobs.c.status == JobStatus.AGGREGATING.value,
                ),
                jobs.c.updated_at < cutoff,
            )
        ).all())
        return [r.job_id for r in rows]

    def reclaim_aggregation(self, job_id: str, older_than: float) -> bool:
        """The sweeper's claim on a stuck job: same conditional change, one winner."""
        now = _now()

        def step(conn: Connection) -> bool:
            return bool(conn.execute(
                jobs.update().where(
                    jobs.c.job_id == job_id,
                    jobs.c.status.in_([JobStatus.RUNNING.value, JobStatus.AGGREGATING.value]),
                    jobs.c.completed_chunks >= jobs.c.total_chunks,
                    jobs.c.updated_at < now - older_than,
                ).values(status=JobStatus.AGGREGATING.value, updated_at=now)
            ).rowcount == 1)

        claimed: bool = self._run(step)
        return claimed

    # -- transform outbox -------------------------------------------------------------------
    def enqueue_request(self, request: TransformRequest) -> bool:
        now = _now()
        inserted = self._run(lambda c: c.execute(
            self._insert(outbox).values(**self._rows_for([request], now)[0])
            .on_conflict_do_nothing().returning(outbox.c.request_id)
        ).first())
        return inserted is not None

    def claim_for_dispatch(
        self, limit: int = 100, redispatch_after: float | None = None,
        lease_seconds: float | None = None, job_ids: Collection[str] | None = None,
        max_attempts: int | None = None, pipeline: str | None = None,
    ) -> list[TransformRequest]:
        now = _now()
        conds = [outbox.c.status == "pending"]
        if redispatch_after is not None:
            conds.append(sa.and_(outbox.c.status == "dispatched",
                                 outbox.c.updated_at < now - redispatch_after))
        if lease_seconds is not None:
            conds.append(sa.and_(outbox.c.status == "running",
                                 outbox.c.updated_at < now - lease_seconds))

        where = sa.or_(*conds)
        if job_ids is not None:
            where = sa.and_(where, outbox.c.job_id.in_(list(job_ids)))
        if pipeline is not None:  # only this pipeline's jobs (and manual requests)
            where = sa.and_(where, sa.or_(outbox.c.job_id.is_(None), outbox.c.job_id.in_(
                sa.select(jobs.c.job_id).where(jobs.c.pipeline == pipeline))))

        def step(conn: Connection) -> list[TransformRequest]:
            rows = conn.execute(
                self._lock_rows(
                    sa.select(outbox.c.request_id, outbox.c.payload, outbox.c.status,
                              outbox.c.attempts, outbox.c.job_id, outbox.c.error)
                    .where(where).order_by(outbox.c.created_at).limit(limit)
                )
            ).all()
            spent = [r for r in rows if max_attempts is not None and r.attempts >= max_attempts]
            for r in spent:  # abandoned after its last attempt: fail it, visibly
                conn.execute(outbox.update().where(outbox.c.request_id == r.request_id).values(
                    status="failed", updated_at=now,
                    error=f"gave up after {r.attempts} attempt(s); last error: "
                          f"{r.error or 'the worker running it was lost'}"))
            for job_id in {r.job_id for r in spent if r.job_id is not None}:
                self._settle_job(conn, job_id, now)
            live = [r for r in rows if r not in spent]
            ids = [r.request_id for r in live if r.status != "running"]
            if ids:
                conn.execute(outbox.update().where(outbox.c.request_id.in_(ids))
                             .values(status="dispatched", updated_at=now))
            return [TransformRequest.model_validate_json(r.payload) for r in live]

        claimed: list[TransformRequest] = self._run(step)
        return claimed

    def outbox_backlog(self, pipeline: str | None = None) -> Backlog:
        where: sa.ColumnElement[bool] = outbox.c.status.in_(["pending", "dispatched"])
        if pipeline is not None:
            where = sa.and_(where, outbox.c.job_id.in_(
                sa.select(jobs.c.job_id).where(jobs.c.pipeline == pipeline)))
        row = self._read(lambda c: c.execute(
            sa.select(sa.func.count(), sa.func.min(outbox.c.created_at)).where(where)).one())
        oldest = None if row[1] is None else max(0.0, _now() - row[1])
        return Backlog(waiting=row[0], oldest_age=oldest)

    def _lock_rows(self, select: sa.Select[Any]) -> sa.Select[Any]:
        """Backends with row locks skip rows another relay holds (PostgreSQL)."""
        return select

    def claim_request(self, request_id: str, lease_seconds: float,
                      holder: str | None = None, holder_dead: Callable[[str], bool] | None = None,
                      max_attempts: int | None = None,
                      enqueue: TransformRequest | None = None) -> int | None:
        """Take a request for running: pending or dispatched, or running under a lease that
        expired or whose holder is known dead (``holder_dead``). The attempt number, or
        None if it is not claimable now. A request taken over after ``max_attempts`` (a
        poison request that kills its workers) fails instead, and its job settles. With
        ``enqueue`` (the request), its row is added first if the outbox has none, in the
        same transaction."""
        now = _now()

        def step(conn: Connection) -> int | None:
            if enqueue is not None:
                if enqueue.job_id is not None:
                    self._lock_job(conn, enqueue.job_id)
                conn.execute(self._insert(outbox).values(**self._rows_for([enqueue], now)[0])
                             .on_conflict_do_nothing())
            else:
                self._lock_request_job(conn, request_id)
            current = conn.execute(sa.select(
                outbox.c.status, outbox.c.holder, outbox.c.attempts, outbox.c.job_id,
                outbox.c.updated_at).where(outbox.c.request_id == request_id)).one_or_none()
            if (current is not None and max_attempts is not None
                    and current.attempts >= max_attempts and current.status == "running"
                    and (current.updated_at < now - lease_seconds or (
                        current.holder is not None and holder_dead is not None
                        and holder_dead(current.holder)))):
                conn.execute(outbox.update().where(outbox.c.request_id == request_id).values(
                    status="failed", updated_at=now, holder=None,
                    error=f"gave up after {current.attempts} attempt(s); the worker running "
                          "it was lost each time"))
                if current.job_id is not None:
                    self._settle_job(conn, current.job_id, now)
                return None
            takeover = (current is not None and current.status == "running"
                        and current.holder is not None and holder_dead is not None
                        and holder_dead(current.holder))
            claimable = [outbox.c.status.in_(["pending", "dispatched"]),
                         sa.and_(outbox.c.status == "running",
                                 outbox.c.updated_at < now - lease_seconds)]
            if takeover and current is not None:
                claimable.append(sa.and_(outbox.c.status == "running",
                                         outbox.c.holder == current.holder))
            row = conn.execute(
                outbox.update().where(outbox.c.request_id == request_id, sa.or_(*claimable))
                .values(status="running", attempts=outbox.c.attempts + 1, updated_at=now,
                        holder=holder)
                .returning(outbox.c.attempts)
            ).one_or_none()
            return None if row is None else int(row.attempts)

        attempt: int | None = self._run(step)
        return attempt

    def claim_group(self, request: TransformRequest, limit: int, lease_seconds: float,
                    holder: str, max_attempts: int, pipeline: str
                    ) -> list[tuple[TransformRequest, int]]:
        """Take up to ``limit`` more requests to run with ``request`` in one group commit:
        waiting ones (pending or dispatched) of the same source table and pipeline, with
        attempts left, oldest first, in one statement (PostgreSQL skips rows another
        claimer holds). Each with its attempt number; they run under ``holder`` as if
        claimed one by one with :meth:`claim_request`."""
        target = group_target(request)
        if target is None or limit <= 0:
            return []
        now = _now()
        waiting = self._lock_rows(
            sa.select(outbox.c.request_id).where(
                outbox.c.target == target, outbox.c.status.in_(["pending", "dispatched"]),
                outbox.c.request_id != request.request_id,
                outbox.c.attempts < max_attempts,
                outbox.c.job_id.in_(sa.select(jobs.c.job_id).where(
                    jobs.c.pipeline == pipeline)))
            .order_by(outbox.c.created_at).limit(limit))
        rows = self._run(lambda c: c.execute(
            outbox.update().where(outbox.c.request_id.in_(waiting.scalar_subquery()))
            .values(status="running", attempts=outbox.c.attempts + 1, updated_at=now,
                    holder=holder)
            .returning(outbox.c.payload, outbox.c.attempts)).all())
        return [(TransformRequest.model_validate_json(r.payload), int(r.attempts))
                for r in rows]

    def _lock_request_job(self, conn: Connection, request_id: str) -> None:
        """Lock the job row of a request before its outbox row: every step that touches
        both takes them in this order (a cancel does too), so none waits on the other."""
        job_id = conn.execute(_JOB_OF_REQUEST, {"b_request": request_id}).scalar_one_or_none()
        if job_id is not None:
            self._lock_job(conn, job_id)

    def touch_request(self, request_id: str, holder: str | None = None) -> bool:
        """Heartbeat of a running transform: its lease stays fresh while it works."""
        now = _now()
        cond = [outbox.c.request_id == request_id, outbox.c.status == "running"]
        if holder is not None:
            cond.append(outbox.c.holder == holder)
        return bool(self._run(lambda c: c.execute(
            outbox.update().where(*cond).values(updated_at=now)).rowcount == 1))

    def finish_request(
        self, request_id: str, result: TransformResult | None, error: str | None = None,
        holder: str | None = None, progress: Progress | None = None,
    ) -> bool:
        """Record a request's end (and settle its job), with its ``progress`` (ledger,
        incremental mark) in the same transaction. With ``holder``: only while that holder
        still has it; False when another one took it over meanwhile."""
        now = _now()

        def step(conn: Connection) -> bool:
            self._lock_request_job(conn, request_id)
            if progress is not None:
                self._record_files(conn, progress.request, progress.files, now)
            job_id = self._end_request(conn, request_id, result, error, holder, progress, now)
            if job_id:
                self._settle_job(conn, job_id, now)
            return job_id is not None

        finished: bool = self._run(step)
        return finished

    def finish_requests(self, ends: Sequence[tuple[TransformResult, Progress]],
                        holder: str) -> list[bool]:
        """A group commit's requests ended in one transaction: their jobs' rows locked in
        one order (two groups finishing together never wait on each other), their files
        into the ledger in one statement, each request ended as :meth:`finish_request`
        would, then each job settled once."""
        now = _now()
        ids = [result.request_id for result, _ in ends]

        def step(conn: Connection) -> list[bool]:
            job_ids = conn.execute(_JOBS_OF_REQUESTS, {"b_requests": ids}).scalars().all()
            locked = {job_id: self._lock_job(conn, job_id)
                      for job_id in sorted({j for j in job_ids if j is not None})}
            self._record_files_of(conn, [progress for _, progress in ends], now)
            ended, settle = [], set()
            for result, progress in sorted(ends, key=lambda e: e[1].request.table.label):
                job_id = self._end_request(conn, result.request_id, result, None, holder,
                                           progress, now)
                ended.append((result.request_id, job_id is not None))
                if job_id:
                    settle.add(job_id)
            for job_id in sorted(settle):
                self._settle_job(conn, job_id, now, locked.get(job_id))
            return [dict(ended)[request_id] for request_id in ids]

        finished: list[bool] = self._run(step)
        return finished

    def _end_request(self, conn: Connection, request_id: str, result: TransformResult | None,
                     error: str | None, holder: str | None, progress: Progress | None,
                     now: float) -> str | None:
        """Move the table's mark with ``progress``, then end the request's row (done, or
        failed with ``error``); with ``holder``, only while that holder has it. The job
        id of the row ended ("" for a request of no job), None if none was."""
        if progress is not None and progress.high_water is not None:
            self._advance_cursor(conn, progress.request.table, progress.high_water,
                                 progress.request.job_id, now)
        values = {"b_request": request_id, "b_status": "failed" if error else "done",
                  "b_result": result.model_dump_json() if result else None,
                  "b_error": redact(error) if error else None, "b_now": now}
        if holder is not None:
            values["b_holder"] = holder
        row = conn.execute(_END_REQUEST if holder is None else _END_HELD_REQUEST,
                           values).one_or_none()
        return None if row is None else row.job_id or ""

    def retry_later(self, request_id: str, error: str, max_attempts: int,
                    holder: str | None = None) -> bool:
        """Give a request back to the outbox after a retryable failure or a lost worker
        (running or dispatched), or fail it for good once it has had ``max_attempts``;
        True if it will be retried. With ``holder``: only while that holder has it."""
        now = _now()
        error = redact(error)

        def step(conn: Connection) -> bool:
            self._lock_request_job(conn, request_id)
            taken: sa.ColumnElement[bool] = outbox.c.status.in_(["running", "dispatched"])
            if holder is not None:  # not a row another holder runs now
                taken = sa.or_(outbox.c.status == "dispatched", sa.and_(
                    outbox.c.status == "running", outbox.c.holder == holder))
            # a failure before the claim (still "dispatched") uses up an attempt too
            attempts = outbox.c.attempts + sa.case(
                (outbox.c.status == "dispatched", 1), else_=0)
            conn.execute(outbox.update().where(outbox.c.request_id == request_id, taken)
                         .values(attempts=attempts))
            again = conn.execute(
                outbox.update().where(outbox.c.request_id == request_id, taken,
                                      outbox.c.attempts < max_attempts)
                .values(status="pending", error=error, updated_at=now, holder=None)
            ).rowcount == 1
            if not again:
                row = conn.execute(
                    outbox.update().where(outbox.c.request_id == request_id, taken)
                    .values(status="failed", updated_at=now, holder=None,
                            error=f"gave up after {max_attempts} attempt(s); "
                                  f"last error: {error}")
                    .returning(outbox.c.job_id)
                ).one_or_none()
                if row is not None and row.job_id is not None:
                    self._settle_job(conn, row.job_id, now)
            return again

        retried: bool = self._run(step)
        return retried

    def record_files(self, request: TransformRequest, keys: Sequence[str]) -> None:
        if keys:
            now = _now()
            self._run(lambda c: self._record_files(c, request, keys, now))

    def _record_files(self, conn: Connection, request: TransformRequest,
                      keys: Sequence[str], now: float) -> None:
        self._record_files_of(conn, [Progress(request, keys)], now)

    def _record_files_of(self, conn: Connection, progress: Sequence[Progress],
                         now: float) -> None:
        """The files of each request into the ledger, in one statement."""
        rows = [{
            "tenant_id": p.request.tenant_id, "service_name": p.request.service_name,
            "table_name": p.request.table_name, "file_key": k,
            "request_id": p.request.request_id, "processed_at": now,
        } for p in progress for k in p.files]
        if rows:
            conn.execute(self._insert(ledger).on_conflict_do_nothing(), rows)

    def processed_files(self, request: TransformRequest,
                        keys: Sequence[str] | None = None) -> set[str]:
        table = (ledger.c.tenant_id == request.tenant_id,
                 ledger.c.service_name == request.service_name,
                 ledger.c.table_name == request.table_name)
        if keys is None:
            rows = self._read(lambda c: c.execute(
                sa.select(ledger.c.file_key).where(*table)).all())
            return {r.file_key for r in rows}
        done: set[str] = set()
        for start in range(0, len(keys), LEDGER_BATCH):  # by primary key, a batch at a time
            query = sa.select(ledger.c.file_key).where(
                *table, ledger.c.file_key.in_(list(keys[start:start + LEDGER_BATCH])))
            done.update(r.file_key for r in self._rows(query))
        return done

    def _rows(self, query: sa.Select[Any]) -> list[Any]:
        rows: list[Any] = self._read(lambda c: c.execute(query).all())
        return rows

    def _request_record(self, row: Any) -> RequestRecord:
        return RequestRecord(
            request=TransformRequest.model_validate_json(row.payload),
            status=row.status, attempts=row.attempts,
            result=TransformResult.model_validate_json(row.result) if row.result else None,
            error=row.error, holder=row.holder,
        )

    def request(self, request_id: str) -> RequestRecord | None:
        row = self._read(lambda c: c.execute(_REQUEST, {"b_request": request_id}).one_or_none())
        return None if row is None else self._request_record(row)

    def requests(self, job_id: str) -> list[RequestRecord]:
        rows = self._read(lambda c: c.execute(
            sa.select(outbox).where(outbox.c.job_id == job_id).order_by(outbox.c.created_at)
        ).all())
        return [self._request_record(r) for r in rows]

    # -- incremental sync cursors -----------------------------------------------------------
    def sync_cursors(self, tables: Sequence[TableRef]) -> dict[TableRef, str]:
        wanted = set(tables)
        if not wanted:
            return {}
        c = sync_cursors.c
        rows = self._read(lambda conn: conn.execute(sa.select(
            c.tenant_id, c.service_name, c.table_name, c.value).where(
            c.tenant_id.in_({t.tenant_id for t in wanted}),
            c.service_name.in_({t.service_name for t in wanted}),
            c.table_name.in_({t.table_name for t in wanted}))).all())
        found = {TableRef(tenant_id=r.tenant_id, service_name=r.service_name,
                          table_name=r.table_name): str(r.value) for r in rows}
        return {t: v for t, v in found.items() if t in wanted}

    def advance_cursor(self, table: TableRef, value: str, job_id: str | None) -> bool:
        """Move the high-water mark forward (never back); True if it moved."""
        now = _now()
        moved: bool = self._run(lambda c: self._advance_cursor(c, table, value, job_id, now))
        return moved

    def _advance_cursor(self, conn: Connection, table: TableRef, value: str,
                        job_id: str | None, now: float) -> bool:
        return conn.execute(self._move_cursor, {
            "b_tenant": table.tenant_id, "b_service": table.service_name,
            "b_table": table.table_name, "b_value": value, "b_job": job_id, "b_now": now,
        }).first() is not None

    # -- chunk checkpoints ------------------------------------------------------------------
    def save_checkpoint(self, job_id: str, chunk_id: str, state: dict[str, Any]) -> None:
        now, text = _now(), jsonio.dumps_str(state)
        self._run(lambda c: c.execute(
            self._insert(checkpoints).values(job_id=job_id, chunk_id=chunk_id, state=text,
                                             updated_at=now)
            .on_conflict_do_update(index_elements=[checkpoints.c.job_id, checkpoints.c.chunk_id],
                                   set_={"state": text, "updated_at": now})))

    def load_checkpoint(self, job_id: str, chunk_id: str) -> dict[str, Any] | None:
        row = self._read(lambda c: c.execute(
            _CHECKPOINT, {"b_job": job_id, "b_chunk": chunk_id}).one_or_none())
        return None if row is None else dict(jsonio.loads(row.state))

    # -- leases -----------------------------------------------------------------------------
    def acquire_lock(self, name: str, holder: str, ttl: float,
                     steal_from: str | None = None) -> bool:
        """Take (or renew) a named lease; an expired lease can be taken over, and so can
        the lease of ``steal_from`` (a holder known to be dead)."""
        now = _now()

        def step(conn: Connection) -> bool:
            takeable = [locks.c.expires_at < now, locks.c.holder == holder]
            if steal_from is not None:
                takeable.append(locks.c.holder == steal_from)
            stmt = self._insert(locks).values(name=name, holder=holder, expires_at=now + ttl)
            stmt = stmt.on_conflict_do_update(
                index_elements=[locks.c.name],
                set_={"holder": holder, "expires_at": now + ttl},
                where=sa.or_(*takeable),
            ).returning(locks.c.holder)
            row = conn.execute(stmt).first()
            return row is not None and row.holder == holder

        acquired: bool = self._run(step)
        return acquired

    def renew_lock(self, name: str, holder: str, ttl: float) -> bool:
        """Extend a lease this holder still holds; False if it was lost (never re-taken):
        taken by another, or lapsed (others may have acted on its lapse: a runner's jobs
        adopted)."""
        now = _now()
        return bool(self._run(lambda c: c.execute(locks.update().where(
            locks.c.name == name, locks.c.holder == holder, locks.c.expires_at >= now,
        ).values(expires_at=now + ttl)).rowcount == 1))

    def lock_holder(self, name: str) -> tuple[str, float] | None:
        """Who holds a lease and until when (epoch seconds), expired or not."""
        row = self._read(lambda c: c.execute(
            sa.select(locks.c.holder, locks.c.expires_at).where(locks.c.name == name)).first())
        return None if row is None else (str(row.holder), float(row.expires_at))

    def live_locks(self, names: Collection[str]) -> dict[str, str]:
        """The unexpired leases among ``names``: name -> holder."""
        if not names:
            return {}
        now = _now()
        rows = self._read(lambda c: c.execute(sa.select(locks.c.name, locks.c.holder).where(
            locks.c.name.in_(list(names)), locks.c.expires_at >= now)).all())
        return {r.name: r.holder for r in rows}

    def release_lock(self, name: str, holder: str) -> None:
        self._run(lambda c: c.execute(
            locks.delete().where(locks.c.name == name, locks.c.holder == holder)))

    def acquire_locks(self, names: Collection[str], holder: str, ttl: float) -> set[str]:
        """One multi-row upsert; in name order, so two holders taking overlapping sets
        lock the rows in the same order (PostgreSQL cannot deadlock on them)."""
        wanted = sorted(set(names))
        if not wanted:
            return set()
        now = _now()

        def step(conn: Connection) -> set[str]:
            stmt = self._insert(locks).values(
                [{"name": n, "holder": holder, "expires_at": now + ttl} for n in wanted])
            stmt = stmt.on_conflict_do_update(
                index_elements=[locks.c.name],
                set_={"holder": holder, "expires_at": now + ttl},
                where=sa.or_(locks.c.expires_at < now, locks.c.holder == holder),
            ).returning(locks.c.name, locks.c.holder)
            return {r.name for r in conn.execute(stmt) if r.holder == holder}

        taken: set[str] = self._run(step)
        return taken

    def release_locks(self, names: Collection[str], holder: str) -> None:
        if names:
            self._run(lambda c: c.execute(locks.delete().where(
                locks.c.name.in_(sorted(names)), locks.c.holder == holder)))

    # -- reading jobs -----------------------------------------------------------------------
    @staticmethod
    def _job_record(row: Any) -> JobRecord:
        return JobRecord(
            job_id=row.job_id, tenant_id=row.tenant_id, pipeline=row.pipeline,
            trigger_mode=row.trigger_mode, status=row.status, outcome=row.outcome,
            total_chunks=row.total_chunks, completed_chunks=row.completed_chunks,
            failed_chunks=row.failed_chunks, created_at=_dt(row.created_at),
            updated_at=_dt(row.updated_at),
            report=jsonio.loads(row.report) if row.report else {},
            runner=row.runner,
        )

    def job(self, job_id: str) -> JobRecord | None:
        row = self._read(lambda c: c.execute(
            sa.select(jobs).where(jobs.c.job_id == job_id)
        ).one_or_none())
        return None if row is None else self._job_record(row)

    def unfinished_jobs(self, job_ids: Collection[str] | None = None) -> list[JobRecord]:
        """Jobs not done, failed or cancelled (optionally among ``job_ids``)."""
        query = sa.select(jobs).where(jobs.c.status.notin_(TERMINAL_JOB))
        if job_ids is not None:
            query = query.where(jobs.c.job_id.in_(list(job_ids)))
        rows = self._read(lambda c: c.execute(query.order_by(jobs.c.created_at)).all())
        return [self._job_record(r) for r in rows]

    def activity(self, job_ids: Collection[str], since: float) -> Activity:
        """What changed in these jobs after ``since`` (epoch seconds), in one transaction:
        chunk results recorded, transform requests written or moved, job rows moved. A
        runner polls this instead of every job's results and requests."""
        ids = list(job_ids)

        def step(conn: Connection) -> Activity:
            now = _now()
            results = [ChunkResult.model_validate_json(r.result) for r in conn.execute(
                sa.select(chunk_results.c.result).where(
                    chunk_results.c.job_id.in_(ids), chunk_results.c.recorded_at >= since)
            ).all()]
            requests = [self._request_record(r) for r in conn.execute(
                sa.select(outbox).where(outbox.c.job_id.in_(ids),
                                        outbox.c.updated_at >= since)).all()]
            moved = [self._job_record(r) for r in conn.execute(
                sa.select(jobs).where(jobs.c.job_id.in_(ids), jobs.c.updated_at >= since)
            ).all()]
            return Activity(now, results, requests, moved)

        activity: Activity = self._read(step)
        return activity

    def jobs(self, limit: int = 20) -> list[JobRecord]:
        rows = self._read(lambda c: c.execute(
            sa.select(jobs).order_by(jobs.c.created_at.desc()).limit(limit)
        ).all())
        return [self._job_record(r) for r in rows]
