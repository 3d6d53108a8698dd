"""sqs:// and lambda:// dispatch (claim check for large requests), the transform handler on
the seed's events, Secrets Manager credentials, and dead letters made visible."""

from __future__ import annotations

import uuid
from typing import Any

import boto3
import pytest

from canonflow import jsonio
from canonflow.aws import handlers, secrets
from canonflow.aws.dispatch import MAX_EVENT_BYTES, LambdaDispatcher, SqsDispatcher
from canonflow.aws.events import parse_transform_event
from canonflow.connectors.demo_api import expected_bad, tenant_token
from canonflow.model import ChunkSpec, TransformRequest
from canonflow.query import run_query
from canonflow.redact import redact
from canonflow.report import job_report
from canonflow.runtime import Runtime
from canonflow.transform.discovery import resolve_files
from tests.lambda_pump import FakeContext, lambda_container

FILES = 5000


@pytest.fixture(autouse=True)
def _fresh_container() -> Any:
    with lambda_container():
        yield


@pytest.fixture
def sqs(s3_endpoint: str) -> Any:
    return boto3.client("sqs", endpoint_url=s3_endpoint, region_name="us-east-1")


def big_request() -> TransformRequest:
    keys = [f"raw/acme/crm/contacts/job-big/crm-contacts-{i:05d}/part-00000.jsonl.zst"
            for i in range(FILES)]
    return TransformRequest(tenant_id="acme", service_name="crm", table_name="contacts",
                            job_id="job-big", source_files=keys,
                            request_id="job-big:crm:contacts", trigger="aggregated")


class _Invokes:
    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []

    def invoke(self, **kwargs: Any) -> dict[str, Any]:
        self.calls.append(kwargs)
        return {"StatusCode": 202}


def test_5000_files_travel_as_a_manifest_through_sqs_and_lambda(
        make_settings: Any, s3_url: str, s3_endpoint: str, sqs: Any) -> None:
    request = big_request()
    assert len(jsonio.dumps(request.payload())) > MAX_EVENT_BYTES  # too big to send inline
    name = f"cf-{uuid.uuid4().hex[:8]}"
    url = sqs.create_queue(QueueName=name)["QueueUrl"]
    account = url.rstrip("/").split("/")[-2]
    settings = make_settings(object_store=s3_url)
    dispatcher = SqsDispatcher(f"sqs://sqs.us-east-1.amazonaws.com/{account}/{name}"
                               f"?endpoint={s3_endpoint}", settings)
    dispatcher.submit_transform(request)
    (message,) = sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10)["Messages"]
    assert len(message["Body"].encode()) < MAX_EVENT_BYTES
    parsed = parse_transform_event(message["Body"]).request
    assert parsed.source_files is None and parsed.source_files_manifest
    assert parsed.request_id == request.request_id
    assert resolve_files(parsed, dispatcher.objects) == request.source_files  # all 5,000

    invokes = _Invokes()
    lam = LambdaDispatcher("lambda://cf-chunk?transforms=cf-transform", settings,
                           client=invokes)
    lam.submit_transform(request)
    spec = ChunkSpec(job_id="job-big", chunk_id="c-1", table=request.table, start_page=1,
                     end_page=2, page_size=100, batch_records=100)
    lam.submit_chunk(spec)
    (transform_call, chunk_call) = invokes.calls
    assert transform_call["FunctionName"] == "cf-transform"
    assert transform_call["InvocationType"] == "Event"  # async: retried, then on-failure
    assert len(transform_call["Payload"]) < MAX_EVENT_BYTES
    parsed = parse_transform_event(transform_call["Payload"]).request
    assert resolve_files(parsed, lam.objects) == request.source_files
    assert chunk_call["FunctionName"] == "cf-chunk"
    assert ChunkSpec.model_validate_json(chunk_call["Payload"]) == spec

    small = TransformRequest(**{**request.model_dump(), "source_files": request.source_files[:3]})
    lam.submit_transform(small)  # a small list stays inline
    assert jsonio.loads(invokes.calls[-1]["Payload"])["source_files"] == small.source_files


def _logged(capfd: pytest.CaptureFixture[str]) -> list[dict[str, Any]]:
    return [jsonio.loads(line) for line in capfd.readouterr().err.splitlines()
            if line.startswith("{")]


def test_the_seed_events_through_the_transform_handler(
        make_settings: Any, capfd: pytest.CaptureFixture[str]) -> None:
    settings = make_settings(tables={"crm": ["companies"]}, dispatcher="inline://")
    c = handlers.configure(settings)
    plan = handlers.plan({"tenant_id": "acme"}, FakeContext())
    (job_id,) = plan["jobs"]
    for spec in c.rt.state.chunk_specs(job_id):  # the inline dispatcher ran them
        assert spec.chunk_id in {r.chunk_id for r in c.rt.state.chunk_results(job_id)}
    files = sorted(k for r in c.rt.state.chunk_results(job_id) for k in r.s3_files_written)
    assert len(files) >= 2
    capfd.readouterr()

    table = {"tenant_id": "acme", "service_name": "crm", "table_name": "companies"}
    out = handlers.transform({**table, "source_files": files[:1]}, FakeContext())
    assert out["result"]["processing_mode"] == "file_specific"
    assert out["result"]["files_read"] == 1
    lines = _logged(capfd)
    start = next(x for x in lines if x["event"].startswith("Canonical transform starting"))
    assert start["processing_mode"] == "file_specific" and start["source_files_count"] == 1

    legacy = handlers.transform({**table, "s3_key": files[0]}, FakeContext())
    assert legacy["result"]["processing_mode"] == "time_based"
    assert legacy["result"]["files_read"] == len(files)  # the whole window, as before
    lines = _logged(capfd)
    assert any(x["event"].startswith("legacy per-batch") and x["level"] == "warning"
               for x in lines)
    start = next(x for x in lines if x["event"].startswith("Canonical transform starting"))
    assert start["processing_mode"] == "time_based" and start["source_files_count"] == 0

    again = handlers.transform({**table, "s3_key": files[0]}, FakeContext())
    assert again["result"]["skipped"]  # a redelivered event is a replay

    foreign = handlers.transform({**table, "s3_key": "raw/other/crm/companies/x.jsonl.zst"},
                                 FakeContext())
    assert "outside" in foreign["rejected"]  # tenant isolation, not retried


def _sqs_event(*bodies: Any) -> dict[str, Any]:
    return {"Records": [{
        "messageId": f"m{i}", "receiptHandle": f"r{i}", "body": jsonio.dumps(body).decode(),
        "attributes": {"ApproximateReceiveCount": "1", "SentTimestamp": "0"},
        "messageAttributes": {}, "md5OfBody": "", "eventSource": "aws:sqs",
        "eventSourceARN": "arn:aws:sqs:us-east-1:123456789012:transforms",
        "awsRegion": "us-east-1"} for i, body in enumerate(bodies)]}


def test_a_request_running_elsewhere_is_reported_for_redelivery_never_as_an_error(
        make_settings: Any, capfd: pytest.CaptureFixture[str]) -> None:
    settings = make_settings(tables={"crm": ["companies"]}, dispatcher="inline://")
    c = handlers.configure(settings)
    held = TransformRequest(tenant_id="acme", service_name="crm", table_name="companies",
                            job_id="job-held", source_files=[],
                            request_id="job-held:crm:companies", trigger="aggregated")
    assert c.rt.state.claim_request(held.request_id, 60.0, holder="another-invocation",
                                    enqueue=held) == 1
    capfd.readouterr()

    # the whole batch must come again: reported message by message, not raised (a raise
    # is a Lambda error; it returns the same messages but counts and throttles as one)
    out = handlers.transform(_sqs_event(held.payload()), FakeContext())
    assert out == {"batchItemFailures": [{"itemIdentifier": "m0"}]}
    lines = _logged(capfd)
    assert any(x["event"] == "event delivered again later"
               and "running elsewhere" in x["detail"] for x in lines), lines

    foreign = {"tenant_id": "acme", "service_name": "crm", "table_name": "companies",
               "s3_key": "raw/other/crm/companies/x.jsonl.zst"}  # rejected: done with
    out = handlers.transform(_sqs_event(foreign, held.payload()), FakeContext())
    assert out == {"batchItemFailures": [{"itemIdentifier": "m1"}]}
    record = c.rt.state.request(held.request_id)
    assert record is not None and record.status == "running"  # still its holder's


def test_credentials_from_secrets_manager_cached_and_never_logged(
        make_settings: Any, s3_endpoint: str, monkeypatch: pytest.MonkeyPatch,
        capfd: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL_SECRETS_MANAGER", s3_endpoint)
    secrets.clear_cache()
    name = f"canonflow/tenants/acme-{uuid.uuid4().hex[:6]}"
    token = tenant_token("acme")
    boto3.client("secretsmanager", endpoint_url=s3_endpoint, region_name="us-east-1") \
        .create_secret(Name=name, SecretString=jsonio.dumps_str({"token": token}))
    settings = make_settings(tables={"crm": ["companies"]}, dispatcher="inline://")
    settings = settings.model_copy(update={"tenants": [settings.tenants[0].model_validate(
        {"tenant_id": "acme", "credentials": {"crm": {"token": f"secretsmanager://{name}#token"}}}
    )]})
    reads = 0
    real = secrets._secrets_client

    def counting() -> Any:
        client = real()

        class Counted:
            def get_secret_value(self, **kw: Any) -> Any:
                nonlocal reads
                reads += 1
                return client.get_secret_value(**kw)

        return Counted()

    monkeypatch.setattr(secrets, "_secrets_client", counting)
    c = handlers.configure(settings)
    out = handlers.plan({"tenant_id": "acme"}, FakeContext())
    assert out["jobs"], [c.rt.state.job(j) for j in out["failed_jobs"]]
    (job_id,) = out["jobs"]
    job = c.rt.state.job(job_id)
    assert job is not None and job.status == "done" and job.outcome == "completed"
    assert reads == 1  # once per container, however many chunks used it
    assert redact(f"token {token}") == "token ***"
    output = capfd.readouterr()
    assert token not in output.err and token not in output.out

    monkeypatch.setattr(secrets, "_secrets_client", real)
    with pytest.raises(Exception, match="could not be read") as info:
        secrets.resolve("secretsmanager://canonflow/none-such#token")
    assert token not in str(info.value)
    secrets.clear_cache()


def test_a_dead_lettered_chunk_shows_in_the_job_status(
        make_settings: Any, s3_endpoint: str, sqs: Any,
        monkeypatch: pytest.MonkeyPatch) -> None:
    prefix = f"cf-{uuid.uuid4().hex[:8]}"
    chunks = sqs.create_queue(QueueName=f"{prefix}-chunks")["QueueUrl"]
    dlq = sqs.create_queue(QueueName=f"{prefix}-chunks-dlq")["QueueUrl"]
    account = chunks.rstrip("/").split("/")[-2]
    settings = make_settings(
        tables={"crm": ["companies"]},
        dispatcher=f"sqs://sqs.us-east-1.amazonaws.com/{account}/{prefix}-chunks"
                   f"?endpoint={s3_endpoint}&region=us-east-1")
    monkeypatch.setenv("CANONFLOW_CHUNK_DLQ", dlq)
    c = handlers.configure(settings)
    (job_id,) = handlers.plan({}, FakeContext())["jobs"]
    got = sqs.receive_message(QueueUrl=chunks, MaxNumberOfMessages=10)["Messages"]
    poison, destined, rest = got[0], got[1], got[2:]
    sqs.send_message(QueueUrl=dlq, MessageBody=poison["Body"])  # every delivery failed
    # an async invoke that failed its retries, as Lambda's on-failure destination sends it
    sqs.send_message(QueueUrl=dlq, MessageBody=jsonio.dumps_str({
        "version": "1.0", "requestContext": {"condition": "RetriesExhausted",
                                             "approximateInvokeCount": 3},
        "requestPayload": jsonio.loads(destined["Body"]),
        "responseContext": {"statusCode": 200, "functionError": "Unhandled"}}))
    sqs.send_message(QueueUrl=dlq, MessageBody="not an event")  # unreadable: stays
    for m in rest:
        handlers.chunk(jsonio.loads(m["Body"]), FakeContext())
    out = handlers.sweeper({"older_than_seconds": 0}, FakeContext())
    assert out["dead_letters_recorded"] == 2
    report = job_report(c.rt.state, job_id)
    assert report["status"] in ("done", "failed") and report["outcome"] == "failed"
    (table,) = report["tables"].values()
    assert table["chunks_failed"] == 2 and any("dead-letter" in e for e in table["errors"])
    attrs = sqs.get_queue_attributes(QueueUrl=dlq, AttributeNames=[
        "ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"])["Attributes"]
    assert sum(int(v) for v in attrs.values()) == 1  # the unreadable one stays, for a person
    rt = Runtime(settings)
    assert rt.state.unfinished_jobs([job_id]) == []
    rt.close()


def test_a_transform_short_of_time_commits_its_groups_and_continues(
        make_settings: Any) -> None:
    from tests.integration.test_aws_lambda import _Recorder

    settings = make_settings(tables={"crm": ["companies"]}, dispatcher="inline://",
                             batch_records=200, transform_group_records=200,
                             transform_max_attempts=10)
    recorder = _Recorder()
    c = handlers.configure(settings, dispatcher=recorder, transform_margin_seconds=30)
    from canonflow.dispatch.tasks import run_chunk

    (job_id,) = handlers.plan({"tenant_id": "acme"}, FakeContext())["jobs"]
    for spec in recorder.chunks:  # the chunks, run here
        run_chunk(spec.model_dump_json(), c.rt)
    recorder.chunks.clear()
    c.relay(job_id)
    (request,) = recorder.transforms  # 6 files of 200 records: 6 groups
    recorder.transforms.clear()
    invocations = 0
    event: dict[str, Any] = request.payload()
    while True:
        invocations += 1
        calls = [0]

        def remaining(calls: list[int] = calls) -> int:
            calls[0] += 1  # two groups with time to spare, then 10 s left
            return 600_000 if calls[0] <= 2 else 10_000

        out = handlers.transform(event, FakeContext(remaining))
        if not out.get("continued"):
            break
        (again,) = recorder.transforms
        recorder.transforms.clear()
        assert again.request_id == request.request_id
        assert invocations < 10
    assert invocations == 3  # 6 groups, 2 per invocation
    record = c.rt.state.request(request.request_id)
    assert record is not None and record.status == "done" and record.result is not None
    expected = 1200 - expected_bad(("crm", "companies"), 1200)
    _, rows = run_query(c.rt.canonical._store,
                        "SELECT count(*), count(DISTINCT id) FROM company")
    assert rows[0] == (expected, expected)
    # each group committed once: no commit label of the request repeated in the Delta log
    labels = [label for _, label in c.rt.canonical._history(
        "canonical/company", request.request_id, 200)]
    assert len(labels) == len(set(labels))
    assert {label.split("/")[0] for label in labels} == {str(i) for i in range(6)}
    handlers.sweeper({"older_than_seconds": 0}, FakeContext())
    job = c.rt.state.job(job_id)
    assert job is not None and job.status == "done"


def test_the_container_reads_its_pipeline_and_the_stack_overrides_from_the_environment(
        tmp_path: Any, demo_server: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    pipeline = tmp_path / "pipeline.yaml"
    pipeline.write_text(
        "name: lam\nobject_store: file://./ignored\nsources:\n"
        f"  - service: crm\n    base_url: {demo_server.base_url}/crm/v1\n"
        "    tables: [companies]\ntenants:\n  - tenant_id: acme\n"
        "    credentials: {crm: {token: \"${CF_TEST_TOKEN}\"}}\n")
    monkeypatch.setenv("CF_TEST_TOKEN", tenant_token("acme"))
    monkeypatch.setenv("CANONFLOW_PIPELINE", str(pipeline))
    monkeypatch.setenv("CANONFLOW_OBJECT_STORE", f"file://{tmp_path / 'data'}")
    monkeypatch.setenv("CANONFLOW_STATE_STORE", f"sqlite:///{tmp_path / 'data' / 'state.db'}")
    monkeypatch.setenv("CANONFLOW_DISPATCHER", "inline://")
    handlers.reset()
    out = handlers.plan({}, FakeContext())  # the first event builds the container
    c = handlers.container()
    assert c.settings.name == "lam" and c.settings.object_store.endswith("/data")
    assert c.settings.credentials("acme", "crm") == {"token": tenant_token("acme")}
    (job_id,) = out["jobs"]
    job = c.rt.state.job(job_id)
    assert job is not None and job.status == "done"
    assert (tmp_path / "data" / "state.db").exists() and not (tmp_path / "ignored").exists()
