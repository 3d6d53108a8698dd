"""One contract for every state store backend: the atomic steps of the protocol."""

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from canonflow.errors import ConfigError, UnknownJob
from canonflow.model import ChunkResult, ChunkSpec, TableRef, TransformRequest, TransformResult
from canonflow.stores import StateStore, open_state_store
from canonflow.stores.state import Backlog, Progress

T = TableRef(tenant_id="acme", service_name="crm", table_name="contacts")


@pytest.fixture(params=["sqlite", "postgres", "dynamodb"])
def state(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StateStore]:
    if request.param == "postgres":
        url = request.getfixturevalue("postgres_url")
    elif request.param == "dynamodb":
        url = request.getfixturevalue("dynamodb_url")
    else:
        url = f"sqlite:///{tmp_path / 'state.db'}"
    store = open_state_store(url)
    yield store
    store.close()


def specs(job: str, n: int) -> list[ChunkSpec]:
    return [ChunkSpec(job_id=job, chunk_id=f"c{i}", table=T, start_page=1, end_page=1,
                      page_size=10, batch_records=10) for i in range(n)]


def result(job: str, i: int, ok: bool = True) -> ChunkResult:
    return ChunkResult(
        job_id=job, chunk_id=f"c{i}", completed=ok, records_processed=1, processing_time=0.0,
        s3_files_written=[], s3_files_count=0, table_metadata=T,
        error=None if ok else {"type": "X", "message": "boom", "retryable": False})


def request(job: str | None, rid: str) -> TransformRequest:
    return TransformRequest(tenant_id="acme", service_name="crm", table_name="contacts",
                            job_id=job, request_id=rid, source_files=[])


def test_completion_counts_once_and_the_last_claims(state: StateStore) -> None:
    state.create_job("j", "acme", "p", "aggregated", specs("j", 3))
    first = state.complete_chunk(result("j", 0))
    assert (first.new, first.completed, first.claimed) == (True, 1, False)
    dup = state.complete_chunk(result("j", 0))
    assert (dup.new, dup.completed, dup.claimed) == (False, 1, False)
    state.complete_chunk(result("j", 1, ok=False))
    last = state.complete_chunk(result("j", 2))
    assert (last.completed, last.total, last.claimed) == (3, 3, True)
    again = state.complete_chunk(result("j", 2))
    assert not again.new and not again.claimed
    job = state.job("j")
    assert job is not None
    assert (job.status, job.completed_chunks, job.failed_chunks) == ("aggregating", 3, 1)


def test_unknown_job_is_a_typed_error(state: StateStore) -> None:
    with pytest.raises(UnknownJob):
        state.complete_chunk(result("missing", 0))


def test_aggregation_commits_outbox_rows_once(state: StateStore) -> None:
    state.create_job("j", "acme", "p", "aggregated", specs("j", 1))
    assert state.complete_chunk(result("j", 0)).claimed
    reqs = [request("j", "j:crm:contacts")]
    assert state.finish_aggregation("j", "completed", reqs, {"tables": {}})
    assert not state.finish_aggregation("j", "completed", reqs, {"tables": {}})
    assert [r.request.request_id for r in state.requests("j")] == ["j:crm:contacts"]
    assert state.job("j").status == "transforms_enqueued"  # type: ignore[union-attr]


def test_outbox_relay_claim_and_finish_settle_the_job(state: StateStore) -> None:
    state.create_job("j", "acme", "p", "aggregated", specs("j", 1))
    state.complete_chunk(result("j", 0))
    state.finish_aggregation("j", "completed", [request("j", "r1")], {})
    assert [r.request_id for r in state.claim_for_dispatch()] == ["r1"]
    assert state.claim_for_dispatch() == []  # dispatched rows are not sent again
    assert state.claim_request("r1", lease_seconds=60) == 1
    assert state.claim_request("r1", lease_seconds=60) is None  # running, lease not expired
    res = TransformResult(request_id="r1", tenant_id="acme", service_name="crm",
                          table_name="contacts", entity="contact", processing_mode="file_specific")
    state.finish_request("r1", res)
    assert state.job("j").status == "done"  # type: ignore[union-attr]
    assert state.claim_request("r1", lease_seconds=0) is None  # done is final


def test_sweeper_claims_abandoned_rows(state: StateStore) -> None:
    assert state.enqueue_request(request(None, "r2"))
    assert not state.enqueue_request(request(None, "r2"))
    assert len(state.claim_for_dispatch()) == 1
    assert state.claim_for_dispatch(redispatch_after=10) == []
    assert len(state.claim_for_dispatch(redispatch_after=0)) == 1
    assert state.claim_request("r2", lease_seconds=60) == 1
    assert len(state.claim_for_dispatch(lease_seconds=0)) == 1
    assert state.claim_request("r2", lease_seconds=0) == 2  # lease expired: re-claimable


def test_the_backlog_counts_requests_waiting_for_a_worker(state: StateStore) -> None:
    assert state.outbox_backlog() == Backlog(waiting=0, oldest_age=None)
    state.create_job("j", "acme", "p", "aggregated", specs("j", 1))
    state.complete_chunk(result("j", 0))
    state.finish_aggregation("j", "completed", [request("j", "r1"), request("j", "r2")], {})
    state.claim_for_dispatch(limit=1)  # dispatched still waits for a worker
    backlog = state.outbox_backlog()
    assert backlog.waiting == 2 and backlog.oldest_age is not None and backlog.oldest_age >= 0
    assert state.outbox_backlog(pipeline="other").waiting == 0
    assert state.claim_request("r1", lease_seconds=60) == 1
    assert state.outbox_backlog(pipeline="p").waiting == 1


def test_failed_job_settles_as_failed(state: StateStore) -> None:
    state.create_job("j", "acme", "p", "aggregated", specs("j", 1))
    state.complete_chunk(result("j", 0, ok=False))
    state.finish_aggregation("j", "failed", [], {})
    assert state.job("j").status == "failed"  # type: ignore[union-attr]


def test_stuck_jobs_are_found_and_reclaimed_once(state: StateStore) -> None:
    state.create_job("j", "acme", "p", "aggregated", specs("j", 1))
    state.complete_chunk(result("j", 0))  # claimed, then the claimer "crashed"
    assert state.stuck_jobs(older_than=0) == ["j"]
    assert state.reclaim_aggregation("j", older_than=0)
    assert state.finish_aggregation("j", "completed", [request("j", "r")], {})
    assert state.stuck_jobs(older_than=0) == []


def test_ledger_records_processed_files(state: StateStore) -> None:
    req = request(None, "r3")
    state.record_files(req, ["raw/acme/crm/contacts/a", "raw/acme/crm/contacts/b"])
    state.record_files(req, ["raw/acme/crm/contacts/a"])
    assert state.processed_files(req) == {"raw/acme/crm/contacts/a", "raw/acme/crm/contacts/b"}
    many = [f"raw/acme/crm/contacts/x{i:05d}" for i in range(1200)]  # several look-ups
    state.record_files(req, many[::3])
    asked = ["raw/acme/crm/contacts/b", "raw/acme/crm/contacts/c", *many]
    assert state.processed_files(req, asked) == {"raw/acme/crm/contacts/b", *many[::3]}
    assert state.processed_files(req, []) == set()


def test_unknown_scheme_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="postgresql://, sqlite://"):
        open_state_store("mysql://x")


def test_unreachable_database_is_one_retryable_line_without_the_password() -> None:
    from canonflow.errors import StoreUnavailable

    with pytest.raises(StoreUnavailable) as info:
        open_state_store("postgresql://u:hunter2@127.0.0.1:1/db?connect_timeout=2")
    assert "hunter2" not in str(info.value) and "***" in str(info.value)


def test_leases_exclude_other_holders_until_released_or_expired(state: StateStore) -> None:
    assert state.acquire_lock("canonical/contact/acme", "a", ttl=60)
    assert state.acquire_lock("canonical/contact/acme", "a", ttl=60)  # renewal
    assert not state.acquire_lock("canonical/contact/acme", "b", ttl=60)
    assert state.acquire_lock("canonical/contact/globex", "b", ttl=60)  # another name
    state.release_lock("canonical/contact/acme", "b")  # not b's: no effect
    assert not state.acquire_lock("canonical/contact/acme", "b", ttl=60)
    state.release_lock("canonical/contact/acme", "a")
    assert state.acquire_lock("canonical/contact/acme", "b", ttl=0.0)
    assert state.acquire_lock("canonical/contact/acme", "c", ttl=60)  # b's lease expired


def test_a_lapsed_lease_cannot_be_renewed_even_if_nobody_took_it(state: StateStore) -> None:
    """Once a lease lapsed, others may have acted on it (a runner's jobs adopted: they ask
    whether its lease is live, not whether someone took it): its renewal fails, so its
    holder hears it lost the lease."""
    assert state.acquire_lock("runner:a", "a", ttl=60)
    assert state.renew_lock("runner:a", "a", ttl=0.0)  # held: renewed (to lapse at once)
    time.sleep(0.01)
    assert state.live_locks(["runner:a"]) == {}  # lapsed: the runner counts as gone
    assert not state.renew_lock("runner:a", "a", ttl=60)
    assert not state.renew_lock("runner:a", "b", ttl=60)  # never another holder's
    assert state.acquire_lock("runner:a", "a", ttl=60)  # taken anew, explicitly


def test_several_leases_are_taken_where_free_and_released_together(
        state: StateStore) -> None:
    x, y, z = "canonical/contact/x", "canonical/deal/x", "canonical/contact/y"
    assert state.acquire_lock(z, "b", ttl=60)
    assert state.acquire_locks([y, x, z, x], "a", ttl=60) == {x, y}  # z is b's: not taken
    assert not state.acquire_lock(x, "b", ttl=60) and not state.acquire_lock(y, "b", ttl=60)
    assert state.acquire_locks([x, y], "a", ttl=60) == {x, y}  # renewal
    assert state.renew_lock(x, "a", ttl=60)
    state.release_locks([x, y, z], "a")  # z is not a's: it stays b's
    assert state.acquire_lock(x, "b", ttl=60) and state.acquire_lock(y, "b", ttl=0.0)
    assert not state.acquire_lock(z, "a", ttl=60)
    assert state.acquire_locks([y, z], "a", ttl=60) == {y}  # b's lease of y expired
    assert state.acquire_locks([], "a", ttl=60) == set()
    state.release_locks([], "a")


def test_retryable_failures_go_back_to_the_outbox_until_attempts_run_out(
        state: StateStore) -> None:
    state.create_job("j", "acme", "p", "aggregated", specs("j", 1))
    state.complete_chunk(result("j", 0))
    state.finish_aggregation("j", "completed", [request("j", "r")], {})
    for attempt in (1, 2):
        assert [r.request_id for r in state.claim_for_dispatch(job_ids={"j"})] == ["r"]
        assert state.claim_request("r", lease_seconds=60) == attempt
        assert state.retry_later("r", "store busy", max_attempts=3)
    assert state.claim_for_dispatch(job_ids={"other"}) == []
    assert state.claim_request("r", lease_seconds=60) == 3
    assert not state.retry_later("r", "store busy", max_attempts=3)
    record = state.request("r")
    assert record is not None and record.status == "failed"
    assert record.error == "gave up after 3 attempt(s); last error: store busy"
    assert state.job("j").status == "failed"  # type: ignore[union-attr]


def test_a_request_naming_a_job_the_store_does_not_know_runs_and_ends(
        state: StateStore) -> None:
    """A transform event may name a job this store never had (a legacy per-batch event, a
    request sent by hand): its row is added, claimed, and ended like any other, done or
    failed, and leaves nothing open."""
    res = TransformResult(request_id="r1", tenant_id="acme", service_name="crm",
                          table_name="contacts", entity="contact",
                          processing_mode="file_specific")
    assert state.claim_request("r1", 60, holder="w:1:a", enqueue=request("nojob", "r1")) == 1
    assert state.finish_request("r1", res, holder="w:1:a")
    record = state.request("r1")
    assert record is not None and record.status == "done"
    assert state.claim_request("r2", 60, holder="w:1:a", enqueue=request("nojob", "r2")) == 1
    assert not state.retry_later("r2", "store busy", max_attempts=1, holder="w:1:a")
    record = state.request("r2")
    assert record is not None and record.status == "failed"
    assert state.outbox_backlog().waiting == 0
    assert state.job("nojob") is None


# -- invariant 9: a completion is accepted only for a chunk of that job ---------------------
def test_a_completion_for_a_chunk_not_in_the_job_is_refused_and_not_counted(
        state: StateStore) -> None:
    from canonflow.errors import InvalidCompletion

    state.create_job("j", "acme", "p", "aggregated", specs("j", 2))
    state.complete_chunk(result("j", 0))
    with pytest.raises(InvalidCompletion, match="'c7' is not part of job 'j'"):
        state.complete_chunk(result("j", 7))
    other = TableRef(tenant_id="globex", service_name="crm", table_name="contacts")
    with pytest.raises(InvalidCompletion, match=r"belongs to acme/crm\.contacts"):
        state.complete_chunk(result("j", 1).model_copy(update={"table_metadata": other}))
    job = state.job("j")
    assert job is not None and (job.completed_chunks, job.status) == (1, "running")
    assert state.complete_chunk(result("j", 1)).claimed  # the real last chunk claims


# -- the rule for a chunk reported more than once --------------------------------------------
def _files(job: str, i: int, n: int, ok: bool = True) -> ChunkResult:
    keys = [f"raw/acme/crm/contacts/{job}/c{i}/part-{k:05d}.jsonl.zst" for k in range(n)]
    return result(job, i, ok).model_copy(update={"s3_files_written": keys, "s3_files_count": n})


def test_a_successful_retry_supersedes_a_failure_before_the_claim(state: StateStore) -> None:
    state.create_job("j", "acme", "p", "aggregated", specs("j", 2))
    state.complete_chunk(result("j", 0, ok=False))
    again = state.complete_chunk(_files("j", 0, 2))
    assert (again.new, again.superseded, again.completed) == (False, True, 1)
    job = state.job("j")
    assert job is not None and job.failed_chunks == 0
    (recorded,) = [r for r in state.chunk_results("j") if r.chunk_id == "c0"]
    assert recorded.completed and recorded.s3_files_count == 2
    assert [e.kind for e in state.events("j")] == ["retry_succeeded"]
    # a failure after a success changes nothing
    assert not state.complete_chunk(result("j", 0, ok=False)).superseded
    assert state.job("j").failed_chunks == 0  # type: ignore[union-attr]


def test_a_conflicting_success_replaces_the_file_list_and_is_reported(
        state: StateStore) -> None:
    state.create_job("j", "acme", "p", "aggregated", specs("j", 2))
    state.complete_chunk(_files("j", 0, 1))
    assert not state.complete_chunk(_files("j", 0, 1)).superseded  # the same: a duplicate
    assert state.complete_chunk(_files("j", 0, 3)).superseded
    (recorded,) = [r for r in state.chunk_results("j") if r.chunk_id == "c0"]
    assert recorded.s3_files_count == 3
    (event,) = state.events("j")
    assert event.kind == "conflicting_success" and "3 file(s)" in event.detail


def test_late_results_after_the_claim_change_nothing_and_are_reported(
        state: StateStore) -> None:
    state.create_job("j", "acme", "p", "aggregated", specs("j", 1))
    assert state.complete_chunk(result("j", 0, ok=False)).claimed
    late = state.complete_chunk(_files("j", 0, 1))
    assert not late.superseded and not late.claimed
    job = state.job("j")
    assert job is not None and job.failed_chunks == 1
    assert [e.kind for e in state.events("j")] == ["late_retry_succeeded"]


# -- one unfinished job per (pipeline, tenant), cancel, failed planning --------------------
def test_one_exclusive_unfinished_job_per_pipeline_and_tenant(state: StateStore) -> None:
    from canonflow.errors import ActiveJobExists

    state.create_job("j1", "acme", "p", "aggregated", specs("j1", 1), runner="r1",
                     exclusive=True)
    with pytest.raises(ActiveJobExists) as info:
        state.create_job("j2", "acme", "p", "aggregated", specs("j2", 1), exclusive=True)
    assert info.value.job_id == "j1"
    assert state.job("j2") is None
    state.create_job("j3", "globex", "p", "aggregated", specs("j3", 1), exclusive=True)
    state.create_job("j4", "acme", "other", "aggregated", specs("j4", 1), exclusive=True)
    assert state.active_job("p", "acme") == "j1"
    # the job ends: the tenant may start again
    state.complete_chunk(result("j1", 0))
    state.finish_aggregation("j1", "completed", [], {})
    assert state.job("j1").status == "done"  # type: ignore[union-attr]
    assert state.active_job("p", "acme") is None
    state.create_job("j5", "acme", "p", "aggregated", specs("j5", 1), exclusive=True)


def test_adopting_a_job_has_one_winner(state: StateStore) -> None:
    state.create_job("j", "acme", "p", "aggregated", specs("j", 1), runner="dead")
    assert state.adopt_job("j", "r2", previous="dead")
    assert not state.adopt_job("j", "r3", previous="dead")
    assert state.job("j").runner == "r2"  # type: ignore[union-attr]


def test_cancel_stops_a_job_and_its_unstarted_transforms(state: StateStore) -> None:
    state.create_job("j", "acme", "p", "aggregated", specs("j", 1), exclusive=True)
    state.complete_chunk(result("j", 0))
    state.finish_aggregation("j", "completed", [request("j", "r1"), request("j", "r2")], {})
    assert state.claim_request("r1", 60) == 1  # r1 started already
    assert state.cancel_job("j", "operator said so")
    assert not state.cancel_job("j", "twice")
    job = state.job("j")
    assert job is not None and job.status == "cancelled"
    assert {r.request.request_id: r.status for r in state.requests("j")} == {
        "r1": "running", "r2": "cancelled"}
    assert state.claim_request("r2", 0) is None
    assert state.active_job("p", "acme") is None
    assert [e.kind for e in state.events("j")] == ["cancelled"]
    with pytest.raises(UnknownJob):
        state.cancel_job("nope", "x")


def test_a_tenant_that_cannot_be_planned_is_a_failed_job_with_its_reason(
        state: StateStore) -> None:
    state.record_failed_job("j", "acme", "p", "aggregated", "HTTP 401 token=abc12345")
    job = state.job("j")
    assert job is not None and (job.status, job.outcome) == ("failed", "failed")
    assert job.report["error"] == "HTTP 401 token=***"


# -- attempts, leases and holders ---------------------------------------------------------------
def test_a_failure_before_the_claim_uses_up_an_attempt(state: StateStore) -> None:
    assert state.enqueue_request(request(None, "r"))
    for _ in range(2):
        assert state.claim_for_dispatch() != []
        assert state.retry_later("r", "store busy", max_attempts=3)
    assert state.claim_for_dispatch() != []
    assert not state.retry_later("r", "store busy", max_attempts=3)
    assert state.request("r").status == "failed"  # type: ignore[union-attr]


def test_the_sweeper_fails_a_request_that_used_every_attempt(state: StateStore) -> None:
    state.create_job("j", "acme", "p", "aggregated", specs("j", 1))
    state.complete_chunk(result("j", 0))
    state.finish_aggregation("j", "completed", [request("j", "r")], {})
    for attempt in (1, 2, 3):
        assert state.claim_request("r", lease_seconds=0) == attempt  # each worker "died"
    assert state.claim_for_dispatch(lease_seconds=0, max_attempts=3) == []
    record = state.request("r")
    assert record is not None and record.status == "failed"
    assert "gave up after 3 attempt(s)" in (record.error or "")
    assert state.job("j").status == "failed"  # type: ignore[union-attr]


def test_a_request_of_a_dead_holder_is_taken_over_before_its_lease_expires(
        state: StateStore) -> None:
    assert state.enqueue_request(request(None, "r"))
    assert state.claim_request("r", 60, holder="h1") == 1
    assert state.claim_request("r", 60, holder="h2", holder_dead=lambda h: False) is None
    assert state.claim_request("r", 60, holder="h2", holder_dead=lambda h: h == "h1") == 2
    assert state.request("r").holder == "h2"  # type: ignore[union-attr]
    assert state.touch_request("r", "h2") and not state.touch_request("r", "h1")


def test_a_lease_of_a_dead_holder_can_be_taken_over(state: StateStore) -> None:
    assert state.acquire_lock("t", "a", ttl=60)
    assert not state.acquire_lock("t", "b", ttl=60)
    assert state.lock_holder("t")[0] == "a"  # type: ignore[index]
    assert not state.acquire_lock("t", "b", ttl=60, steal_from="c")
    assert state.acquire_lock("t", "b", ttl=60, steal_from="a")
    assert state.live_locks(["t", "u"]) == {"t": "b"}


def test_activity_lists_only_what_changed_since(state: StateStore) -> None:
    import time

    state.create_job("j", "acme", "p", "aggregated", specs("j", 2))
    first = state.activity(["j"], 0.0)
    assert [j.job_id for j in first.jobs] == ["j"] and first.chunk_results == []
    time.sleep(0.01)
    state.complete_chunk(result("j", 0))
    later = state.activity(["j"], first.as_of)
    assert [r.chunk_id for r in later.chunk_results] == ["c0"]
    assert state.activity(["j"], later.as_of + 0.001).chunk_results == []


def test_sync_cursors_read_the_marks_asked_for_in_one_call(state: StateStore) -> None:
    def ref(tenant: str, table: str) -> TableRef:
        return TableRef(tenant_id=tenant, service_name="crm", table_name=table)

    tables = [ref("acme", f"t{i:03d}") for i in range(130)]  # more than a batch of 100
    for i, table in enumerate(tables[::2]):
        assert state.advance_cursor(table, f"2026-01-01T00:00:{i % 60:02d}Z", "job-1")
    assert state.advance_cursor(ref("globex", "t000"), "2030-01-01T00:00:00Z", "job-2")
    assert not state.advance_cursor(tables[0], "2025-01-01T00:00:00Z", "job-3")  # never back
    marks = state.sync_cursors(tables)
    assert set(marks) == set(tables[::2])  # never synced: absent; another tenant's: not asked
    assert marks[tables[2]] == "2026-01-01T00:00:01Z"
    assert marks[tables[0]] == "2026-01-01T00:00:00Z"
    assert state.sync_cursors([ref("globex", "t000"), ref("globex", "t001")]) == {
        ref("globex", "t000"): "2030-01-01T00:00:00Z"}
    assert state.sync_cursors([]) == {}


def test_a_group_of_requests_ends_together_each_under_its_holder(state: StateStore) -> None:
    """``finish_requests``: each request ends as ``finish_request`` would (files into the
    ledger, the mark moved forward only, the row ended only under its holder) and each job
    settles once all its requests ended, whatever the order of the group."""
    def req(job: str, tenant: str) -> TransformRequest:
        return TransformRequest(tenant_id=tenant, service_name="crm", table_name="contacts",
                                job_id=job, request_id=f"{job}:crm:contacts", source_files=[])

    def res(r: TransformRequest) -> TransformResult:
        return TransformResult(request_id=r.request_id, tenant_id=r.tenant_id,
                               service_name="crm", table_name="contacts", entity="contact",
                               processing_mode="file_specific", records_written=3)

    jobs = {"j2": "globex", "j1": "acme", "j3": "initech"}
    reqs = {}
    for job, tenant in jobs.items():
        state.create_job(job, tenant, "p", "aggregated", specs(job, 1))
        state.complete_chunk(result(job, 0))
        reqs[job] = req(job, tenant)
        extra = [req(job, tenant).model_copy(update={"request_id": f"{job}:more"})] \
            if job == "j3" else []  # j3 has a second request, still open after the group
        state.finish_aggregation(job, "completed", [reqs[job], *extra], {})
    for job in ("j1", "j2"):
        assert state.claim_request(reqs[job].request_id, 60, holder="h") == 1
    assert state.claim_request(reqs["j3"].request_id, 60, holder="other") == 1
    state.advance_cursor(reqs["j2"].table, "2030-01-01T00:00:00Z", "older")
    ends = [(res(reqs[job]), Progress(reqs[job], [f"raw/{job}/a", f"raw/{job}/b"],
                                      "2026-06-01T00:00:00Z"))
            for job in ("j2", "j3", "j1")]
    assert state.finish_requests(ends, holder="h") == [True, False, True]
    for job in ("j1", "j2", "j3"):  # the ledger takes the files whatever the holder
        assert state.processed_files(reqs[job]) == {f"raw/{job}/a", f"raw/{job}/b"}
    marks = state.sync_cursors([reqs[j].table for j in jobs])
    assert marks[reqs["j1"].table] == "2026-06-01T00:00:00Z"
    assert marks[reqs["j2"].table] == "2030-01-01T00:00:00Z"  # never back
    one, two, three = (state.request(reqs[j].request_id) for j in ("j1", "j2", "j3"))
    assert one is not None and one.status == "done" and one.result == res(reqs["j1"])
    assert two is not None and two.status == "done"
    assert three is not None and three.status == "running"  # another holder's: untouched
    assert [state.job(j).status for j in ("j1", "j2", "j3")] == [  # type: ignore[union-attr]
        "done", "done", "transforms_enqueued"]
    assert state.finish_requests(ends[:1], holder="h") == [False]  # ended already
    assert state.finish_requests([], holder="h") == []


def test_the_chunks_of_one_task_complete_together_as_one_by_one(state: StateStore) -> None:
    """``complete_chunks`` counts each new result once, in order; a repeat in the same call
    is not new; the result that completes the job claims it, once."""
    state.create_job("j", "acme", "p", "aggregated", specs("j", 4))
    done = state.complete_chunks([result("j", 0), result("j", 1, ok=False), result("j", 0)])
    assert [(c.new, c.completed, c.claimed) for c in done] == [
        (True, 1, False), (True, 2, False), (False, 2, False)]
    last = state.complete_chunks([result("j", 2), result("j", 3)])
    assert [(c.completed, c.total, c.claimed) for c in last] == [(3, 4, False), (4, 4, True)]
    assert not any(c.claimed or c.new for c in state.complete_chunks(
        [result("j", 3), result("j", 2)]))  # delivered again: nothing new, no second claim
    job = state.job("j")
    assert job is not None
    assert (job.status, job.completed_chunks, job.failed_chunks) == ("aggregating", 4, 1)
    assert state.complete_chunks([]) == []
