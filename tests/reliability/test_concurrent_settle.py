"""Settling a job after its last transform is race-free: many jobs whose transforms finish
at the same instant, from two processes at once, on every backend; every job ends done."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from canonflow.model import ChunkResult, ChunkSpec, TableRef, TransformRequest, TransformResult
from canonflow.stores import open_state_store
from tests.processes import run_together

JOBS = 40
TABLES = [TableRef(tenant_id="acme", service_name="crm", table_name=t)
          for t in ("contacts", "companies")]


def _request(job_id: str, table: TableRef) -> TransformRequest:
    return TransformRequest(tenant_id=table.tenant_id, service_name=table.service_name,
                            table_name=table.table_name, job_id=job_id, trigger="aggregated",
                            request_id=f"{job_id}:{table.service_name}:{table.table_name}",
                            source_files=[])


def _result(request: TransformRequest) -> TransformResult:
    return TransformResult(request_id=request.request_id, tenant_id=request.tenant_id,
                           service_name=request.service_name, table_name=request.table_name,
                           entity="contact", processing_mode="file_specific")


def _prepare(url: str) -> list[str]:
    """JOBS jobs, each aggregated with one claimed (running) transform per table."""
    state = open_state_store(url)
    job_ids = [f"job-{n:03d}" for n in range(JOBS)]
    for job_id in job_ids:
        specs = [ChunkSpec(job_id=job_id, chunk_id=t.table_name, table=t, start_page=1,
                           end_page=1, page_size=10, batch_records=10) for t in TABLES]
        state.create_job(job_id, "acme", "settle", "aggregated", specs)
        for spec in specs:
            state.complete_chunk(ChunkResult(
                job_id=job_id, chunk_id=spec.chunk_id, completed=True, records_processed=0,
                processing_time=0.0, s3_files_count=0, table_metadata=spec.table))
        requests = [_request(job_id, t) for t in TABLES]
        assert state.finish_aggregation(job_id, "completed", requests, {})
        for r in requests:
            assert state.claim_request(r.request_id, 60.0) == 1
    state.close()
    return job_ids


def _finish(url: str, table_index: int, job_ids: list[str], barrier: Any) -> None:
    state = open_state_store(url)
    table = TABLES[table_index]
    for job_id in job_ids:
        request = _request(job_id, table)
        barrier.wait()  # both transforms of this job finish at the same instant
        state.finish_request(request.request_id, _result(request))
    state.close()


@pytest.mark.parametrize("backend", ["sqlite", "postgres", "dynamodb"])
def test_transforms_finishing_together_settle_every_job(
        tmp_path: Path, backend: str, request: pytest.FixtureRequest) -> None:
    url = (request.getfixturevalue(f"{backend}_url") if backend != "sqlite"
           else f"sqlite:///{tmp_path}/state.db")
    job_ids = _prepare(url)
    run_together(_finish, [(url, i, job_ids) for i in range(len(TABLES))])
    state = open_state_store(url)
    try:
        statuses = {j: state.job(j).status for j in job_ids}  # type: ignore[union-attr]
        unsettled = sorted(j for j, s in statuses.items() if s != "done")
        assert not unsettled, f"{len(unsettled)} of {JOBS} jobs left unsettled: {unsettled[:5]}"
    finally:
        state.close()


def test_the_sweeper_settles_a_job_left_unsettled(tmp_path: Path) -> None:
    """A job whose outbox rows are all finished while the job is not (the state an older
    version could leave behind) is settled by the sweeper's settle step."""
    url = f"sqlite:///{tmp_path}/state.db"
    state = open_state_store(url)
    specs = [ChunkSpec(job_id="j", chunk_id="c", table=TABLES[0], start_page=1, end_page=1,
                       page_size=10, batch_records=10)]
    state.create_job("j", "acme", "settle", "aggregated", specs)
    state.complete_chunk(ChunkResult(job_id="j", chunk_id="c", completed=True,
                                     records_processed=0, processing_time=0.0,
                                     s3_files_count=0, table_metadata=TABLES[0]))
    r = _request("j", TABLES[0])
    state.finish_aggregation("j", "completed", [r], {})
    state.claim_request(r.request_id, 60.0)
    # finish the row behind the store's back, as a racing settle would have left it
    import sqlalchemy as sa

    from canonflow.stores.sql import outbox
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.execute(outbox.update().values(status="done"))
    engine.dispose()
    assert state.job("j").status == "transforms_enqueued"  # type: ignore[union-attr]
    assert state.settle_jobs() == ["j"]
    assert state.job("j").status == "done"  # type: ignore[union-attr]
    assert state.settle_jobs() == []
    state.close()
