"""State store port: jobs, chunks, chunk results, the transform outbox and the file ledger.

Exactly-once *effects* come from here, never from a transport (see docs/architecture.md):
chunk completion is one atomic step, the aggregation claim is a conditional state change, and
the outbox has one row per (job, table).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

from canonflow.model import ChunkResult, ChunkSpec, TableRef, TransformRequest, TransformResult
from canonflow.schemes import STATE_STORES


@dataclass(frozen=True, slots=True)
class Completion:
    """What recording one chunk result did."""

    new: bool  # False: a duplicate delivery, nothing changed
    completed: int
    total: int
    claimed: bool  # True for exactly one completer per job: it must aggregate
    superseded: bool = False  # a repeat that replaced the recorded result (see the rule)


@dataclass(frozen=True, slots=True)
class JobRecord:
    job_id: str
    tenant_id: str
    pipeline: str
    trigger_mode: str
    status: str
    outcome: str | None
    total_chunks: int
    completed_chunks: int
    failed_chunks: int
    created_at: datetime
    updated_at: datetime
    report: dict[str, Any] = field(default_factory=dict)
    runner: str | None = None  # the runner lease of the process driving the job


@dataclass(frozen=True, slots=True)
class JobEvent:
    """Something about a job an operator must see (a superseded result, a cancel)."""

    at: datetime
    kind: str
    chunk_id: str | None
    detail: str


@dataclass(frozen=True, slots=True)
class RequestRecord:
    request: TransformRequest
    status: str  # pending | dispatched | running | done | failed
    attempts: int
    result: TransformResult | None
    error: str | None
    holder: str | None = None  # the process running it (status "running")


@dataclass(frozen=True, slots=True)
class Progress:
    """What a finished transform moves forward with it: its source files into the ledger
    and, when ``high_water`` is set, its table's incremental mark."""

    request: TransformRequest
    files: Sequence[str]
    high_water: str | None = None


@dataclass(frozen=True, slots=True)
class Backlog:
    """Transform requests waiting for a worker: pending or dispatched, not yet running."""

    waiting: int
    oldest_age: float | None  # seconds since the oldest waiting request was enqueued


@dataclass(frozen=True, slots=True)
class Activity:
    """What changed in some jobs since a point in time (see ``StateStore.activity``)."""

    as_of: float  # pass back as ``since`` next time
    chunk_results: list[ChunkResult]
    requests: list[RequestRecord]
    jobs: list[JobRecord]


class JobCoordination(Protocol):
    """Jobs, their chunks and the exactly-once fan-in (docs/architecture.md, steps 1-3, 5-6).

    The atomic steps: ``complete_chunk`` records a result under a unique (job, chunk) key and
    counts it only if it was new; the completer that sees the last one claims the job with a
    conditional status change (``Completion.claimed`` is True for exactly one);
    ``finish_aggregation`` writes the job's outbox rows and moves it on in one commit. The
    rest reads jobs for the runner, the sweeper and ``canonflow status``."""

    def create_job(
        self, job_id: str, tenant_id: str, pipeline: str, trigger_mode: str,
        chunks: Sequence[ChunkSpec], runner: str | None = None, exclusive: bool = False,
    ) -> None:
        """``exclusive``: refuse (ActiveJobExists) while the (pipeline, tenant) has an
        unfinished exclusive job."""

    def record_failed_job(self, job_id: str, tenant_id: str, pipeline: str,
                          trigger_mode: str, error: str) -> None: ...

    def active_job(self, pipeline: str, tenant_id: str) -> str | None: ...

    def adopt_job(self, job_id: str, runner: str, previous: str | None) -> bool: ...

    def complete_chunk(self, result: ChunkResult) -> Completion:
        """Record a chunk result (refused for a chunk not in the job); see the rule for
        repeats in docs/architecture.md."""

    def complete_chunks(self, results: Sequence[ChunkResult]) -> list[Completion]:
        """:meth:`complete_chunk` for each result, in that order (the chunks one task ran),
        in one step where the store can: the completion that counts a job's last chunk
        claims it, exactly as one by one."""

    def events(self, job_id: str) -> list[JobEvent]: ...

    def cancel_job(self, job_id: str, reason: str) -> bool: ...

    def settle_jobs(self, job_ids: Collection[str] | None = None) -> list[str]:
        """Settle jobs whose transform requests are all finished while the job is not."""

    def chunk_specs(self, job_id: str) -> list[ChunkSpec]: ...

    def chunk_results(self, job_id: str) -> list[ChunkResult]: ...

    def finish_aggregation(
        self, job_id: str, outcome: str, requests: Sequence[TransformRequest],
        report: dict[str, Any],
    ) -> bool:
        """In one commit: one outbox row per request (unique key) and the job moved on."""

    def job(self, job_id: str) -> JobRecord | None: ...

    def jobs(self, limit: int = 20) -> list[JobRecord]: ...

    def unfinished_jobs(self, job_ids: Collection[str] | None = None) -> list[JobRecord]: ...

    def activity(self, job_ids: Collection[str], since: float) -> Activity: ...

    def stuck_jobs(self, older_than: float) -> list[str]:
        """Jobs whose last chunk is in but whose aggregation never committed."""

    def reclaim_aggregation(self, job_id: str, older_than: float) -> bool: ...


class TransformOutbox(Protocol):
    """The transform outbox: one row per transform request (a unique ``request_id``).

    Rows move ``pending -> dispatched -> running -> done | failed`` (or ``cancelled``).
    ``claim_for_dispatch`` hands each row to one relay; ``claim_request`` to one running
    transform, whose ``holder`` conditions every later step (touch, finish, retry), so a
    worker whose lease was taken over cannot overwrite its successor. Finishing a job's last
    open row settles the job."""

    def enqueue_request(self, request: TransformRequest) -> bool:
        """Add one outbox row; False if its request id exists already."""

    def claim_for_dispatch(
        self, limit: int = 100, redispatch_after: float | None = None,
        lease_seconds: float | None = None, job_ids: Collection[str] | None = None,
        max_attempts: int | None = None, pipeline: str | None = None,
    ) -> list[TransformRequest]:
        """Outbox rows to send now: pending ones, plus (for the sweeper) stale ones;
        ``job_ids`` limits the sweep to those jobs; stale rows that used ``max_attempts``
        are failed instead of sent again."""

    def outbox_backlog(self, pipeline: str | None = None) -> Backlog:
        """How many requests wait for a worker and how long the oldest has waited."""

    def claim_request(self, request_id: str, lease_seconds: float,
                      holder: str | None = None,
                      holder_dead: Callable[[str], bool] | None = None,
                      max_attempts: int | None = None,
                      enqueue: TransformRequest | None = None) -> int | None:
        """Take a request for running; the attempt number, or None if it is not claimable.
        With ``enqueue`` (the request itself), add its row first when there is none (as
        :meth:`enqueue_request`), in the same step where the store can."""

    def claim_group(self, request: TransformRequest, limit: int, lease_seconds: float,
                    holder: str, max_attempts: int, pipeline: str
                    ) -> list[tuple[TransformRequest, int]]:
        """Take up to ``limit`` waiting requests of ``request``'s source table and pipeline
        (see :func:`canonflow.model.group_target`) for a group commit, each with its
        attempt number, claimed for ``holder`` as :meth:`claim_request` would. A store may
        return none (then every request runs by itself)."""

    def touch_request(self, request_id: str, holder: str | None = None) -> bool: ...

    def finish_request(
        self, request_id: str, result: TransformResult | None, error: str | None = None,
        holder: str | None = None, progress: Progress | None = None,
    ) -> bool:
        """Record a request's end; with ``holder``, only while that holder has it. With
        ``progress``, first record its files in the ledger and move its table's mark (as
        :meth:`record_files` and :meth:`advance_cursor` would; whatever the holder: the
        rows were committed), in the same step where the store can."""

    def finish_requests(self, ends: Sequence[tuple[TransformResult, Progress]],
                        holder: str) -> list[bool]:
        """:meth:`finish_request` for each (result, progress) of a group commit, under
        ``holder``, in one step where the store can (each job settles once): whether each
        request ended (False: another holder took it over meanwhile)."""

    def retry_later(self, request_id: str, error: str, max_attempts: int,
                    holder: str | None = None) -> bool:
        """After a retryable failure: back to pending, or failed after ``max_attempts``;
        with ``holder``, only while that holder has it."""

    def request(self, request_id: str) -> RequestRecord | None: ...

    def requests(self, job_id: str) -> list[RequestRecord]: ...


class SyncProgress(Protocol):
    """What was synced and canonicalized already: the file ledger, incremental cursors and
    the checkpoints of sequential chunks. Plain keyed records, no cross-record protocol."""

    def record_files(self, request: TransformRequest, keys: Sequence[str]) -> None:
        """Ledger: these raw files were canonicalized by this request."""

    def processed_files(self, request: TransformRequest,
                        keys: Sequence[str] | None = None) -> set[str]:
        """Which of ``keys`` (all, if None) the ledger holds for the request's table: a
        time-based transform asks about the files of its window, never the whole ledger."""

    def sync_cursors(self, tables: Sequence[TableRef]) -> dict[TableRef, str]:
        """The incremental high-water marks (ISO UTC) of those of ``tables`` ever synced, in
        one read (a plan asks for every table of a tenant at once)."""

    def advance_cursor(self, table: TableRef, value: str, job_id: str | None) -> bool: ...

    def save_checkpoint(self, job_id: str, chunk_id: str, state: dict[str, Any]) -> None:
        """Where a sequential chunk stands: files written, records, the next page."""

    def load_checkpoint(self, job_id: str, chunk_id: str) -> dict[str, Any] | None: ...


class Leases(Protocol):
    """Named leases (table writers, runners): one holder at a time until it releases the
    lease or lets it expire; renewal and release are conditional on the holder."""

    def acquire_lock(self, name: str, holder: str, ttl: float,
                     steal_from: str | None = None) -> bool:
        """Take or renew a named lease for ``ttl`` seconds; False while another holds it
        (unless that holder is ``steal_from``, known dead)."""

    def renew_lock(self, name: str, holder: str, ttl: float) -> bool:
        """Extend a lease still held by ``holder``; False if it was lost: taken by another
        holder, or lapsed (others may have acted on the lapse, as on a runner's jobs)."""

    def lock_holder(self, name: str) -> tuple[str, float] | None: ...

    def live_locks(self, names: Collection[str]) -> dict[str, str]: ...

    def release_lock(self, name: str, holder: str) -> None: ...

    def acquire_locks(self, names: Collection[str], holder: str, ttl: float) -> set[str]:
        """Take (or renew) every one of ``names`` that no other holder has, in one step
        where the store can; the names taken. Never waits, never steals."""

    def release_locks(self, names: Collection[str], holder: str) -> None:
        """Release those of ``names`` this holder has, in one step where the store can."""


class StateStore(JobCoordination, TransformOutbox, SyncProgress, Leases, Protocol):
    """The whole port, opened by URL (:func:`open_state_store`). A backend implements every
    part; each part's docstring says what belongs together."""

    url: str

    def upgrade(self) -> None:
        """Create or migrate the schema (also done on first use)."""

    def close(self) -> None: ...



def open_state_store(url: str) -> StateStore:
    """Open the state store a URL names (see :data:`canonflow.schemes.STATE_STORES`)."""
    store: StateStore = STATE_STORES.open(url)
    return store
