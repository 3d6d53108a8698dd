"""Crashes between the protocol's steps: the sweeper finishes the work exactly once."""

from __future__ import annotations

import pytest

from canonflow.aggregate import complete_chunk
from canonflow.chunk import process_chunk
from canonflow.dispatch import open_dispatcher
from canonflow.plan import plan_job
from canonflow.query import run_query
from canonflow.report import job_report
from canonflow.runner import JobRunner, recover
from canonflow.runtime import Runtime

TABLES = {"crm": ["companies", "deals"], "helpdesk": ["users"]}


@pytest.fixture(params=["sqlite", "dynamodb"])
def settings(request: pytest.FixtureRequest, make_settings):  # type: ignore[no-untyped-def]
    """The pipeline's settings on each state store backend."""
    if request.param == "dynamodb":
        return make_settings(tables=TABLES, state_store=request.getfixturevalue("dynamodb_url"))
    return make_settings(tables=TABLES)


def count(rt: Runtime, entity: str) -> int:
    _, rows = run_query(rt.canonical._store, f"SELECT count(*) FROM {entity}")
    return int(rows[0][0])


def test_crash_between_outbox_commit_and_dispatch(settings) -> None:
    rt = Runtime(settings)
    plan = plan_job(rt.settings, rt, "acme")
    rt.state.create_job(plan.job_id, "acme", "t", "aggregated", plan.chunks)
    for spec in plan.chunks:
        complete_chunk(rt, process_chunk(spec, rt))
    # the aggregator committed its outbox rows, then the process died before dispatching
    assert rt.state.job(plan.job_id).status == "transforms_enqueued"  # type: ignore[union-attr]
    dispatcher = open_dispatcher("inline://", rt.settings)
    swept = recover(rt, dispatcher, older_than=0)
    assert swept["transforms_redispatched"] == 3
    assert recover(rt, dispatcher, older_than=0)["transforms_redispatched"] == 0
    report = job_report(rt.state, plan.job_id)
    assert report["status"] == "done"
    assert all(t["transforms_triggered"] == 1 for t in report["tables"].values())
    assert count(rt, "company") == 1200 and count(rt, "user") == 1200


def test_crash_between_claim_and_aggregation(settings) -> None:
    rt = Runtime(settings)
    plan = plan_job(rt.settings, rt, "acme")
    rt.state.create_job(plan.job_id, "acme", "t", "aggregated", plan.chunks)
    claims = [rt.state.complete_chunk(process_chunk(s, rt)).claimed for s in plan.chunks]
    assert claims.count(True) == 1  # claimed, then died before writing any outbox row
    assert rt.state.requests(plan.job_id) == []
    dispatcher = open_dispatcher("inline://", rt.settings)
    assert recover(rt, dispatcher, older_than=0)["jobs_reaggregated"] == 1
    assert recover(rt, dispatcher, older_than=0)["jobs_reaggregated"] == 0
    assert len(rt.state.requests(plan.job_id)) == 3
    assert job_report(rt.state, plan.job_id)["status"] == "done"


class DuplicatingDispatcher:
    """At-least-once delivery made visible: every task is delivered twice."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.url = inner.url

    def submit_chunk(self, spec):
        self.inner.submit_chunk(spec)
        return self.inner.submit_chunk(spec)

    def submit_chunks(self, specs):
        self.inner.submit_chunks(specs)
        return self.inner.submit_chunks(specs)

    def submit_transform(self, request):
        self.inner.submit_transform(request)
        return self.inner.submit_transform(request)

    def lost_in_worker(self, key: str) -> bool:
        return True

    def close(self) -> None:
        self.inner.close()


def test_every_task_delivered_twice_changes_nothing(settings) -> None:
    rt = Runtime(settings)
    dispatcher = DuplicatingDispatcher(open_dispatcher("inline://", settings))
    (job_id,) = JobRunner(settings, rt, dispatcher).run()
    report = job_report(rt.state, job_id)
    assert report["status"] == "done" and report["outcome"] == "completed"
    assert len(report["transforms"]) == 3
    assert all(t["attempts"] == 1 for t in report["transforms"])
    assert count(rt, "company") == 1200 and count(rt, "deal") == 1198


def test_every_task_of_several_chunks_delivered_twice_changes_nothing(
        settings, make_settings) -> None:
    """Small tables (each read whole by the page planning read) run as one task of several
    chunks: delivered twice, each chunk is still counted once and the job aggregated once,
    on every state store (SQL: one transaction for the task's results; DynamoDB: one per
    chunk)."""
    small = settings.model_copy(update={"sources": [
        s.model_copy(update={"page_size": 2000}) for s in settings.sources]})
    rt = Runtime(small)
    tasks: list[int] = []
    inner = open_dispatcher("inline://", small)
    submit = inner.submit_chunks

    def counted(specs):  # type: ignore[no-untyped-def]
        tasks.append(len(specs))
        return submit(specs)

    inner.submit_chunks = counted  # type: ignore[method-assign]
    (job_id,) = JobRunner(small, rt, DuplicatingDispatcher(inner)).run()
    assert tasks == [3, 3], tasks  # the job's three chunks in one task, delivered twice
    report = job_report(rt.state, job_id)
    assert report["status"] == "done" and report["outcome"] == "completed"
    assert len(rt.state.chunk_results(job_id)) == 3
    job = rt.state.job(job_id)
    assert job is not None and (job.completed_chunks, job.total_chunks) == (3, 3)
    assert len(report["transforms"]) == 3
    assert all(t["attempts"] == 1 for t in report["transforms"])
    assert count(rt, "company") == 1200 and count(rt, "deal") == 1198


def stuck(rt: Runtime, tenant: str, pipeline: str) -> str:
    """A job claimed by its last completer, which died before aggregating it."""
    plan = plan_job(rt.settings, rt, tenant)
    rt.state.create_job(plan.job_id, tenant, pipeline, "aggregated", plan.chunks)
    for spec in plan.chunks:
        rt.state.complete_chunk(process_chunk(spec, rt))
    assert rt.state.requests(plan.job_id) == []
    return plan.job_id


def test_the_sweeper_aggregates_its_own_pipelines_jobs_and_one_failure_stops_no_other(
        settings, tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Pipelines may share a state store, not their object stores: a sweep of one never
    aggregates another's job (its manifests would land in the wrong store). A job whose
    aggregation fails is logged and left to the next sweep; the others are aggregated."""
    import canonflow.runner as runner_module
    from canonflow.errors import StoreUnavailable

    other = settings.model_copy(update={"name": "other",
                                        "object_store": f"file://{tmp_path / 'other'}"})
    rt, rt_other = Runtime(settings), Runtime(other)
    try:
        theirs = stuck(rt_other, "acme", "other")
        mine = [stuck(rt, "acme", settings.name), stuck(rt, "acme", settings.name)]
        aggregate = runner_module.aggregate_job

        def first_fails(rt_: Runtime, job_id: str) -> object:
            if job_id == mine[0]:
                raise StoreUnavailable("the object store is not reachable")
            return aggregate(rt_, job_id)

        monkeypatch.setattr(runner_module, "aggregate_job", first_fails)
        dispatcher = open_dispatcher("inline://", rt.settings)
        swept = recover(rt, dispatcher, older_than=0, pipeline=settings.name)
        assert swept["jobs_reaggregated"] == 1
        assert rt.state.requests(theirs) == [] and rt.state.requests(mine[0]) == []
        assert len(rt.state.requests(mine[1])) == 3
        monkeypatch.setattr(runner_module, "aggregate_job", aggregate)
        assert recover(rt, dispatcher, older_than=0, pipeline=settings.name)[
            "jobs_reaggregated"] == 1  # the next sweep: the one that failed
        assert len(rt.state.requests(mine[0])) == 3 and rt.state.requests(theirs) == []
    finally:
        rt.close()
        rt_other.close()
