"""Failures stay where they belong: a tenant that cannot be planned fails alone, a second
run of the same tenant does not extract twice, bad settings stop a run before any job
exists, brief errors are retried (bounded), and a dead worker's locks and requests are
taken over at once."""

from __future__ import annotations

import logging
import subprocess
import sys
import threading
import time
from concurrent.futures import Future
from concurrent.futures.process import BrokenProcessPool
from typing import Any

import pytest

from canonflow.config import TenantConfig
from canonflow.dispatch import open_dispatcher
from canonflow.errors import CommitConflict, ConfigError, StoreUnavailable
from canonflow.model import ChunkSpec, TransformRequest
from canonflow.report import job_report
from canonflow.runner import JobRunner
from canonflow.runtime import Runtime
from canonflow.stores.obstore_backend import ObstoreObjectStore

TABLES = {"crm": ["companies"], "helpdesk": ["users"]}


def test_a_tenant_with_bad_credentials_fails_alone(make_settings) -> None:
    settings = make_settings(tenants=("acme", "globex", "initech"), tables=TABLES)
    bad = TenantConfig.model_validate({"tenant_id": "globex", "credentials": {
        svc: {"token": "not-the-token"} for svc in TABLES}})
    settings = settings.model_copy(update={"tenants": [
        bad if t.tenant_id == "globex" else t for t in settings.tenants]})
    rt = Runtime(settings)
    job_ids = JobRunner(settings, rt, open_dispatcher("inline://", settings)).run()
    reports = {r["tenant_id"]: r for r in (job_report(rt.state, j) for j in job_ids)}
    assert set(reports) == {"acme", "globex", "initech"}
    for tenant in ("acme", "initech"):
        assert (reports[tenant]["status"], reports[tenant]["outcome"]) == ("done", "completed")
    globex = reports["globex"]
    assert (globex["status"], globex["outcome"]) == ("failed", "failed")
    assert "HTTP 401" in globex["error"] and "not-the-token" not in globex["error"]
    assert [j.tenant_id for j in rt.state.jobs() if j.status == "failed"] == ["globex"]


def test_unknown_tenants_and_duplicate_runs_are_refused_before_extracting(
        make_settings) -> None:
    settings = make_settings(tenants=("acme", "globex"), tables=TABLES)
    rt = Runtime(settings)
    with pytest.raises(ConfigError, match=r"tenant\(s\) nobody not in pipeline"):
        JobRunner(settings, rt, open_dispatcher("inline://", settings)).run(["nobody"])
    # acme's job is being driven by a live runner elsewhere
    from canonflow.lease import holder_id, runner_lock

    other = holder_id()
    rt.state.acquire_lock(runner_lock(other), other, ttl=60)
    rt.state.create_job("job-elsewhere", "acme", settings.name, "aggregated", [],
                        runner=other, exclusive=True)
    requests_before = _api_requests(rt)
    runner = JobRunner(settings, rt, open_dispatcher("inline://", settings))
    job_ids = runner.run()
    assert list(runner.refused) == ["acme"]
    assert "job-elsewhere is already running" in runner.refused["acme"]
    assert [rt.state.job(j).tenant_id for j in job_ids] == ["globex"]  # type: ignore[union-attr]
    assert _api_requests(rt) == requests_before  # nothing of acme was fetched


def _api_requests(rt: Runtime) -> int:
    return sum(c._client.__dict__.get("_requests", 0) for c in rt.clients.open.values())


def test_two_runs_at_once_start_one_job_per_tenant(make_settings) -> None:
    settings = make_settings(tenants=("acme", "globex"), tables=TABLES)
    barrier = threading.Barrier(2)
    outcomes: list[tuple[list[str], dict[str, str]]] = []

    def run() -> None:
        rt = Runtime(settings)
        runner = JobRunner(settings, rt, open_dispatcher("inline://", settings))
        runner.validate()
        barrier.wait()
        outcomes.append((runner.run(), runner.refused))
        rt.close()

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    rt = Runtime(settings)
    jobs = rt.state.jobs()
    assert sorted(j.tenant_id for j in jobs) == ["acme", "globex"]  # never two per tenant
    refused = [tenant for _, r in outcomes for tenant in r]
    started = [j for ids, _ in outcomes for j in ids]
    assert len(started) + len(refused) == 4 and len(set(started)) == len(started)
    assert all(j.status == "done" for j in jobs)


def test_duplicate_tenant_ids_are_a_config_error(make_settings) -> None:
    with pytest.raises(ValueError, match="duplicate tenant_id acme"):
        make_settings(tenants=("acme", "acme"), tables=TABLES)


def test_a_store_that_cannot_open_stops_the_run_before_any_job(make_settings) -> None:
    settings = make_settings(tables=TABLES, dispatcher="local://?workers=1")
    good = Runtime(settings)
    broken = settings.model_copy(update={"object_store": "nosuch://bucket"})
    dispatcher = open_dispatcher(broken.dispatcher, broken)
    try:
        with pytest.raises(ConfigError, match="nosuch://"):
            JobRunner(broken, Runtime(broken), dispatcher).run()
    finally:
        dispatcher.close()
    assert good.state.jobs() == []


def test_a_chunk_that_fails_with_a_retryable_error_is_retried(
        make_settings, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    settings = make_settings(tables={"crm": ["companies"]}, chunk_attempts=3)
    real_put = ObstoreObjectStore.put
    failed: set[str] = set()

    def flaky_put(self: ObstoreObjectStore, key: str, data: bytes, **kw: Any) -> None:
        if key.startswith("raw/") and key.endswith("part-00000.jsonl.zst") and key not in failed:
            failed.add(key)  # every chunk's first write fails once
            raise StoreUnavailable("object store briefly unavailable")
        real_put(self, key, data, **kw)

    monkeypatch.setattr(ObstoreObjectStore, "put", flaky_put)
    rt = Runtime(settings)
    with caplog.at_level(logging.WARNING, logger="canonflow.retry"):
        (job_id,) = JobRunner(settings, rt, open_dispatcher("inline://", settings)).run()
    report = job_report(rt.state, job_id)
    assert (report["status"], report["outcome"]) == ("done", "completed")
    (table,) = report["tables"].values()
    assert table["records_extracted"] == 1200 and table["records_canonical"] > 0
    retries = [r for r in caplog.records if getattr(r, "retry_kind", None) == "chunk"]
    assert len(retries) == len(failed) == table["chunks"]


def test_a_transform_that_keeps_failing_unexpectedly_fails_visibly_after_its_attempts(
        make_settings, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = make_settings(tables={"crm": ["companies"]}, transform_max_attempts=3)

    def broken(request: TransformRequest, rt: Runtime) -> Any:
        rt.state.claim_request(request.request_id, 60.0, holder=rt.holder)
        raise RuntimeError("a bug in a transform")

    monkeypatch.setattr("canonflow.dispatch.tasks.run_transform", broken)
    rt = Runtime(settings)
    (job_id,) = JobRunner(settings, rt, open_dispatcher("inline://", settings)).run()
    report = job_report(rt.state, job_id)
    assert report["status"] == "failed"
    (transform,) = report["transforms"]
    assert transform["status"] == "failed" and transform["attempts"] == 3
    assert transform["error"] == ("gave up after 3 attempt(s); last error: "
                                  "RuntimeError: a bug in a transform")


class LosesFirstTransform:
    """The first transform's worker dies (a broken pool), as a killed worker does."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.url, self.lost = inner, inner.url, 0

    def submit_chunk(self, spec: ChunkSpec) -> Any:
        return self.inner.submit_chunk(spec)

    def submit_chunks(self, specs: list[ChunkSpec]) -> Any:
        return self.inner.submit_chunks(specs)

    def submit_transform(self, request: TransformRequest) -> Any:
        if self.lost == 0:
            self.lost += 1
            future: Future[Any] = Future()
            future.set_exception(BrokenProcessPool("a worker died"))
            return future
        return self.inner.submit_transform(request)

    def lost_in_worker(self, key: str) -> bool:
        return True

    def close(self) -> None:
        self.inner.close()


def test_a_transform_whose_worker_died_is_retried_not_failed(make_settings) -> None:
    settings = make_settings(tables={"crm": ["companies"]})
    rt = Runtime(settings)
    dispatcher = LosesFirstTransform(open_dispatcher("inline://", settings))
    (job_id,) = JobRunner(settings, rt, dispatcher).run()
    report = job_report(rt.state, job_id)
    assert dispatcher.lost == 1
    assert (report["status"], report["outcome"]) == ("done", "completed")
    (transform,) = report["transforms"]
    assert transform["status"] == "done" and transform["records_written"] > 0


HOLD = """
import sys, time
from canonflow.config import Settings
from canonflow.runtime import Runtime
rt = Runtime(Settings.model_validate_json(sys.argv[1]))
what = sys.argv[2]
if what == "lock":
    with rt.table_lock("canonical/company/acme"):
        print("held", flush=True)
        time.sleep(600)
else:
    print(rt.state.claim_request(what, 600.0, holder=rt.holder), flush=True)
    time.sleep(600)
"""


def _hold_then_die(settings_json: str, what: str, script: str = HOLD) -> None:
    """A worker process takes a lock or a request, then is killed (SIGKILL)."""
    proc = subprocess.Popen([sys.executable, "-c", script, settings_json, what],
                            stdout=subprocess.PIPE, text=True)
    try:
        said = proc.stdout.readline().strip() if proc.stdout else ""
        assert said == "held" or said.isdigit(), said
    finally:
        proc.kill()
        proc.wait(10)


def test_a_dead_holders_table_lock_is_taken_over_at_once(make_settings) -> None:
    settings = make_settings(tables=TABLES)
    _hold_then_die(settings.to_worker_json(), "lock")
    rt = Runtime(settings)
    started = time.monotonic()
    with rt.table_lock("canonical/company/acme", wait=10.0):
        pass
    assert time.monotonic() - started < 5.0  # not the lock's expiry


def test_a_request_whose_worker_died_is_taken_over_at_once(make_settings) -> None:
    from canonflow.transform import run_transform

    settings = make_settings(tables={"crm": ["companies"]})
    rt = Runtime(settings)
    runner = JobRunner(settings, rt, open_dispatcher("inline://", settings))
    (plan,) = runner.plan()
    from canonflow.aggregate import complete_chunk
    from canonflow.chunk import process_chunk
    for spec in plan.chunks:
        complete_chunk(rt, process_chunk(spec, rt))
    (request,) = rt.state.claim_for_dispatch()
    _hold_then_die(settings.to_worker_json(), request.request_id)
    result = run_transform(request, rt)  # lease of 120 s not expired: its holder is dead
    assert not result.skipped and result.records_written > 0
    assert rt.state.request(request.request_id).attempts == 2  # type: ignore[union-attr]
    assert rt.state.job(plan.job_id).status == "done"  # type: ignore[union-attr]


def test_a_worker_killed_mid_chunk_costs_only_its_own_chunk_an_attempt(
        tmp_path, make_settings) -> None:
    """Killing one pool worker breaks the whole local pool: every queued task fails with
    it. Only the chunk that was running counts an attempt; the others just run again."""
    import os
    import signal

    from canonflow.connectors.demo_api import DemoApi, serve

    with serve(DemoApi(1200, page_delay=0.05)) as slow:
        settings = make_settings(
            tenants=("acme", "globex"), tables={"crm": ["companies", "deals"]},
            dispatcher="local://?workers=2", chunk_attempts=1)
        settings = settings.model_copy(update={"sources": [
            s.model_copy(update={"base_url": s.base_url.replace(
                s.base_url.split("/crm")[0], slow.base_url)}) for s in settings.sources]})
        rt = Runtime(settings)
        dispatcher = open_dispatcher(settings.dispatcher, settings)
        runner = JobRunner(settings, rt, dispatcher)
        job_ids: list[str] = []
        thread = threading.Thread(target=lambda: job_ids.extend(runner.run()))
        thread.start()
        killed = None
        deadline = time.monotonic() + 60
        while killed is None and time.monotonic() < deadline:
            for mark in dispatcher._marks.iterdir():  # type: ignore[attr-defined]
                key = mark.read_text() if mark.exists() else ""
                if key.startswith("chunk:"):
                    killed = key
                    os.kill(int(mark.name), signal.SIGKILL)
                    break
            time.sleep(0.01)
        thread.join(180)
        dispatcher.close()
    assert killed is not None and not thread.is_alive()
    failed = [(j, r.chunk_id) for j in job_ids for r in rt.state.chunk_results(j)
              if not r.completed]
    charged = [f"chunk:{j}:{c}" for j, c in failed]
    # the killed chunk, and at most the one other chunk running when the pool broke (the
    # pool stops its other workers too); none of the 20-odd chunks queued behind them
    assert killed in charged and len(charged) <= 2, charged
    total = sum(len(rt.state.chunk_specs(j)) for j in job_ids)
    assert total == 24 and sum(len(rt.state.chunk_results(j)) for j in job_ids) == total
    for job_id in job_ids:
        assert job_report(rt.state, job_id)["status"] in ("done", "failed")


HOLD_AGAIN = """
import sys, time
from canonflow.config import Settings
from canonflow.lease import holder_dead
from canonflow.runtime import Runtime
rt = Runtime(Settings.model_validate_json(sys.argv[1]))
print(rt.state.claim_request(sys.argv[2], 600.0, holder=rt.holder, holder_dead=holder_dead),
      flush=True)
time.sleep(600)
"""


def test_a_poison_request_that_kills_every_worker_fails_after_its_attempts(
        make_settings) -> None:
    """Redelivered again and again (Celery after each lost worker), a request whose worker
    dies each time fails at its attempt cap and its job settles."""
    from canonflow.lease import holder_dead

    settings = make_settings(tables={"crm": ["companies"]}, transform_max_attempts=3)
    rt = Runtime(settings)
    (plan,) = JobRunner(settings, rt, open_dispatcher("inline://", settings)).plan()
    from canonflow.aggregate import complete_chunk
    from canonflow.chunk import process_chunk
    for spec in plan.chunks:
        complete_chunk(rt, process_chunk(spec, rt))
    (request,) = rt.state.claim_for_dispatch()
    for _ in range(3):  # three workers take it and die
        _hold_then_die(settings.to_worker_json(), request.request_id, HOLD_AGAIN)
    claim = rt.state.claim_request(request.request_id, 600.0, holder=rt.holder,
                                   holder_dead=holder_dead, max_attempts=3)
    assert claim is None
    record = rt.state.request(request.request_id)
    assert record is not None and record.status == "failed" and record.attempts == 3
    assert rt.state.job(plan.job_id).status == "failed"  # type: ignore[union-attr]




def test_a_worker_whose_request_was_taken_over_cannot_finish_it(make_settings) -> None:
    settings = make_settings(tables={"crm": ["companies"]})
    rt = Runtime(settings)
    assert rt.state.enqueue_request(TransformRequest(
        tenant_id="acme", service_name="crm", table_name="companies", request_id="r",
        source_files=[]))
    assert rt.state.claim_request("r", 0.0, holder="old-worker") == 1
    assert rt.state.claim_request("r", 0.0, holder="new-worker") == 2  # lease lapsed
    assert not rt.state.finish_request("r", None, error="late", holder="old-worker")
    assert not rt.state.retry_later("r", "late", 3, holder="old-worker")
    record = rt.state.request("r")
    assert record is not None and (record.status, record.holder) == ("running", "new-worker")
    assert rt.state.finish_request("r", None, error="its own", holder="new-worker")


def test_a_job_cancelled_during_aggregation_gets_no_transform(make_settings) -> None:
    settings = make_settings(tables={"crm": ["companies"]})
    rt = Runtime(settings)
    (plan,) = JobRunner(settings, rt, open_dispatcher("inline://", settings)).plan()
    from canonflow.aggregate import table_outcomes, transform_requests
    from canonflow.chunk import process_chunk
    results = [process_chunk(spec, rt) for spec in plan.chunks]
    claims = [rt.state.complete_chunk(r).claimed for r in results]
    assert claims[-1]  # claimed: the aggregator is about to write its outbox rows...
    requests = transform_requests(rt, plan.job_id,
                                  table_outcomes(plan.chunks, results))
    assert rt.state.cancel_job(plan.job_id, "operator")  # ...when the job is cancelled
    assert not rt.state.finish_aggregation(plan.job_id, "completed", requests, {})
    assert rt.state.requests(plan.job_id) == []
    assert rt.state.claim_for_dispatch() == []


def test_a_lost_lease_is_never_renewed_and_the_holder_hears_of_it(make_settings) -> None:
    rt = Runtime(make_settings(tables=TABLES))
    assert rt.state.acquire_lock("t", "a", ttl=0.0)
    assert rt.state.acquire_lock("t", "b", ttl=60)  # a's lapsed: b takes it
    rt.state.release_lock("t", "b")
    assert not rt.state.renew_lock("t", "a", ttl=60)  # not re-created for a
    assert rt.state.lock_holder("t") is None
    with pytest.raises(CommitConflict, match="lost while held"), \
            rt.table_lock("canonical/company/acme", ttl=0.2):
        rt.state.release_lock("canonical/company/acme",
                              rt.state.lock_holder("canonical/company/acme")[0])  # type: ignore[index]
        rt.state.acquire_lock("canonical/company/acme", "intruder", ttl=60)
        time.sleep(0.4)


def test_holders_of_another_pid_space_are_never_judged_dead_by_pid() -> None:
    from canonflow.lease import holder_dead, holder_id

    mine = holder_id().split(":")
    gone = [mine[0], mine[1], "999999999", "1", "x"]
    assert holder_dead(":".join(gone))
    other_space = [mine[0], "0123456789ab-4026531999", "999999999", "1", "x"]
    assert not holder_dead(":".join(other_space))


class LosesFirstChunksTask:
    """The worker running the first task of several chunks dies (a broken pool)."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.url, self.lost, self.keys = inner, inner.url, 0, []

    def submit_chunk(self, spec: ChunkSpec) -> Any:
        return self.inner.submit_chunk(spec)

    def submit_chunks(self, specs: list[ChunkSpec]) -> Any:
        if self.lost == 0:
            self.lost += 1
            future: Future[Any] = Future()
            future.set_exception(BrokenProcessPool("a worker died"))
            return future
        return self.inner.submit_chunks(specs)

    def submit_transform(self, request: TransformRequest) -> Any:
        return self.inner.submit_transform(request)

    def lost_in_worker(self, key: str) -> bool:
        self.keys.append(key)
        return True

    def close(self) -> None:
        self.inner.close()


@pytest.mark.parametrize("attempts", [1, 2])
def test_a_task_of_several_chunks_whose_worker_died_runs_again_or_fails_each_chunk(
        make_settings, attempts: int) -> None:
    """A lost task of several chunks is run again while attempts remain; after the last,
    each of its chunks is recorded as failed, once, and the job ends."""
    settings = make_settings(tables={"crm": ["companies", "deals"]}, chunk_attempts=attempts)
    settings = settings.model_copy(update={"sources": [
        s.model_copy(update={"page_size": 2000}) for s in settings.sources]})
    rt = Runtime(settings)
    dispatcher = LosesFirstChunksTask(open_dispatcher("inline://", settings))
    (job_id,) = JobRunner(settings, rt, dispatcher).run()
    assert dispatcher.lost == 1
    (key,) = dispatcher.keys
    assert key == f"chunks:{job_id}:crm-companies-00000+{job_id}:crm-deals-00000"
    report = job_report(rt.state, job_id)
    results = rt.state.chunk_results(job_id)
    assert len(results) == 2
    if attempts == 1:
        assert report["status"] == "failed" and report["transforms"] == []
        assert [r.completed for r in results] == [False, False]
        assert all("a worker died" in (r.error.message if r.error else "") for r in results)
    else:
        assert (report["status"], report["outcome"]) == ("done", "completed")
        assert all(r.completed for r in results) and len(report["transforms"]) == 2


def test_a_local_task_that_raises_counts_as_run_not_as_never_run(make_settings) -> None:
    """A task that raised in a live worker ran (an attempt, bounded by the runner); only one
    that waited behind a task that killed the pool never ran. Told as never run, a chunk
    whose completion kept failing was submitted again at once, without end (until the run's
    wait limit)."""
    from canonflow.dispatch.local import LocalDispatcher

    settings = make_settings(tables={"crm": ["companies"]}, dispatcher="local://?workers=1")
    dispatcher = LocalDispatcher(settings.dispatcher, settings)
    try:
        raised = dispatcher._submit(eval, "chunk:j:c0", "1/0")
        assert isinstance(raised.exception(timeout=60), ZeroDivisionError)
        assert dispatcher.lost_in_worker("chunk:j:c0")
        assert not dispatcher.lost_in_worker("chunk:j:c0")  # told once, for that failure
        fine = dispatcher._submit(eval, "chunk:j:c1", "1 + 1")
        assert fine.result(timeout=60) == 2 and not dispatcher.lost_in_worker("chunk:j:c1")
    finally:
        dispatcher.close()


class TransformsNeverEnd:
    """A dispatcher whose transforms never finish (a stuck worker, a long transform)."""

    url = "never://"

    def submit_chunk(self, spec: ChunkSpec) -> Any:
        raise AssertionError("no chunk is missing")

    def submit_chunks(self, specs: list[ChunkSpec]) -> Any:
        raise AssertionError("no chunk is missing")

    def submit_transform(self, request: TransformRequest) -> Any:
        return Future()

    def lost_in_worker(self, key: str) -> bool:
        return True

    def close(self) -> None:
        pass


def test_a_run_resuming_a_job_keeps_its_wait_limit_while_it_sweeps(make_settings) -> None:
    """A run that resumes an orphaned job first sends what the dead runner left between
    aggregation and transforms, and waits for it: within the run's wait limit (and its
    lease), not for as long as those transforms take."""
    from canonflow.aggregate import complete_chunk
    from canonflow.chunk import process_chunk
    from canonflow.errors import RunTimeout
    from canonflow.plan import plan_job

    settings = make_settings(tables={"crm": ["companies"]})
    rt = Runtime(settings)
    plan = plan_job(settings, rt, "acme")
    rt.state.create_job(plan.job_id, "acme", settings.name, "aggregated", plan.chunks,
                        runner="gone-host:ns:1:1:tok", exclusive=True)
    for spec in plan.chunks:  # aggregated: its transform request waits in the outbox
        complete_chunk(rt, process_chunk(spec, rt))
    outcome: list[BaseException | None] = []

    def run() -> None:
        try:
            JobRunner(settings, rt, TransformsNeverEnd(), wait_limit=1.0).run()  # type: ignore[arg-type]
            outcome.append(None)
        except BaseException as exc:
            outcome.append(exc)

    started = time.monotonic()
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(30)
    assert not thread.is_alive(), "the run waited past its limit for the swept transform"
    assert isinstance(outcome[0], RunTimeout) and plan.job_id in str(outcome[0])
    assert time.monotonic() - started < 15
    rt.close()
