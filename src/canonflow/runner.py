"""Drive jobs to the end: plan, submit chunks, relay the outbox, sweep, resume.

The runner is a convenience around the protocol, not part of its correctness: chunks record
their own completion and the winning completer aggregates inside the worker; the runner only
relays committed outbox rows to the dispatcher and sweeps its own jobs for work a crashed
worker left behind (the same steps ``canonflow recover`` runs).

A runner holds a lease (``runner:HOLDER``) renewed by a heartbeat, and each job it starts
names it. A job whose runner's lease lapsed (or whose runner process is known dead) is an
orphan: ``canonflow run`` of the same pipeline and tenant, or ``canonflow recover``, adopts
it and runs only its missing chunks (sequential chunks resume from their checkpoints). One
unfinished job per (pipeline, tenant): a second run refuses while the first runner lives.
"""

from __future__ import annotations

import contextvars
import itertools
import logging
import queue
import time
from collections.abc import Callable, Collection, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

from opentelemetry.trace import Span

from canonflow.aggregate import aggregate_job, complete_chunks
from canonflow.config import Settings
from canonflow.dispatch.base import (
    Dispatcher,
    TaskOutcome,
    chunk_key,
    chunks_key,
    transform_key,
)
from canonflow.errors import (
    ActiveJobExists,
    CanonflowError,
    ConfigError,
    RunnerLeaseLost,
    RunTimeout,
    error_payload,
)
from canonflow.lease import (
    EVENT_DRIVEN,
    Heartbeat,
    holder_dead,
    holder_id,
    runner_alive,
    runner_lock,
)
from canonflow.log import bind
from canonflow.model import (
    TERMINAL,
    ChunkError,
    ChunkResult,
    ChunkSpec,
    TransformRequest,
    TriggerMode,
)
from canonflow.plan import JobPlan, new_job_id, plan_job, task_batches
from canonflow.runtime import Runtime
from canonflow.stores.state import JobRecord
from canonflow.telemetry import metrics, tracing

log = logging.getLogger("canonflow.runner")
ACTIVITY_MARGIN = 5.0  # seconds of overlap between polls: clocks of other machines differ
FULL_CHECK_SECONDS = 15.0  # and a full look at the unfinished jobs this often
RELAY_EVERY = 1.0  # seconds: a local run relays every job's outbox rows at least this often


class ProgressSink(Protocol):
    def planned(self, plans: list[JobPlan]) -> None:
        """Jobs planned (a run calls it once per job, as each is planned)."""
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


def reclaim_lost_transforms(rt: Runtime, job_ids: Collection[str] | None = None) -> int:
    """Transform requests running under a holder known dead go back to the outbox at once
    (a lost worker is a retryable failure, with bounded attempts)."""
    state, reclaimed = rt.state, 0
    for job in state.unfinished_jobs(job_ids):
        for rec in state.requests(job.job_id):
            if rec.status == "running" and rec.holder and holder_dead(rec.holder):
                state.retry_later(rec.request.request_id, "the worker running it was lost",
                                  rt.settings.transform_max_attempts, holder=rec.holder)
                reclaimed += 1
    return reclaimed


def recover(rt: Runtime, dispatcher: Dispatcher, older_than: float,
            job_ids: Collection[str] | None = None,
            pipeline: str | None = None,
            check: Callable[[], None] | None = None) -> dict[str, int]:
    """The sweeper: settle jobs whose transforms all finished, give requests of dead workers
    back, aggregate jobs stuck after their last chunk, re-send outbox rows left pending or
    abandoned (failing those that used every attempt), wait for what it sent. Everything
    it re-sends is idempotent. ``check`` is called every second while it waits (a run's:
    its wait limit and its lease), and stops the wait by raising."""
    state = rt.state
    settled = len(state.settle_jobs(job_ids))
    reclaimed = reclaim_lost_transforms(rt, job_ids)
    metrics.taken_over("transform", reclaimed)
    reaggregated = 0
    for job_id in state.stuck_jobs(older_than):
        if job_ids is not None and job_id not in job_ids:
            continue
        if pipeline is not None:  # another pipeline's job: its stores are not these
            job = state.job(job_id)
            if job is None or job.pipeline != pipeline:
                continue
        if state.reclaim_aggregation(job_id, older_than):
            metrics.taken_over("aggregation")
            try:
                aggregate_job(rt, job_id)
            except CanonflowError as exc:  # this job's problem: the others go on
                log.error("aggregating a stuck job failed; the next sweep tries again",
                          extra={"job_id": job_id, "error": str(exc)})
                continue
            reaggregated += 1
    requests = state.claim_for_dispatch(
        limit=10_000, redispatch_after=older_than,
        lease_seconds=max(older_than, rt.settings.transform_lease_seconds), job_ids=job_ids,
        max_attempts=rt.settings.transform_max_attempts, pipeline=pipeline,
    )
    futures = [(r, dispatcher.submit_transform(r)) for r in requests]
    # each in turn (``future.exception()`` waits for it): ``concurrent.futures.wait`` takes
    # every future's lock in a row, and a Ctrl-C in between leaves one held for good
    for request, future in futures:
        if future is not None:
            _settle_transform(rt, dispatcher, request, future, check)
    settled += len(state.settle_jobs(job_ids))
    return {"jobs_reaggregated": reaggregated, "transforms_redispatched": len(requests),
            "transforms_reclaimed": reclaimed, "jobs_settled": settled}


def _settle_transform(rt: Runtime, dispatcher: Dispatcher, request: TransformRequest,
                      future: Future[TaskOutcome],
                      check: Callable[[], None] | None = None) -> bool:
    """A transform whose worker died goes back to the outbox (a retryable failure) until
    its attempts run out; then it fails and its job settles. One that only waited behind
    a task that killed the pool never ran: True, send it again as it is. ``check`` is
    called every second of the wait (it stops it by raising)."""
    while True:
        try:
            exc = future.exception(timeout=None if check is None else 1.0)
            break
        except FutureTimeout:
            assert check is not None
            check()
    if exc is None:
        return False
    if not dispatcher.lost_in_worker(transform_key(request)):
        return True
    again = rt.state.retry_later(request.request_id,
                                 f"worker lost: {type(exc).__name__}: {exc}",
                                 rt.settings.transform_max_attempts)
    log.warning("transform worker lost", extra={"request_id": request.request_id,
                                                "will_retry": again})
    return False


@dataclass
class _Work:
    plan: JobPlan
    submit: list[ChunkSpec]  # the chunks to run: all of a new job, the missing of an orphan
    resumed: bool = False


@dataclass
class _Pending:
    kind: str  # "chunk" | "transform"
    payload: Any
    tries: int = 1


@dataclass
class _Watch:
    """What a remote-worker run has seen so far."""

    chunks: set[tuple[str, str]] = field(default_factory=set)
    requests: set[str] = field(default_factory=set)
    finished: set[str] = field(default_factory=set)


class JobRunner:
    def __init__(self, settings: Settings, rt: Runtime, dispatcher: Dispatcher,
                 progress: ProgressSink | None = None, full_refresh: bool = False,
                 wait_limit: float | None = None) -> None:
        self.full_refresh = full_refresh
        self.settings = settings
        self.rt = rt
        self.dispatcher = dispatcher
        self.progress = progress or NullProgress()
        self.holder = holder_id()
        self._runner = self.holder  # the runner its jobs record (start(): their events)
        self.wait_limit = wait_limit or settings.run_wait_limit_seconds
        self.refused: dict[str, str] = {}  # tenant -> why this run did not start its job
        self.resumed: list[str] = []
        self._pending: dict[Future[TaskOutcome], _Pending] = {}
        # each pending future puts itself here when done: a poll takes what finished
        # without looking at every pending future (thousands, in a run of many tenants)
        self._finished: queue.SimpleQueue[Future[TaskOutcome]] = queue.SimpleQueue()
        self._started = time.monotonic()
        self._job_ids: list[str] = []
        self._relayed = 0.0  # when the whole run's outbox was last relayed (monotonic)
        self._remote = False  # a chunk went to a remote worker (no future to follow)
        self._lease: Heartbeat | None = None  # while driving jobs
        self._spans: dict[str, Span] = {}  # job id -> its span, ended with the job

    # -- starting ---------------------------------------------------------------------------
    def validate(self) -> None:
        """Everything that can be checked before a job exists: the stores open, the
        mappings load, every source has a spec, every table it syncs a mapping, and every
        tenant the values its connection names."""
        rt = self.rt
        rt.warm_up()
        _ = rt.canonical
        for src in self.settings.sources:
            spec = self.settings.spec_for(src.service)
            for table in src.tables or list(spec.tables):
                spec.table(table)
                if (src.service, table) not in rt.catalog.mappings:
                    raise ConfigError(
                        f"no mapping for {src.service}.{table}: its records would have "
                        "nowhere to land; add a mapping YAML (source: {service: "
                        f"{src.service}, table: {table}}}, entity, fields) to a folder "
                        "listed in the pipeline's mapping_dirs (see docs/mappings.md), "
                        f"or leave {table} out of the source's tables")
        self.settings.check_connections()

    @contextmanager
    def _leased(self) -> Iterator[None]:
        """Hold this runner's lease, renewed by a heartbeat, while it drives jobs."""
        state, name = self.rt.state, runner_lock(self.holder)
        ttl = self.settings.runner_lease_seconds
        state.acquire_lock(name, self.holder, ttl)
        self._lease = Heartbeat(ttl / 3, lambda: state.renew_lock(name, self.holder, ttl), name)
        try:
            with self._lease:
                yield
        finally:
            state.release_lock(name, self.holder)

    def plan(self, tenant_ids: list[str] | None = None) -> list[JobPlan]:
        """Plan and record one job per tenant (no chunk submitted)."""
        works, _ = self._start(tenant_ids or [t.tenant_id for t in self.settings.tenants])
        return [w.plan for w in works]

    def start(self, tenant_ids: list[str] | None = None
              ) -> tuple[list[tuple[JobPlan, list[ChunkSpec]]], list[str]]:
        """Plan and record one job per tenant (or adopt its orphaned one) without driving
        it: each job's plan and the chunks to submit, and the ids of jobs that failed to
        plan. For transports that hand nothing back (functions on a queue)."""
        known = [t.tenant_id for t in self.settings.tenants]
        unknown = sorted(set(tenant_ids or []) - set(known))
        if unknown:
            raise ConfigError(f"tenant(s) {', '.join(unknown)} not in pipeline "
                              f"{self.settings.name!r} (it has: {', '.join(known)})")
        self._runner = EVENT_DRIVEN + self.holder  # no process will drive these jobs
        with bind(pipeline=self.settings.name):
            works, failed = self._start(list(dict.fromkeys(tenant_ids or known)))
        for job_id, span in self._spans.items():  # planned: the job's trace goes on
            tracing.finish(span, job_id=job_id, status="running")
        self._spans.clear()
        return [(w.plan, w.submit) for w in works], failed

    def _start(self, tenants: list[str], launch: Callable[[_Work], None] | None = None
               ) -> tuple[list[_Work], list[str]]:
        """A job per tenant, each on its own: a tenant that cannot be planned is recorded
        as a failed job with its reason and the others go on; a tenant with an unfinished
        job is resumed (its runner is gone) or refused (its runner lives). ``launch`` is
        called with each job as soon as it is planned, in this thread."""
        failed: list[str] = []

        def start(tenant: str) -> _Work | None:
            with bind(tenant_id=tenant):
                return self._start_one(tenant, failed)

        threads = min(len(tenants), self.settings.plan_concurrency)
        started: list[_Work | None] = []
        if threads <= 1:
            for tenant in tenants:
                started.append(work := start(tenant))
                if work is not None and launch is not None:
                    launch(work)
        else:  # planning waits on the APIs (page 1 of each table): tenants in parallel
            with ThreadPoolExecutor(threads, thread_name_prefix="canonflow-plan") as pool:
                futures = [pool.submit(contextvars.copy_context().run, start, t)
                           for t in tenants]
                # in the order they finish, through a queue (``as_completed`` takes every
                # future's lock in a row: a Ctrl-C in between would leave one held)
                planned: queue.SimpleQueue[Future[_Work | None]] = queue.SimpleQueue()
                for future in futures:
                    future.add_done_callback(planned.put)
                for _ in futures:
                    if (work := planned.get().result()) is not None and launch is not None:
                        launch(work)
                started = [f.result() for f in futures]  # in the tenants' order
        return [w for w in started if w is not None], failed

    def _start_one(self, tenant: str, failed: list[str]) -> _Work | None:
        state, name = self.rt.state, self.settings.name
        existing = state.active_job(name, tenant)
        if existing is not None:
            return self._attach(existing, tenant)
        # the job's span: its chunks, aggregation and transforms join its trace through
        # the context each chunk spec carries
        span = tracing.start("canonflow.job", pipeline=name, tenant_id=tenant,
                             trigger_mode=self.settings.trigger_mode.value)
        try:
            with tracing.current(span):
                plan = plan_job(self.settings, self.rt, tenant, full_refresh=self.full_refresh)
        except CanonflowError as exc:
            job_id = new_job_id()
            state.record_failed_job(job_id, tenant, name,
                                    self.settings.trigger_mode.value, str(exc))
            log.error("tenant could not be planned", extra={"job_id": job_id,
                                                            "error": str(exc)})
            tracing.finish(span, error=str(exc), job_id=job_id, status="failed")
            failed.append(job_id)
            return None
        try:
            state.create_job(plan.job_id, tenant, name, self.settings.trigger_mode.value,
                             plan.chunks, runner=self._runner, exclusive=True)
        except ActiveJobExists as exc:  # another run created it a moment ago
            tracing.finish(span, attached_to=exc.job_id)
            return self._attach(exc.job_id, tenant)
        span.set_attribute("canonflow.job_id", plan.job_id)
        span.set_attribute("canonflow.chunks", len(plan.chunks))
        self._spans[plan.job_id] = span
        log.info("job planned", extra={"job_id": plan.job_id, "chunks": len(plan.chunks)})
        return _Work(plan, list(plan.chunks))

    def _attach(self, job_id: str, tenant: str) -> _Work | None:
        job = self.rt.state.job(job_id)
        if job is not None and job.runner != self._runner and runner_alive(self.rt.state, job):
            self.refused[tenant] = (
                f"tenant {tenant!r}: job {job_id} is already running (runner {job.runner}); "
                f"wait for it (canonflow status {job_id}) or cancel it "
                f"(canonflow cancel {job_id})")
            return None
        work = self._adopt(job) if job is not None else None
        if work is None:
            self.refused[tenant] = f"tenant {tenant!r}: job {job_id} was taken by another run"
        return work

    def _adopt(self, job: JobRecord) -> _Work | None:
        """Become the runner of an orphaned job; its chunks without a result run again."""
        state = self.rt.state
        if job.status in TERMINAL or not state.adopt_job(job.job_id, self._runner, job.runner):
            return None
        specs = state.chunk_specs(job.job_id)
        done = {r.chunk_id for r in state.chunk_results(job.job_id)}
        missing = [s for s in specs if s.chunk_id not in done]
        metrics.taken_over("job")
        self._spans[job.job_id] = tracing.start(
            "canonflow.job.resume", parent=specs[0].trace_context if specs else None,
            job_id=job.job_id, tenant_id=job.tenant_id, chunks_missing=len(missing))
        log.warning("resuming a job whose runner is gone", extra={
            "job_id": job.job_id, "tenant_id": job.tenant_id, "status": job.status,
            "chunks_missing": len(missing), "previous_runner": job.runner})
        self.resumed.append(job.job_id)
        return _Work(JobPlan(job.job_id, job.tenant_id, specs), missing, resumed=True)

    # -- driving ----------------------------------------------------------------------------
    def run(self, tenant_ids: list[str] | None = None) -> list[str]:
        """One job per tenant (or the tenant's unfinished job, resumed), driven to the end;
        the job ids, including those of tenants that could not be planned."""
        known = [t.tenant_id for t in self.settings.tenants]
        unknown = sorted(set(tenant_ids or []) - set(known))
        if unknown:
            raise ConfigError(f"tenant(s) {', '.join(unknown)} not in pipeline "
                              f"{self.settings.name!r} (it has: {', '.join(known)})")
        self.validate()
        with bind(pipeline=self.settings.name), self._leased():
            self._started = time.monotonic()
            works, failed = self._start(list(dict.fromkeys(tenant_ids or known)),
                                        launch=self._launch)
            return self._drive(works, launched=True) + failed

    def _launch(self, work: _Work) -> None:
        """Submit a job's chunks the moment it is planned: they run while the other
        tenants are still being planned, and what finished meanwhile is handed on."""
        self.progress.planned([work.plan])
        self._job_ids.append(work.plan.job_id)
        for batch in task_batches(work.submit):
            self._remote = self._submit_chunks(batch) or self._remote
        self._poll(timeout=0.0)

    def resume(self, job_ids: Collection[str] | None = None,
               older_than: float = 0.0) -> list[str]:
        """Adopt this pipeline's unfinished jobs whose runner is gone (idle for at least
        ``older_than`` seconds) and drive them to the end."""
        state = self.rt.state
        cutoff = time.time() - older_than
        with bind(pipeline=self.settings.name), self._leased():
            works = []
            for job in state.unfinished_jobs(job_ids):
                if job.pipeline != self.settings.name or job.runner is None \
                        or job.updated_at.timestamp() > cutoff \
                        or runner_alive(state, job):
                    continue
                if (work := self._adopt(job)) is not None:
                    works.append(work)
            return self._drive(works)

    def _drive(self, works: list[_Work], launched: bool = False) -> list[str]:
        try:
            return self._drive_jobs(works, launched)
        finally:
            self._end_spans()

    def _end_spans(self) -> None:
        """End each job's span with how the job stands; count the jobs that ended."""
        for job_id, span in self._spans.items():
            try:  # never masks what ended the run (a store that fails, an interrupt)
                job = self.rt.state.job(job_id)
                transforms = len(self.rt.state.requests(job_id)) if job else 0
            except Exception as exc:
                tracing.finish(span, error=f"job state unreadable: {type(exc).__name__}")
                continue
            if job is None:
                tracing.finish(span, error="job not found")
                continue
            if job.status in TERMINAL:
                metrics.job_finished(job.status, job.outcome,
                                     (job.updated_at - job.created_at).total_seconds(),
                                     transforms)
            failed = job.status != "done" or job.outcome not in ("completed", None)
            tracing.finish(span, error=f"job {job.status}/{job.outcome}" if failed else None,
                           status=job.status, outcome=job.outcome)
        self._spans.clear()

    def _drive_jobs(self, works: list[_Work], launched: bool = False) -> list[str]:
        """Drive the jobs to their end; ``launched``: their chunks were submitted as each
        was planned (:meth:`_launch`)."""
        job_ids = self._job_ids = [w.plan.job_id for w in works]
        remote = self._remote
        if not launched:
            self._started = time.monotonic()
            self.progress.planned([w.plan for w in works])
            # interleave tenants so one large tenant does not starve the others
            for batch in itertools.chain.from_iterable(
                    itertools.zip_longest(*(task_batches(w.submit) for w in works))):
                if batch is not None:
                    remote = self._submit_chunks(batch) or remote
        if not job_ids:
            return job_ids
        resumed = [w.plan.job_id for w in works if w.resumed]
        if resumed:  # whatever the dead runner left between aggregation and transforms
            recover(self.rt, self.dispatcher, older_than=0.0, job_ids=resumed,
                    check=lambda: self._check_wait(job_ids))
        if remote:
            self._watch(job_ids)
            return job_ids
        self._drain()
        for _ in range(3):  # a crashed worker may leave a job short of its end
            if not self.rt.state.unfinished_jobs(job_ids):
                break
            recover(self.rt, self.dispatcher, older_than=0.0, job_ids=job_ids,
                    check=lambda: self._check_wait(job_ids))
            self._drain()
        for job in self.rt.state.unfinished_jobs(job_ids):
            log.error("job left unfinished", extra={
                "job_id": job.job_id, "status": job.status,
                "chunks": f"{job.completed_chunks}/{job.total_chunks}"})
        return job_ids

    def _submit_chunks(self, specs: list[ChunkSpec], tries: int = 1) -> bool:
        """Submit one task of a job's chunks (:func:`task_batches`); True if it went to a
        remote worker (no future to follow)."""
        future = self.dispatcher.submit_chunk(specs[0]) if len(specs) == 1 \
            else self.dispatcher.submit_chunks(specs)
        if future is None:
            return True
        self._follow(future, _Pending("chunk", specs, tries))
        return False

    def _check_wait(self, job_ids: Collection[str]) -> None:
        if self._lease is not None and self._lease.lost.is_set():
            raise RunnerLeaseLost(
                "this run lost its lease (it stalled longer than runner_lease_seconds); "
                "another run may have taken its jobs over: see `canonflow status`")
        waited = time.monotonic() - self._started
        if waited > self.wait_limit:
            left = [j.job_id for j in self.rt.state.unfinished_jobs(job_ids)]
            if not left:
                return
            raise RunTimeout(
                f"stopped waiting after {waited:.0f} s (limit {self.wait_limit:.0f} s); "
                f"unfinished jobs: {', '.join(left) or 'none'} — they go on without this "
                "run: follow them with `canonflow status JOB`, resume them with "
                "`canonflow recover`")

    def _drain(self) -> None:
        self._relay()
        while self._pending:
            self._poll(timeout=1.0)
            self._check_wait(self._job_ids)

    def _poll(self, timeout: float) -> None:
        """Hand on the tasks that finished (waiting up to ``timeout`` for one), then relay
        the outbox rows they left: of their jobs only, and the whole run's every
        ``RELAY_EVERY`` seconds (a relay reads and claims in a write transaction: one
        after every task, over every job of the run, cost what the number of jobs did)."""
        moved: set[str] = set()
        if self._pending:
            for future in self._done(timeout):
                pending = self._pending.pop(future)
                if pending.kind == "chunk":
                    if self._chunk_finished(pending, future):
                        moved.add(pending.payload[0].job_id)
                elif _settle_transform(self.rt, self.dispatcher, pending.payload, future):
                    self._submit_transform(pending.payload)
                else:
                    self.progress.transform_done(pending.payload)
                    if future.exception() is not None or "result" not in future.result():
                        moved.add(pending.payload.job_id)  # back in the outbox, maybe
        if time.monotonic() - self._relayed >= RELAY_EVERY:
            self._relay()
        elif moved:
            self._relay(moved)

    def _relay(self, job_ids: Collection[str] | None = None) -> None:
        """Send the committed outbox rows of ``job_ids`` (default: every job of this run;
        never another pipeline's or run's)."""
        if job_ids is None:
            job_ids, self._relayed = self._job_ids, time.monotonic()
        for request in self.rt.state.claim_for_dispatch(job_ids=job_ids):
            self._submit_transform(request)
            self.progress.transform_submitted(request)

    def _submit_transform(self, request: TransformRequest) -> None:
        future = self.dispatcher.submit_transform(request)
        if future is not None:
            self._follow(future, _Pending("transform", request))

    def _follow(self, future: Future[TaskOutcome], pending: _Pending) -> None:
        self._pending[future] = pending
        future.add_done_callback(self._finished.put)

    def _done(self, timeout: float) -> list[Future[TaskOutcome]]:
        """The tasks that finished since the last look, waiting up to ``timeout`` for one."""
        done: list[Future[TaskOutcome]] = []
        try:
            done.append(self._finished.get(timeout=timeout) if timeout > 0
                        else self._finished.get_nowait())
            while True:
                done.append(self._finished.get_nowait())
        except queue.Empty:
            pass
        return done

    def _watch(self, job_ids: list[str]) -> None:
        """Remote workers: follow what changed in the jobs since the last look (one read
        per poll, whatever the number of jobs), relay committed outbox rows, sweep (and
        settle) when nothing has moved for a lease period, stop at the wait limit."""
        state = self.rt.state
        specs = {(c.job_id, c.chunk_id): c for p in self._plans(job_ids) for c in p}
        seen = _Watch()
        unfinished = set(job_ids)
        since = 0.0
        poll = 0.25
        last_change = last_full = time.monotonic()
        stall = max(30.0, self.settings.celery_visibility_timeout)
        while True:
            self._relay()
            activity = state.activity(job_ids, max(0.0, since - ACTIVITY_MARGIN))
            since = activity.as_of
            moved = self._observe(activity.chunk_results, activity.requests, specs, seen)
            for job in activity.jobs:
                if job.status in TERMINAL:
                    unfinished.discard(job.job_id)
            if not unfinished:
                return
            now = time.monotonic()
            if now - last_full > FULL_CHECK_SECONDS:
                # a commit later than the margin, or a clock further off, is never missed
                unfinished = {j.job_id for j in state.unfinished_jobs(unfinished)}
                last_full = now
                if not unfinished:
                    return
            if moved:
                last_change, poll = now, 0.25
            elif now - last_change > stall:
                log.warning("no progress; sweeping", extra={"idle_seconds": now - last_change})
                recover(self.rt, self.dispatcher, older_than=stall, job_ids=unfinished)
                last_change = now
            else:
                poll = min(poll * 1.5, 2.0)
            self._check_wait(unfinished)
            time.sleep(poll)

    def _plans(self, job_ids: list[str]) -> Iterator[list[ChunkSpec]]:
        for job_id in job_ids:
            yield self.rt.state.chunk_specs(job_id)

    def _observe(self, results: list[ChunkResult], requests: list[Any],
                 specs: dict[tuple[str, str], ChunkSpec], seen: _Watch) -> bool:
        moved = False
        for result in results:
            key = (result.job_id, result.chunk_id)
            if key not in seen.chunks and key in specs:
                seen.chunks.add(key)
                moved = True
                self.progress.chunk_done(specs[key], result.model_dump(mode="json"))
        for rec in requests:
            rid = rec.request.request_id
            if rid not in seen.requests:
                seen.requests.add(rid)
                self.progress.transform_submitted(rec.request)
            if rec.status in ("done", "failed", "cancelled") and rid not in seen.finished:
                seen.finished.add(rid)
                moved = True
                self.progress.transform_done(rec.request)
        return moved

    def _chunk_finished(self, pending: _Pending, future: Future[TaskOutcome]) -> bool:
        """Hand on a finished chunk task (one chunk or several of a job); True when its job
        may have outbox rows to send (a completion aggregated the job, or per-batch
        requests came with its files)."""
        specs: list[ChunkSpec] = pending.payload
        per_batch = specs[0].trigger_mode is TriggerMode.PER_BATCH
        exc = future.exception()
        if exc is None:
            outcome = future.result()
            results = outcome["results"] if "results" in outcome else [outcome["result"]]
            for spec, result in zip(specs, results, strict=True):
                self.progress.chunk_done(spec, result)
            return bool(outcome.get("aggregated")) or per_batch
        key = chunk_key(specs[0]) if len(specs) == 1 else chunks_key(specs)
        if not self.dispatcher.lost_in_worker(key):
            self._submit_chunks(specs, pending.tries)  # it never ran: no attempt used
            return False
        # the worker died running the task: run it again (bounded), then record its
        # chunks' failure so the job ends
        where = {"job_id": specs[0].job_id, "chunk_ids": [s.chunk_id for s in specs],
                 "error": f"{type(exc).__name__}: {exc}"}
        if pending.tries < self.settings.chunk_attempts:
            log.warning("chunk task lost; running it again",
                        extra={**where, "attempt": pending.tries})
            self._submit_chunks(specs, pending.tries + 1)
            return per_batch  # it may have sent some
        log.error("chunk task lost", extra=where)
        results = [ChunkResult(
            job_id=spec.job_id, chunk_id=spec.chunk_id, completed=False, records_processed=0,
            processing_time=0.0, s3_files_written=[], s3_files_count=0,
            table_metadata=spec.table, error=ChunkError(**error_payload(exc)),
        ) for spec in specs]
        completions = complete_chunks(self.rt, results)
        for spec, result in zip(specs, results, strict=True):
            self.progress.chunk_done(spec, result.model_dump(mode="json"))
        return any(c.claimed for c in completions) or per_batch
