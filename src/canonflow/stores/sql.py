"""State store on SQL (SQLAlchemy Core): the schema and the atomic steps, dialect-neutral.

A backend module supplies the engine (and its transaction start); everything here runs in
short transactions, each one an atomic step of the coordination protocol.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Sequence
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import OperationalError, SQLAlchemyError

from canonflow import jsonio
from canonflow.errors import StoreUnavailable, UnknownJob
from canonflow.model import (
    ChunkResult,
    ChunkSpec,
    JobStatus,
    TableRef,
    TransformRequest,
    TransformResult,
)
from canonflow.stores.state import Completion, JobRecord, RequestRecord

metadata = sa.MetaData()

jobs = sa.Table(
    "jobs", metadata,
    sa.Column("job_id", sa.String(128), primary_key=True),
    sa.Column("tenant_id", sa.String(128), nullable=False),
    sa.Column("pipeline", sa.String(200), nullable=False),
    sa.Column("trigger_mode", sa.String(20), nullable=False),
    sa.Column("status", sa.String(24), nullable=False),
    sa.Column("outcome", sa.String(24)),
    sa.Column("total_chunks", sa.Integer, nullable=False),
    sa.Column("completed_chunks", sa.Integer, nullable=False, default=0),
    sa.Column("failed_chunks", sa.Integer, nullable=False, default=0),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("updated_at", sa.Float, nullable=False),
    sa.Column("report", sa.Text),
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

InsertFactory = Callable[[sa.Table], Any]  # dialect insert() with on_conflict_do_nothing


def _now() -> float:
    return time.time()


def _dt(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, tz=UTC)


class SqlStateStore:
    """The protocol's atomic steps in portable SQL; see docs/architecture.md."""

    def __init__(self, url: str, engine: Engine, insert: InsertFactory) -> None:
        self.url = url
        self._engine = engine
        self._insert = insert
        self._run(self._create_schema)

    def _create_schema(self, conn: Connection) -> None:
        """Tables are created on first use (``canonflow db upgrade`` does it explicitly)."""
        metadata.create_all(conn)

    # -- plumbing ---------------------------------------------------------------------------
    def _run(self, step: Callable[[Connection], Any], attempts: int = 8) -> Any:
        """Run one atomic step in its own transaction, retrying only a busy database."""
        delay = 0.02
        for attempt in range(attempts):
            try:
                with self._engine.begin() as conn:
                    return step(conn)
            except OperationalError as exc:
                if attempt == attempts - 1:
                    raise StoreUnavailable(
                        f"state store {self._safe_url()} unavailable: {exc.orig}"
                    ) from exc
                time.sleep(delay)
                delay = min(delay * 2, 1.0)
            except SQLAlchemyError as exc:
                raise StoreUnavailable(
                    f"state store {self._safe_url()} failed: {type(exc).__name__}"
                ) from exc
        raise AssertionError("unreachable")

    def upgrade(self) -> None:
        self._run(self._create_schema)

    def _safe_url(self) -> str:
        return self._engine.url.render_as_string(hide_password=True)

    def close(self) -> None:
        self._engine.dispose()

    # -- jobs and chunks --------------------------------------------------------------------
    def create_job(
        self, job_id: str, tenant_id: str, pipeline: str, trigger_mode: str,
        chunks_: Sequence[ChunkSpec],
    ) -> None:
        now = _now()

        def step(conn: Connection) -> None:
            conn.execute(jobs.insert().values(
                job_id=job_id, tenant_id=tenant_id, pipeline=pipeline,
                trigger_mode=trigger_mode, status=JobStatus.RUNNING.value,
                total_chunks=len(chunks_), completed_chunks=0, failed_chunks=0,
                created_at=now, updated_at=now,
            ))
            if chunks_:
                conn.execute(chunks.insert(), [
                    {"job_id": job_id, "chunk_id": c.chunk_id, "spec": c.model_dump_json()}
                    for c in chunks_
                ])

        self._run(step)

    def complete_chunk(self, result: ChunkResult) -> Completion:
        now = _now()

        def step(conn: Connection) -> Completion:
            # RETURNING, not rowcount: drivers disagree on rowcount for ON CONFLICT
            inserted = conn.execute(
                self._insert(chunk_results).values(
                    job_id=result.job_id, chunk_id=result.chunk_id, completed=result.completed,
                    result=result.model_dump_json(), recorded_at=now,
                ).on_conflict_do_nothing().returning(chunk_results.c.chunk_id)
            ).first()
            if inserted is None:
                row = conn.execute(
                    sa.select(jobs.c.completed_chunks, jobs.c.total_chunks)
                    .where(jobs.c.job_id == result.job_id)
                ).one_or_none()
                if row is None:
                    raise UnknownJob(f"unknown job {result.job_id!r}")
                return Completion(False, row.completed_chunks, row.total_chunks, False)
            row = conn.execute(
                jobs.update().where(jobs.c.job_id == result.job_id).values(
                    completed_chunks=jobs.c.completed_chunks + 1,
                    failed_chunks=jobs.c.failed_chunks + (0 if result.completed else 1),
                    updated_at=now,
                ).returning(jobs.c.completed_chunks, jobs.c.total_chunks)
            ).one_or_none()
            if row is None:
                raise UnknownJob(f"unknown job {result.job_id!r}")
            claimed = False
            if row.completed_chunks >= row.total_chunks:
                claimed = conn.execute(
                    jobs.update().where(
                        jobs.c.job_id == result.job_id,
                        jobs.c.status == JobStatus.RUNNING.value,
                    ).values(status=JobStatus.AGGREGATING.value, updated_at=now)
                ).rowcount == 1
            return Completion(True, row.completed_chunks, row.total_chunks, claimed)

        completion: Completion = self._run(step)
        return completion

    def chunk_specs(self, job_id: str) -> list[ChunkSpec]:
        rows = self._run(lambda c: c.execute(
            sa.select(chunks.c.spec).where(chunks.c.job_id == job_id).order_by(chunks.c.chunk_id)
        ).all())
        return [ChunkSpec.model_validate_json(r.spec) for r in rows]

    def chunk_results(self, job_id: str) -> list[ChunkResult]:
        rows = self._run(lambda c: c.execute(
            sa.select(chunk_results.c.result).where(chunk_results.c.job_id == job_id)
            .order_by(chunk_results.c.chunk_id)
        ).all())
        return [ChunkResult.model_validate_json(r.result) for r in rows]

    def _rows_for(self, requests: Sequence[TransformRequest], now: float) -> list[dict[str, Any]]:
        return [{
            "request_id": r.request_id, "job_id": r.job_id, "trigger": r.trigger,
            "payload": jsonio.dumps_str(r.payload()), "status": "pending", "attempts": 0,
            "created_at": now, "updated_at": now,
        } for r in requests]

    def finish_aggregation(
        self, job_id: str, outcome: str, requests: Sequence[TransformRequest],
        report: dict[str, Any],
    ) -> bool:
        now = _now()

        def step(conn: Connection) -> bool:
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
                self._settle_job(conn, job_id, now)
            return moved

        moved: bool = self._run(step)
        return moved

    def _settle_job(self, conn: Connection, job_id: str, now: float) -> None:
        """Move a job to done/failed once none of its transform requests is open."""
        open_rows = conn.execute(
            sa.select(sa.func.count()).select_from(outbox).where(
                outbox.c.job_id == job_id, outbox.c.status.notin_(["done", "failed"])
            )
        ).scalar_one()
        if open_rows:
            return
        failed = conn.execute(
            sa.select(sa.func.count()).select_from(outbox).where(
                outbox.c.job_id == job_id, outbox.c.status == "failed"
            )
        ).scalar_one()
        row = conn.execute(
            sa.select(jobs.c.outcome).where(jobs.c.job_id == job_id)
        ).one_or_none()
        final = JobStatus.FAILED if failed or (row and row.outcome == "failed") else JobStatus.DONE
        conn.execute(
            jobs.update().where(
                jobs.c.job_id == job_id, jobs.c.status == JobStatus.TRANSFORMS_ENQUEUED.value
            ).values(status=final.value, updated_at=now)
        )

    def stuck_jobs(self, older_than: float) -> list[str]:
        cutoff = _now() - older_than
        rows = self._run(lambda c: c.execute(
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

        def step(conn: Connection) -> list[TransformRequest]:
            rows = conn.execute(
                self._lock_rows(
                    sa.select(outbox.c.request_id, outbox.c.payload, outbox.c.status)
                    .where(where).order_by(outbox.c.created_at).limit(limit)
                )
            ).all()
            ids = [r.request_id for r in rows if r.status != "running"]
            if ids:
                conn.execute(outbox.update().where(outbox.c.request_id.in_(ids))
                             .values(status="dispatched", updated_at=now))
            return [TransformRequest.model_validate_json(r.payload) for r in rows]

        claimed: list[TransformRequest] = self._run(step)
        return claimed

    def _lock_rows(self, select: sa.Select[Any]) -> sa.Select[Any]:
        """Backends with row locks skip rows another relay holds (PostgreSQL)."""
        return select

    def claim_request(self, request_id: str, lease_seconds: float) -> int | None:
        now = _now()

        def step(conn: Connection) -> int | None:
            row = conn.execute(
                outbox.update().where(
                    outbox.c.request_id == request_id,
                    sa.or_(
                        outbox.c.status.in_(["pending", "dispatched"]),
                        sa.and_(outbox.c.status == "running",
                                outbox.c.updated_at < now - lease_seconds),
                    ),
                ).values(status="running", attempts=outbox.c.attempts + 1, updated_at=now)
                .returning(outbox.c.attempts)
            ).one_or_none()
            return None if row is None else int(row.attempts)

        attempt: int | None = self._run(step)
        return attempt

    def finish_request(
        self, request_id: str, result: TransformResult | None, error: str | None = None
    ) -> None:
        now = _now()

        def step(conn: Connection) -> None:
            row = conn.execute(
                outbox.update().where(outbox.c.request_id == request_id).values(
                    status="failed" if error else "done",
                    result=result.model_dump_json() if result else None,
                    error=error, updated_at=now,
                ).returning(outbox.c.job_id)
            ).one_or_none()
            if row is not None and row.job_id is not None:
                self._settle_job(conn, row.job_id, now)

        self._run(step)

    def retry_later(self, request_id: str, error: str, max_attempts: int) -> bool:
        """Give a claimed request back to the outbox after a retryable failure, or fail it
        for good once it has had ``max_attempts``; True if it will be retried."""
        now = _now()

        def step(conn: Connection) -> bool:
            again = conn.execute(
                outbox.update().where(outbox.c.request_id == request_id,
                                      outbox.c.status == "running",
                                      outbox.c.attempts < max_attempts)
                .values(status="pending", error=error, updated_at=now)
            ).rowcount == 1
            if not again:
                row = conn.execute(
                    outbox.update().where(outbox.c.request_id == request_id,
                                          outbox.c.status == "running")
                    .values(status="failed", error=error, updated_at=now)
                    .returning(outbox.c.job_id)
                ).one_or_none()
                if row is not None and row.job_id is not None:
                    self._settle_job(conn, row.job_id, now)
            return again

        retried: bool = self._run(step)
        return retried

    def record_files(self, request: TransformRequest, keys: Sequence[str]) -> None:
        if not keys:
            return
        now = _now()
        rows = [{
            "tenant_id": request.tenant_id, "service_name": request.service_name,
            "table_name": request.table_name, "file_key": k, "request_id": request.request_id,
            "processed_at": now,
        } for k in keys]
        self._run(lambda c: c.execute(self._insert(ledger).on_conflict_do_nothing(), rows))

    def processed_files(self, request: TransformRequest) -> set[str]:
        rows = self._run(lambda c: c.execute(sa.select(ledger.c.file_key).where(
            ledger.c.tenant_id == request.tenant_id,
            ledger.c.service_name == request.service_name,
            ledger.c.table_name == request.table_name,
        )).all())
        return {r.file_key for r in rows}

    def _request_record(self, row: Any) -> RequestRecord:
        return RequestRecord(
            request=TransformRequest.model_validate_json(row.payload),
            status=row.status, attempts=row.attempts,
            result=TransformResult.model_validate_json(row.result) if row.result else None,
            error=row.error,
        )

    def request(self, request_id: str) -> RequestRecord | None:
        row = self._run(lambda c: c.execute(
            sa.select(outbox).where(outbox.c.request_id == request_id)
        ).one_or_none())
        return None if row is None else self._request_record(row)

    def requests(self, job_id: str) -> list[RequestRecord]:
        rows = self._run(lambda c: c.execute(
            sa.select(outbox).where(outbox.c.job_id == job_id).order_by(outbox.c.created_at)
        ).all())
        return [self._request_record(r) for r in rows]

    # -- incremental sync cursors -----------------------------------------------------------
    def sync_cursor(self, table: TableRef) -> str | None:
        row = self._run(lambda c: c.execute(sa.select(sync_cursors.c.value).where(
            sync_cursors.c.tenant_id == table.tenant_id,
            sync_cursors.c.service_name == table.service_name,
            sync_cursors.c.table_name == table.table_name)).one_or_none())
        return None if row is None else str(row.value)

    def advance_cursor(self, table: TableRef, value: str, job_id: str | None) -> bool:
        """Move the high-water mark forward (never back); True if it moved."""
        now = _now()

        def step(conn: Connection) -> bool:
            stmt = self._insert(sync_cursors).values(
                tenant_id=table.tenant_id, service_name=table.service_name,
                table_name=table.table_name, value=value, job_id=job_id, updated_at=now)
            stmt = stmt.on_conflict_do_update(
                index_elements=[sync_cursors.c.tenant_id, sync_cursors.c.service_name,
                                sync_cursors.c.table_name],
                set_={"value": value, "job_id": job_id, "updated_at": now},
                where=sync_cursors.c.value < value,
            ).returning(sync_cursors.c.value)
            return conn.execute(stmt).first() is not None

        moved: bool = self._run(step)
        return moved

    # -- chunk checkpoints ------------------------------------------------------------------
    def save_checkpoint(self, job_id: str, chunk_id: str, state: dict[str, Any]) -> None:
        now, text = _now(), jsonio.dumps_str(state)
        self._run(lambda c: c.execute(
            self._insert(checkpoints).values(job_id=job_id, chunk_id=chunk_id, state=text,
                                             updated_at=now)
            .on_conflict_do_update(index_elements=[checkpoints.c.job_id, checkpoints.c.chunk_id],
                                   set_={"state": text, "updated_at": now})))

    def load_checkpoint(self, job_id: str, chunk_id: str) -> dict[str, Any] | None:
        row = self._run(lambda c: c.execute(sa.select(checkpoints.c.state).where(
            checkpoints.c.job_id == job_id, checkpoints.c.chunk_id == chunk_id)).one_or_none())
        return None if row is None else dict(jsonio.loads(row.state))

    # -- leases -----------------------------------------------------------------------------
    def acquire_lock(self, name: str, holder: str, ttl: float) -> bool:
        """Take (or renew) a named lease; an expired lease can be taken over."""
        now = _now()

        def step(conn: Connection) -> bool:
            stmt = self._insert(locks).values(name=name, holder=holder, expires_at=now + ttl)
            stmt = stmt.on_conflict_do_update(
                index_elements=[locks.c.name],
                set_={"holder": holder, "expires_at": now + ttl},
                where=sa.or_(locks.c.expires_at < now, locks.c.holder == holder),
            ).returning(locks.c.holder)
            row = conn.execute(stmt).first()
            return row is not None and row.holder == holder

        acquired: bool = self._run(step)
        return acquired

    def release_lock(self, name: str, holder: str) -> None:
        self._run(lambda c: c.execute(
            locks.delete().where(locks.c.name == name, locks.c.holder == holder)))

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
        )

    def job(self, job_id: str) -> JobRecord | None:
        row = self._run(lambda c: c.execute(
            sa.select(jobs).where(jobs.c.job_id == job_id)
        ).one_or_none())
        return None if row is None else self._job_record(row)

    def jobs(self, limit: int = 20) -> list[JobRecord]:
        rows = self._run(lambda c: c.execute(
            sa.select(jobs).order_by(jobs.c.created_at.desc()).limit(limit)
        ).all())
        return [self._job_record(r) for r in rows]
