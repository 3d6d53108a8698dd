"""DynamoDB specifics: the URL, faults moto never produces (injected with botocore event
hooks), values larger than an item, and the idempotence of every retried write."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

import botocore.exceptions
import pytest

from canonflow.errors import ConfigError, StoreUnavailable
from canonflow.model import ChunkResult, ChunkSpec, TableRef, TransformRequest, TransformResult
from canonflow.stores import open_state_store
from canonflow.stores.dynamodb import DynamoStateStore, item_size, parse_url

T = TableRef(tenant_id="acme", service_name="crm", table_name="contacts")


@pytest.fixture
def store(dynamodb_url: str) -> Iterator[DynamoStateStore]:
    s = open_state_store(dynamodb_url)
    assert isinstance(s, DynamoStateStore)
    yield s
    s.close()


def specs(job: str, n: int, table: TableRef = T) -> list[ChunkSpec]:
    return [ChunkSpec(job_id=job, chunk_id=f"c{i}", table=table, start_page=1, end_page=1,
                      page_size=10, batch_records=10) for i in range(n)]


def result(job: str, i: int, files: int = 1, table: TableRef = T) -> ChunkResult:
    keys = [f"{table.raw_prefix}{job}/c{i}/part-{k:05d}.jsonl.zst" for k in range(files)]
    return ChunkResult(job_id=job, chunk_id=f"c{i}", completed=True, records_processed=files,
                       processing_time=0.0, s3_files_written=keys, s3_files_count=files,
                       table_metadata=table)


def request(job: str | None, rid: str) -> TransformRequest:
    return TransformRequest(tenant_id="acme", service_name="crm", table_name="contacts",
                            job_id=job, request_id=rid, source_files=[])


# -- faults, injected where botocore sends and receives --------------------------------------
class Faults:
    """Counts requests per operation and makes chosen ones fail: ``before`` raises before
    the request leaves (throttling, a transaction conflict), ``after`` raises a read
    timeout after the server has applied it (the write committed, the response was lost)."""

    def __init__(self, store: DynamoStateStore) -> None:
        self.sent: dict[str, int] = {}
        self.before: dict[str, list[Callable[[], BaseException]]] = {}
        self.after: dict[str, int] = {}
        events = store.client.meta.events
        events.register("before-call.dynamodb", self._before)
        events.register("after-call.dynamodb", self._after)

    def _before(self, model: Any, **_: Any) -> None:
        name = model.name
        self.sent[name] = self.sent.get(name, 0) + 1
        queue = self.before.get(name)
        if queue:
            raise queue.pop(0)()

    def _after(self, model: Any, http_response: Any, **_: Any) -> None:
        if self.after.get(model.name, 0) > 0 and http_response.status_code == 200:
            self.after[model.name] -= 1
            raise botocore.exceptions.ReadTimeoutError(endpoint_url="http://dynamodb")


class Crash(BaseException):
    """The process dies here (nothing catches it)."""


def crash() -> BaseException:
    return Crash()


def throttled(operation: str) -> Callable[[], BaseException]:
    return lambda: botocore.exceptions.ClientError(
        {"Error": {"Code": "ThrottlingException", "Message": "Rate of requests exceeds"}},
        operation)


def conflict(actions: int) -> Callable[[], BaseException]:
    reasons = [{"Code": "None"}] * (actions - 1) + [{"Code": "TransactionConflict"}]
    return lambda: botocore.exceptions.ClientError(
        {"Error": {"Code": "TransactionCanceledException",
                   "Message": "Transaction cancelled [None, TransactionConflict]"},
         "CancellationReasons": reasons}, "TransactWriteItems")


def test_throttling_and_transaction_conflicts_are_retried_and_counted_once(
        store: DynamoStateStore, caplog: pytest.LogCaptureFixture) -> None:
    store.create_job("j", "acme", "p", "aggregated", specs("j", 2))
    faults = Faults(store)
    faults.before["TransactWriteItems"] = [throttled("TransactWriteItems"), conflict(3),
                                           throttled("TransactWriteItems")]
    with caplog.at_level(logging.WARNING, logger="canonflow.retry"):
        first = store.complete_chunk(result("j", 0))
    assert (first.new, first.completed, first.claimed) == (True, 1, False)
    assert faults.sent["TransactWriteItems"] == 4  # three refused, the fourth applied
    retries = [r for r in caplog.records if r.getMessage() == "retrying"]
    assert [getattr(r, "retry_kind", None) for r in retries] == ["state"] * 3
    faults.before["UpdateItem"] = [throttled("UpdateItem")]  # on the claim
    last = store.complete_chunk(result("j", 1))
    assert (last.new, last.completed, last.claimed) == (True, 2, True)
    job = store.job("j")
    assert job is not None and (job.completed_chunks, job.status) == (2, "aggregating")


def test_a_completion_whose_response_was_lost_counts_once_and_claims_once(
        store: DynamoStateStore) -> None:
    store.create_job("j", "acme", "p", "aggregated", specs("j", 2))
    faults = Faults(store)
    faults.after["TransactWriteItems"] = 1  # committed, then the client saw a timeout
    first = store.complete_chunk(result("j", 0))
    assert (first.new, first.completed) == (True, 1)
    faults.after["TransactWriteItems"] = 1
    faults.after["UpdateItem"] = 1  # the claim committed too, and its response was lost
    last = store.complete_chunk(result("j", 1))
    assert (last.new, last.completed, last.claimed) == (True, 2, True)
    assert faults.after == {"TransactWriteItems": 0, "UpdateItem": 0}  # both faults fired
    again = store.complete_chunk(result("j", 1))  # a real duplicate: no second claim
    assert (again.new, again.claimed) == (False, False)
    job = store.job("j")
    assert job is not None and (job.completed_chunks, job.failed_chunks) == (2, 0)


def test_a_duplicate_claims_a_job_whose_last_completer_died_before_claiming(
        store: DynamoStateStore) -> None:
    store.create_job("j", "acme", "p", "aggregated", specs("j", 1))
    faults = Faults(store)
    faults.before["UpdateItem"] = [crash]  # the completer dies before its claim
    with pytest.raises(Crash):
        store.complete_chunk(result("j", 0))
    assert store.job("j").status == "running"  # type: ignore[union-attr]
    redelivered = store.complete_chunk(result("j", 0))
    assert not redelivered.new and redelivered.claimed
    assert not store.complete_chunk(result("j", 0)).claimed


def test_an_aggregation_whose_responses_were_lost_writes_each_row_once(
        store: DynamoStateStore) -> None:
    store.create_job("j", "acme", "p", "aggregated", specs("j", 1))
    assert store.complete_chunk(result("j", 0)).claimed
    store.transaction_actions = 4  # three rows per transaction: several transactions
    reqs = [request("j", f"r{i}") for i in range(7)]
    faults = Faults(store)
    faults.after["TransactWriteItems"] = 2
    faults.after["UpdateItem"] = 1  # the commit point too
    assert store.finish_aggregation("j", "completed", reqs, {"tables": {}})
    assert faults.after == {"TransactWriteItems": 0, "UpdateItem": 0}
    assert sorted(r.request.request_id for r in store.requests("j")) == [
        f"r{i}" for i in range(7)]
    # the open-row count is exact: finishing all seven rows (and only that) settles the job
    for i in range(7):
        assert store.job("j").status == "transforms_enqueued"  # type: ignore[union-attr]
        assert store.claim_request(f"r{i}", 60, holder="h") == 1
        assert store.finish_request(f"r{i}", None, holder="h")
    assert store.job("j").status == "done"  # type: ignore[union-attr]


def test_a_crashed_aggregation_redone_creates_no_second_row(store: DynamoStateStore) -> None:
    store.create_job("j", "acme", "p", "aggregated", specs("j", 1))
    store.complete_chunk(result("j", 0))
    store.transaction_actions = 3
    reqs = [request("j", f"r{i}") for i in range(5)]
    faults = Faults(store)
    faults.before["UpdateItem"] = [crash]  # dies before the commit
    with pytest.raises(Crash):
        store.finish_aggregation("j", "completed", reqs, {})
    assert store.claim_for_dispatch() == []  # rows of an uncommitted job are never sent
    assert store.claim_request("r0", 60) is None  # nor run
    assert store.reclaim_aggregation("j", older_than=0)
    assert store.finish_aggregation("j", "completed", reqs, {})
    assert len(store.requests("j")) == 5
    assert len(store.claim_for_dispatch()) == 5
    for i in range(5):
        assert store.claim_request(f"r{i}", 60) == 1
        store.finish_request(f"r{i}", None)
    assert store.job("j").status == "done"  # type: ignore[union-attr]


def test_request_claims_and_enqueues_whose_responses_were_lost_are_not_repeated(
        store: DynamoStateStore) -> None:
    faults = Faults(store)
    faults.after["PutItem"] = 1
    assert store.enqueue_request(request(None, "r"))
    assert not store.enqueue_request(request(None, "r"))  # a real second enqueue
    faults.after["TransactWriteItems"] = 1
    assert store.claim_request("r", 60, holder="h1") == 1
    assert store.claim_request("r", 60, holder="h2") is None
    assert store.request("r").attempts == 1  # type: ignore[union-attr]
    faults.after["TransactWriteItems"] = 1
    res = TransformResult(request_id="r", tenant_id="acme", service_name="crm",
                          table_name="contacts", entity="contact",
                          processing_mode="file_specific")
    assert store.finish_request("r", res, holder="h1")
    assert store.request("r").status == "done"  # type: ignore[union-attr]
    assert not store.finish_request("r", res, holder="h1")  # not running any more


def test_persistent_throttling_gives_up_with_a_retryable_error(store: DynamoStateStore) -> None:
    faults = Faults(store)
    faults.before["GetItem"] = [throttled("GetItem")] * 8
    with pytest.raises(StoreUnavailable, match="ThrottlingException in get_item") as info:
        store.job("j")
    assert info.value.retryable and faults.sent["GetItem"] == 8


def test_reads_handed_back_unprocessed_are_asked_again_then_given_up(
        store: DynamoStateStore) -> None:
    """Throttled, BatchGetItem hands keys back (UnprocessedKeys) instead of failing: they are
    asked again after growing pauses, a bounded number of times, then a retryable error."""
    req = request("j", "r")
    keys = ["raw/a.jsonl.zst", "raw/b.jsonl.zst"]
    store.record_files(req, keys)
    calls = [0]
    handed_back = [2]  # the first two answers hand every key back

    def throttle(parsed: dict[str, Any], **_: Any) -> None:
        calls[0] += 1
        if handed_back[0] > 0 and calls[0] <= 40:  # (a loop that never gives up ends)
            handed_back[0] -= 1
            parsed["UnprocessedKeys"] = {store.table: {"Keys": [
                {"pk": {"S": store._ledger_pk(req)}, "sk": {"S": store._ledger_sk(k)}}
                for k in keys]}}
            parsed["Responses"] = {store.table: []}

    store.client.meta.events.register("after-call.dynamodb.BatchGetItem", throttle)
    try:
        assert store.processed_files(req, keys) == set(keys)  # after two hand-backs
        assert calls[0] == 3
        calls[0], handed_back[0] = 0, 10_000  # handed back for good
        with pytest.raises(StoreUnavailable, match="unprocessed") as info:
            store.processed_files(req, keys)
        assert info.value.retryable and calls[0] == 10
    finally:
        store.client.meta.events.unregister("after-call.dynamodb.BatchGetItem", throttle)


def test_a_stale_holder_cannot_touch_release_or_finish_its_successors_work(
        store: DynamoStateStore) -> None:
    assert store.acquire_lock("t", "old", ttl=0.0)
    assert store.acquire_lock("t", "new", ttl=60)  # the old lease expired: taken over
    assert not store.renew_lock("t", "old", 60)
    store.release_lock("t", "old")
    assert store.lock_holder("t")[0] == "new"  # type: ignore[index]
    assert store.enqueue_request(request(None, "r"))
    assert store.claim_request("r", 0, holder="old") == 1
    assert store.claim_request("r", 0, holder="new") == 2  # lease 0: expired at once
    assert not store.finish_request("r", None, error="late", holder="old")
    assert not store.retry_later("r", "late", 3, holder="old")
    record = store.request("r")
    assert record is not None and (record.status, record.holder) == ("running", "new")


# -- values larger than an item holds ----------------------------------------------------------
def largest_item(store: DynamoStateStore) -> int:
    sizes = []
    kwargs: dict[str, Any] = {"TableName": store.table}
    while True:
        page = store.client.scan(**kwargs)
        sizes += [item_size(i) for i in page["Items"]]
        if "LastEvaluatedKey" not in page:
            return max(sizes)
        kwargs["ExclusiveStartKey"] = page["LastEvaluatedKey"]


def test_large_values_are_stored_in_parts_and_read_back_whole(store: DynamoStateStore) -> None:
    store.inline_limit, store.part_size = 4_000, 3_000
    store.create_job("j", "acme", "p", "aggregated", specs("j", 2))
    big = result("j", 0, files=2_000)
    assert store.complete_chunk(big).new
    assert store.complete_chunk(big).new is False  # the same parts: a duplicate
    bigger = result("j", 0, files=2_500)
    assert store.complete_chunk(bigger).superseded
    (recorded,) = store.chunk_results("j")
    assert recorded.s3_files_written == bigger.s3_files_written
    store.save_checkpoint("j", "c1", {"files": bigger.s3_files_written})
    assert store.load_checkpoint("j", "c1") == {"files": bigger.s3_files_written}
    assert largest_item(store) <= 4_000 + 1_000


# -- the URL ----------------------------------------------------------------------------------
@pytest.mark.parametrize("url", [
    "dynamodb://AKIAXXXX:s3cretKey@canonflow?region=us-east-1",
    "dynamodb://canonflow?region=us-east-1&aws_secret_access_key=s3cretKey",
    "dynamodb://canonflow?aws_session_token=s3cretKey",
])
def test_credentials_in_the_url_are_refused_without_repeating_them(url: str) -> None:
    with pytest.raises(ConfigError, match="standard AWS chain") as info:
        open_state_store(url)
    assert "s3cretKey" not in str(info.value)


def test_the_url_names_a_table_a_region_and_an_endpoint() -> None:
    loc = parse_url("dynamodb://canonflow-state?region=eu-west-1&endpoint=http://127.0.0.1:8000")
    assert (loc.table, loc.region, loc.endpoint) == (
        "canonflow-state", "eu-west-1", "http://127.0.0.1:8000")
    with pytest.raises(ConfigError, match="unknown option"):
        parse_url("dynamodb://canonflow?consistent=yes")
    with pytest.raises(ConfigError, match="invalid table name"):
        parse_url("dynamodb://a?region=x")
    with pytest.raises(ConfigError, match="endpoint="):
        parse_url("dynamodb://canonflow?endpoint=ftp://x")


def test_an_unreachable_endpoint_is_one_retryable_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    with pytest.raises(StoreUnavailable, match=r"dynamodb://canonflow unavailable") as info:
        open_state_store("dynamodb://canonflow?region=us-east-1&endpoint=http://127.0.0.1:1")
    assert info.value.retryable


def test_upgrade_creates_the_table_with_ttl_and_is_safe_to_repeat(
        store: DynamoStateStore) -> None:
    store.upgrade()
    described = store.client.describe_table(TableName=store.table)["Table"]
    assert described["BillingModeSummary"]["BillingMode"] == "PAY_PER_REQUEST"
    assert sorted(g["IndexName"] for g in described["GlobalSecondaryIndexes"]) == [
        "gsi1", "gsi2"]
    ttl = store.client.describe_time_to_live(TableName=store.table)["TimeToLiveDescription"]
    assert (ttl["TimeToLiveStatus"], ttl["AttributeName"]) == ("ENABLED", "expires")


def test_conditional_updates_whose_responses_were_lost_report_what_they_did(
        store: DynamoStateStore) -> None:
    assert store.enqueue_request(request(None, "r"))
    faults = Faults(store)
    faults.after["UpdateItem"] = 1
    assert [r.request_id for r in store.claim_for_dispatch()] == ["r"]  # sent by this relay
    assert store.claim_for_dispatch() == []  # and by no other
    assert store.claim_request("r", 60, holder="h") == 1
    faults.after["UpdateItem"] = 1
    assert store.retry_later("r", "busy", max_attempts=3, holder="h")
    record = store.request("r")
    assert record is not None and (record.status, record.attempts) == ("pending", 1)
    faults.after["UpdateItem"] = 1
    assert store.advance_cursor(T, "2026-01-01T00:00:00Z", "j")
    assert not store.advance_cursor(T, "2026-01-01T00:00:00Z", "j")
    assert store.sync_cursors([T]).get(T) == "2026-01-01T00:00:00Z"
    assert faults.after["UpdateItem"] == 0


def test_canonflow_db_upgrade_creates_the_table(tmp_path: Any, dynamodb_endpoint: str) -> None:
    import subprocess
    import sys

    import boto3

    table = "cli-upgrade-test"
    pipeline = tmp_path / "pipeline.yaml"
    pipeline.write_text(
        f"name: p\nobject_store: file://{tmp_path}/data\n"
        f"state_store: dynamodb://{table}?region=us-east-1&endpoint={dynamodb_endpoint}\n"
        "sources:\n  - service: crm\n    base_url: http://127.0.0.1:1/crm/v1\n"
        "tenants:\n  - tenant_id: acme\n")
    done = subprocess.run([sys.executable, "-c", "from canonflow.cli import main; main()",
                           "db", "upgrade", "--pipeline", str(pipeline)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert f"dynamodb://{table}" in done.stdout
    client = boto3.client("dynamodb", endpoint_url=dynamodb_endpoint, region_name="us-east-1")
    assert client.describe_table(TableName=table)["Table"]["TableStatus"] == "ACTIVE"
    client.delete_table(TableName=table)


def test_a_job_beside_a_tenants_exclusive_job_can_be_cancelled(store: DynamoStateStore) -> None:
    store.create_job("j1", "acme", "p", "aggregated", specs("j1", 1), exclusive=True)
    store.create_job("j2", "acme", "p", "aggregated", specs("j2", 1))  # not exclusive
    assert store.cancel_job("j2", "not needed")
    assert store.active_job("p", "acme") == "j1"  # the exclusive job keeps the tenant
    assert store.cancel_job("j1", "stop")
    assert store.active_job("p", "acme") is None


def test_rows_enqueued_for_a_running_job_run_at_once_and_hold_the_job_open(
        store: DynamoStateStore) -> None:
    store.create_job("j", "acme", "p", "per_batch", specs("j", 1))
    batch = request("j", "j:batch-1").model_copy(update={"trigger": "per_batch"})
    assert store.enqueue_request(batch)  # a per-batch transform while chunks still run
    assert [r.request_id for r in store.claim_for_dispatch()] == ["j:batch-1"]
    assert store.claim_request("j:batch-1", 60, holder="h") == 1
    store.complete_chunk(result("j", 0))
    assert store.finish_aggregation("j", "completed", [], {})
    assert store.job("j").status == "transforms_enqueued"  # type: ignore[union-attr]
    assert store.finish_request("j:batch-1", None, holder="h")
    assert store.job("j").status == "done"  # type: ignore[union-attr]
