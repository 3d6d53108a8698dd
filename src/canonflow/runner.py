"""Drive jobs to the end on one machine: plan, submit chunks, relay the outbox, sweep.

The runner is a convenience around the protocol, not part of its correctness: chunks record
their own completion and the winning completer aggregates inside the worker; the runner only
relays committed outbox rows to the dispatcher and, at the end, sweeps its own jobs for work
a crashed worker left behind (the same steps ``canonflow recover`` runs).
"""

from __future__ import annotations

import itertools
import logging
import time
from concurrent.futures import FIRST_COMPLETED, Future, wait
from typing import Any, Protocol

from canonflow.aggregate import aggregate_job, complete_chunk
from canonflow.config import Settings
from canonflow.dispatch.base import Dispatcher, TaskOutcome
from canonflow.errors import error_payload
from canonflow.model import ChunkError, ChunkResult, ChunkSpec, JobStatus, TransformRequest
from canonflow.plan import JobPlan, plan_job
from canonflow.runtime import Runtime

log = logging.getLogger("canonflow.runner")
TERMINAL = {JobStatus.DONE.value, JobStatus.FAILED.value}


class ProgressSink(Protocol):
    def planned(self, plans: list[JobPlan]) -> None: ...
    def chunk_done(self, spec: ChunkSpec, result: dict[str, Any]) -> None: ...
    def transform_submitted(self, request: TransformRequest) -> None: ...
    def transform_done(self, request: TransformRequest) -> None: ...


class NullProgress:
    def planned(self, plans: list[JobPlan]) -> None:
        pass

    def chunk_done(self, spec: ChunkSpec, result: dict[str, Any]) -> None:
        pass

    def transform_submitted(self, request: TransformRequest) -> None:
        pass

    def transform_done(self, request: TransformRequest) -> None:
        pass


def recover(rt: Runtime, dispatcher: Dispatcher, older_than: float,
            job_ids: set[str] | None = None) -> dict[str, int]:
    """The sweeper: aggregate jobs stuck after their last chunk, re-send outbox rows left
    pending or abandoned, wait for what it sent. Everything it re-sends is idempotent."""
    state = rt.state
    reaggregated = 0
    for job_id in state.stuck_jobs(older_than):
        if job_ids is not None and job_id not in job_ids:
            continue
        if state.reclaim_aggregation(job_id, older_than):
            aggregate_job(rt, job_id)
            reaggregated += 1
    requests = state.claim_for_dispatch(
        limit=10_000, redispatch_after=older_than,
        lease_seconds=max(older_than, rt.settings.transform_lease_seconds), job_ids=job_ids,
    )
    futures = [(r, dispatcher.submit_transform(r)) for r in requests]
    wait([f for _, f in futures if f is not None])
    for request, future in futures:
        if future is not None:
            _settle_transform(rt, request, future)
    return {"jobs_reaggregated": reaggregated, "transforms_redispatched": len(requests)}


def _settle_transform(rt: Runtime, request: TransformRequest,
                      future: Future[TaskOutcome]) -> None:
    """A transform whose worker died is failed here, so the job can finish and report it."""
    exc = future.exception()
    if exc is None:
        return
    record = rt.state.request(request.request_id)
    if record is not None and record.status in ("dispatched", "running"):
        rt.state.finish_request(request.request_id, None,
                                error=f"worker lost: {type(exc).__name__}: {exc}")


class JobRunner:
    def __init__(self, settings: Settings, rt: Runtime, dispatcher: Dispatcher,
                 progress: ProgressSink | None = None, full_refresh: bool = False) -> None:
        self.full_refresh = full_refresh
        self.settings = settings
        self.rt = rt
        self.dispatcher = dispatcher
        self.progress = progress or NullProgress()
        self._pending: dict[Future[TaskOutcome], tuple[str, Any]] = {}

    def plan(self, tenant_ids: list[str] | None = None) -> list[JobPlan]:
        tenants = tenant_ids or [t.tenant_id for t in self.settings.tenants]
        plans = [plan_job(self.settings, self.rt, tenant, full_refresh=self.full_refresh)
                 for tenant in tenants]
        for p in plans:
            self.rt.state.create_job(p.job_id, p.tenant_id, self.settings.name,
                                     self.settings.trigger_mode.value, p.chunks)
            log.info("job planned", extra={"job_id": p.job_id, "tenant_id": p.tenant_id,
                                           "chunks": len(p.chunks)})
        return plans

    def run(self, tenant_ids: list[str] | None = None) -> list[str]:
        plans = self.plan(tenant_ids)
        self.progress.planned(plans)
        remote = False
        # interleave tenants so one large tenant does not starve the others
        for spec in itertools.chain.from_iterable(
                itertools.zip_longest(*(p.chunks for p in plans))):
            if spec is not None:
                future = self.dispatcher.submit_chunk(spec)
                if future is None:
                    remote = True
                else:
                    self._pending[future] = ("chunk", spec)
        job_ids = {p.job_id for p in plans}
        if remote:
            self._watch(plans)
            return [p.job_id for p in plans]
        self._drain()
        for _ in range(3):  # a crashed worker may leave a job short of its end
            if all((j := self.rt.state.job(i)) and j.status in TERMINAL for i in job_ids):
                break
            recover(self.rt, self.dispatcher, older_than=0.0, job_ids=job_ids)
            self._drain()
        return [p.job_id for p in plans]

    def _drain(self) -> None:
        self._relay()
        while self._pending:
            done, _ = wait(self._pending, timeout=1.0, return_when=FIRST_COMPLETED)
            for future in done:
                kind, payload = self._pending.pop(future)
                if kind == "chunk":
                    self._chunk_finished(payload, future)
                else:
                    _settle_transform(self.rt, payload, future)
                    self.progress.transform_done(payload)
            self._relay()

    def _relay(self) -> None:
        for request in self.rt.state.claim_for_dispatch():
            future = self.dispatcher.submit_transform(request)
            if future is not None:
                self._pending[future] = ("transform", request)
                self.progress.transform_submitted(request)

    def _watch(self, plans: list[JobPlan], poll: float = 0.25) -> None:
        """Remote workers: follow the jobs in the state store, relay committed outbox rows,
        and sweep when nothing has moved for a lease period."""
        state = self.rt.state
        specs = {(p.job_id, c.chunk_id): c for p in plans for c in p.chunks}
        seen_chunks: set[tuple[str, str]] = set()
        seen_requests: set[str] = set()
        finished_requests: set[str] = set()
        last_change = time.monotonic()
        stall = max(30.0, self.settings.celery_visibility_timeout)
        while True:
            self._relay()
            moved = False
            for plan in plans:
                for result in state.chunk_results(plan.job_id):
                    key = (plan.job_id, result.chunk_id)
                    if key not in seen_chunks and key in specs:
                        seen_chunks.add(key)
                        moved = True
                        self.progress.chunk_done(specs[key], result.model_dump(mode="json"))
                for rec in state.requests(plan.job_id):
                    if rec.request.request_id not in seen_requests:
                        seen_requests.add(rec.request.request_id)
                        self.progress.transform_submitted(rec.request)
                    if rec.status in ("done", "failed") and \
                            rec.request.request_id not in finished_requests:
                        finished_requests.add(rec.request.request_id)
                        moved = True
                        self.progress.transform_done(rec.request)
            if all((j := state.job(p.job_id)) and j.status in TERMINAL for p in plans):
                return
            now = time.monotonic()
            if moved:
                last_change = now
            elif now - last_change > stall:
                log.warning("no progress; sweeping", extra={"idle_seconds": now - last_change})
                recover(self.rt, self.dispatcher, older_than=stall,
                        job_ids={p.job_id for p in plans})
                last_change = now
            time.sleep(poll)

    def _chunk_finished(self, spec: ChunkSpec, future: Future[TaskOutcome]) -> None:
        exc = future.exception()
        if exc is None:
            self.progress.chunk_done(spec, future.result()["result"])
            return
        # the worker died before recording the chunk: record its failure so the job ends
        log.error("chunk task lost", extra={"chunk_id": spec.chunk_id, "error": repr(exc)})
        result = ChunkResult(
            job_id=spec.job_id, chunk_id=spec.chunk_id, completed=False, records_processed=0,
            processing_time=0.0, s3_files_written=[], s3_files_count=0,
            table_metadata=spec.table, error=ChunkError(**error_payload(exc)),
        )
        complete_chunk(self.rt, result)
        self.progress.chunk_done(spec, result.model_dump(mode="json"))
