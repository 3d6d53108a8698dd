"""One contract for every state store backend: the atomic steps of the protocol."""

from collections.abc import Iterator
from pathlib import Path

import pytest

from canonflow.errors import ConfigError, UnknownJob
from canonflow.model import ChunkResult, ChunkSpec, TableRef, TransformRequest, TransformResult
from canonflow.stores import StateStore, open_state_store

T = TableRef(tenant_id="acme", service_name="crm", table_name="contacts")


@pytest.fixture(params=["sqlite", "postgres"])
def state(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StateStore]:
    if request.param == "postgres":
        url = request.getfixturevalue("postgres_url")
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
