"""The whole pipeline through the Lambda handlers, with a pump playing Lambda and SQS (moto
S3 and SQS, the locked moto DynamoDB): every event delivered once or twice, out of order,
redelivered after a visibility timeout, invocations killed at random points."""

from __future__ import annotations

import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import boto3
import pytest

from canonflow import jsonio
from canonflow.aws import handlers
from canonflow.config import Settings, SourceConfig, TenantConfig
from canonflow.connectors.demo_api import DemoApi, expected_bad, serve, tenant_token
from canonflow.dispatch import open_dispatcher
from canonflow.model import TERMINAL, ChunkSpec, TableRef
from canonflow.query import run_query
from canonflow.report import job_report
from canonflow.runner import JobRunner
from canonflow.runtime import Runtime
from canonflow.transform.reader import decompress
from tests.lambda_pump import FakeContext, Pump, Queue, lambda_container, make_queues

TABLES = {"crm": ["contacts", "companies"], "helpdesk": ["tickets"]}
SIZES = {"contacts": 5000, "companies": 1200, "tickets": 1200}
ENTITY = {"contacts": "contact", "companies": "company", "tickets": "ticket"}


@pytest.fixture
def sqs(s3_endpoint: str) -> Any:
    return boto3.client("sqs", endpoint_url=s3_endpoint, region_name="us-east-1")


@pytest.fixture(autouse=True)
def _fresh_container() -> Any:
    with lambda_container():
        yield


def sqs_url(queues: dict[str, tuple[str, str, str]], endpoint: str) -> str:
    chunk_url, transform_url = queues["chunks"][0], queues["transforms"][0]
    account, name = chunk_url.rstrip("/").split("/")[-2:]
    url = (f"sqs://sqs.us-east-1.amazonaws.com/{account}/{name}?transforms="
           f"{transform_url.rsplit('/', 1)[1]}&endpoint={endpoint}&region=us-east-1")
    return url


def canonical_rows(rt: Runtime, entity: str) -> list[tuple[Any, ...]]:
    """The rows of a canonical table without the columns that name the run that wrote them."""
    columns, _ = run_query(rt.canonical._store, f"SELECT * FROM {entity} LIMIT 0")
    keep = [c for c in columns if not c.startswith("_") or c in ("_tenant_id",
                                                                 "_service_name")]
    _, rows = run_query(rt.canonical._store,
                        f"SELECT {', '.join(keep)} FROM {entity} ORDER BY ALL")
    return rows


@pytest.mark.parametrize("seed", [1, 2])
def test_the_pipeline_through_the_handlers_under_duplicates_reordering_and_kills(
        seed: int, make_settings: Any, s3_url: str, s3_endpoint: str, dynamodb_url: str, sqs: Any,
        monkeypatch: pytest.MonkeyPatch) -> None:
    queues = make_queues(sqs, f"cf-{uuid.uuid4().hex[:8]}")
    monkeypatch.setenv("CANONFLOW_CHUNK_DLQ", "")  # the pump counts dead letters itself
    settings = make_settings(tables=TABLES, object_store=s3_url, state_store=dynamodb_url,
                             dispatcher=sqs_url(queues, s3_endpoint),
                             transform_lease_seconds=1.0, max_inline_files=4)
    c = handlers.configure(settings)
    assert c.dispatcher.chunk_queue_url == queues["chunks"][0]  # type: ignore[attr-defined]
    pump = Pump(sqs, [Queue(queues["chunks"][0], queues["chunks"][1], handlers.chunk,
                            queues["chunks"][2]),
                      Queue(queues["transforms"][0], queues["transforms"][1],
                            handlers.transform, queues["transforms"][2])],
                seed=seed, kill=0.35, min_kills=3)
    ctx = FakeContext()
    started = time.monotonic()
    planned = handlers.plan({"source": "aws.events", "detail-type": "Scheduled Event"}, ctx)
    (job_id,) = planned["jobs"]
    assert planned["chunks_sent"] == len(c.rt.state.chunk_specs(job_id))
    deadline = time.monotonic() + 240
    sweeps = 0
    while True:
        pump.drain(deadline)
        job = c.rt.state.job(job_id)
        assert job is not None
        if job.status == "done":
            break
        assert time.monotonic() < deadline, f"job stuck: {job.status}"
        time.sleep(1.1)  # past the sweeper's age limit and the transforms' lease
        handlers.sweeper({"older_than_seconds": 1, "stale_seconds": 30}, ctx)
        sweeps += 1
    elapsed = time.monotonic() - started
    print(f"\npump: {pump.stats}, sweeps {sweeps}, {elapsed:.1f} s")
    assert pump.stats.kills >= 3 and pump.stats.duplicates > 0  # the test did what it says
    assert job.outcome == "completed"
    assert pump.dead_letters() == 0

    state = c.rt.state
    results = state.chunk_results(job_id)
    requests = state.requests(job_id)
    assert len(requests) == len(SIZES)  # exactly one transform per table
    for rec in requests:
        req = rec.request
        assert rec.status == "done" and req.trigger == "aggregated"
        written = sorted(k for r in results if r.table_metadata == req.table
                         for k in r.s3_files_written)
        listed = req.source_files if req.source_files is not None else jsonio.loads(
            c.rt.objects.get(req.source_files_manifest or ""))
        assert listed == written  # exactly its table's files
    for service, tables in TABLES.items():
        for table in tables:
            _, rows = run_query(c.rt.canonical._store,
                                f"SELECT count(*), count(DISTINCT id) FROM {ENTITY[table]}")
            expected = SIZES[table] - expected_bad((service, table), SIZES[table])
            assert rows[0] == (expected, expected)  # rows == distinct source records

    # the embedded default, same demo data: the same canonical tables
    local = make_settings(tables=TABLES)
    rt = Runtime(local)
    dispatcher = open_dispatcher(local.dispatcher, local)
    try:
        JobRunner(local, rt, dispatcher).run()
    finally:
        dispatcher.close()
    for entity in ENTITY.values():
        assert canonical_rows(c.rt, entity) == canonical_rows(rt, entity)
    rt.close()


class _Recorder:
    """A dispatcher that keeps what it is given (the test delivers it)."""

    url = "recorder://"

    def __init__(self) -> None:
        self.chunks: list[ChunkSpec] = []
        self.transforms: list[Any] = []

    def submit_chunk(self, spec: ChunkSpec) -> None:
        self.chunks.append(spec)

    def submit_chunks(self, specs: list[ChunkSpec]) -> None:
        self.chunks.extend(specs)

    def submit_transform(self, request: Any) -> None:
        self.transforms.append(request)

    def lost_in_worker(self, key: str) -> bool:
        return True

    def close(self) -> None:
        pass


def test_a_second_plan_refuses_a_tenant_whose_job_its_events_still_carry(
        make_settings: Any) -> None:
    """The plan function starts a job and returns: no process drives it, its events do. The
    next plan (the schedule's next tick, an async retry) must not take it for orphaned and
    send its chunks again; a job left idle is the sweeper's."""
    settings = make_settings(tables={"crm": ["companies"]}, dispatcher="inline://")
    recorder = _Recorder()
    c = handlers.configure(settings, dispatcher=recorder)
    first = handlers.plan({"tenant_id": "acme"}, FakeContext())
    (job_id,) = first["jobs"]
    sent = len(recorder.chunks)
    assert sent == first["chunks_sent"] > 0
    again = handlers.plan({"tenant_id": "acme"}, FakeContext())
    assert again["jobs"] == [] and again["chunks_sent"] == 0 and again["resumed"] == []
    assert job_id in again["refused"]["acme"]
    assert len(recorder.chunks) == sent  # nothing sent twice
    job = c.rt.state.job(job_id)
    assert job is not None
    assert job_report(c.rt.state, job_id)["runner"] == "events"  # not "lost"


def test_a_chunk_running_out_of_time_continues_from_its_checkpoint_every_record_once(
        tmp_path: Path) -> None:
    api = DemoApi(2000)
    with serve(api) as server:
        settings = Settings(
            object_store=f"file://{tmp_path}/data", dispatcher="inline://",
            state_store=f"sqlite:///{tmp_path}/data/state.db", batch_records=200,
            sources=[SourceConfig(service="billing", base_url=f"{server.base_url}/billing/v1",
                                  tables=["invoices"], page_size=100)],
            tenants=[TenantConfig.model_validate(
                {"tenant_id": "acme",
                 "credentials": {"billing": {"token": tenant_token("acme")}}})])
        spec = ChunkSpec(job_id="job-t", chunk_id="billing-invoices-00000",
                         table=TableRef(tenant_id="acme", service_name="billing",
                                        table_name="invoices"),
                         start_page=1, end_page=None, page_size=100, batch_records=200)
        recorder = _Recorder()
        c = handlers.configure(settings, dispatcher=recorder, margin_seconds=30)
        c.rt.state.create_job("job-t", "acme", settings.name, "aggregated", [spec])
        invocations = 0
        event: dict[str, Any] = spec.model_dump(mode="json")
        outcome: dict[str, Any] = {}
        while True:
            invocations += 1
            calls = [0]

            def remaining(calls: list[int] = calls) -> int:
                calls[0] += 1  # three checkpoints with time to spare, then 10 s left
                return 600_000 if calls[0] <= 3 else 10_000

            outcome = handlers.chunk(event, FakeContext(remaining))
            if not outcome.get("continued"):
                break
            assert recorder.chunks.pop() == spec  # the same spec, re-enqueued
            assert invocations < 50
        assert invocations >= 3  # 2,000 records, 800 per invocation
        assert outcome["new"] and outcome["aggregated"]
        (result,) = c.rt.state.chunk_results("job-t")
        assert result.completed and result.records_processed == 2000
        ids: Counter[str] = Counter()
        for key in result.s3_files_written:
            for line in decompress(c.rt.objects.get(key), key).splitlines():
                ids[jsonio.loads(line)["id"]] += 1
        assert len(ids) == 2000 and set(ids.values()) == {1}  # every record exactly once
        assert len(recorder.transforms) == 1  # relayed by the aggregating invocation


def test_rollback_per_batch_on_lambda_a_time_based_transform_per_batch_file(
        make_settings: Any, s3_endpoint: str, sqs: Any) -> None:
    queues = make_queues(sqs, f"cf-{uuid.uuid4().hex[:8]}")
    settings = make_settings(tables={"crm": ["companies"]}, trigger_mode="per_batch",
                             batch_records=200, dispatcher=sqs_url(queues, s3_endpoint))
    c = handlers.configure(settings)
    pump = Pump(sqs, [Queue(queues["chunks"][0], queues["chunks"][1], handlers.chunk,
                            queues["chunks"][2]),
                      Queue(queues["transforms"][0], queues["transforms"][1],
                            handlers.transform, queues["transforms"][2])],
                duplicate=0.3, kill=0.0)
    (job_id,) = handlers.plan({"tenant_id": "acme"}, FakeContext())["jobs"]
    pump.drain(time.monotonic() + 120)
    job = c.rt.state.job(job_id)
    assert job is not None and job.status == "done", job
    files = [k for r in c.rt.state.chunk_results(job_id) for k in r.s3_files_written]
    requests = c.rt.state.requests(job_id)
    assert len(requests) == len(files) == 6  # 1,200 records in files of 200: one each
    for rec in requests:
        assert rec.request.trigger == "per_batch" and rec.status == "done"
        assert rec.request.processing_mode.value == "time_based"
    # the legacy cost: the batches re-read the window, far more files than were written
    assert sum(rec.result.files_read for rec in requests if rec.result) > len(files)
    expected = 1200 - expected_bad(("crm", "companies"), 1200)
    _, rows = run_query(c.rt.canonical._store,
                        "SELECT count(*), count(DISTINCT id) FROM company")
    assert rows[0] == (expected, expected)
    assert pump.dead_letters() == 0


def test_the_pipeline_through_async_invokes_under_duplicates_and_kills(
        make_settings: Any) -> None:
    from canonflow.aws.dispatch import LambdaDispatcher
    from tests.lambda_pump import AsyncLambda

    lam = AsyncLambda({"cf-chunk": handlers.chunk, "cf-transform": handlers.transform},
                      seed=3, kill=0.3, min_kills=3)
    settings = make_settings(tables=TABLES, dispatcher="lambda://cf-chunk?transforms="
                             "cf-transform", transform_lease_seconds=1.0, max_inline_files=4,
                             transform_max_attempts=10)  # kills are frequent here
    c = handlers.configure(settings, dispatcher=LambdaDispatcher(
        settings.dispatcher, settings, client=lam))
    (job_id,) = handlers.plan({}, FakeContext())["jobs"]
    deadline = time.monotonic() + 240
    while True:
        lam.drain()
        job = c.rt.state.job(job_id)
        assert job is not None
        if job.status in TERMINAL:
            break
        assert time.monotonic() < deadline, f"job stuck: {job.status}"
        time.sleep(1.1)
        handlers.sweeper({"older_than_seconds": 1, "stale_seconds": 2}, FakeContext())
    print(f"\nasync invokes: {lam.stats}")
    assert lam.stats.kills >= 3 and lam.stats.duplicates > 0
    assert job.status == "done", job_report(c.rt.state, job_id)
    assert job.outcome == "completed"
    # an event that failed its three tries went to the on-failure destination; the sweeper
    # sent its chunk again and it completed: every chunk has its one successful result
    results = {r.chunk_id: r for r in c.rt.state.chunk_results(job_id)}
    assert all(r.completed for r in results.values())
    assert {s.chunk_id for s in c.rt.state.chunk_specs(job_id)} == set(results)
    requests = c.rt.state.requests(job_id)
    assert len(requests) == len(SIZES) and all(r.status == "done" for r in requests)
    for service, tables in TABLES.items():
        for table in tables:
            _, rows = run_query(c.rt.canonical._store,
                                f"SELECT count(*), count(DISTINCT id) FROM {ENTITY[table]}")
            expected = SIZES[table] - expected_bad((service, table), SIZES[table])
            assert rows[0] == (expected, expected)
