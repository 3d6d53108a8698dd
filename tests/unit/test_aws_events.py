"""The events the Lambda functions accept: canonflow's contracts and the seed's shapes."""

from __future__ import annotations

import pytest

from canonflow.aws.events import is_sqs, parse_chunk_event, parse_transform_event
from canonflow.errors import RequestRejected
from canonflow.model import ProcessingMode, TransformRequest

TABLE = {"tenant_id": "acme", "service_name": "crm", "table_name": "contacts"}
KEYS = [f"raw/acme/crm/contacts/job-1/c-{i}/part-00000.jsonl.zst" for i in range(3)]


def test_the_contract_payload_passes_as_it_is() -> None:
    request = TransformRequest(**TABLE, job_id="job-1", source_files=KEYS,
                               request_id="job-1:crm:contacts", trigger="aggregated",
                               trace_context={"traceparent": "00-" + "a" * 32 + "-" + "b" * 16
                                              + "-01"})
    parsed = parse_transform_event(request.payload())
    assert parsed.request == request and not parsed.legacy and parsed.ignored == ()


def test_the_seed_file_specific_event_gets_a_deterministic_request_id() -> None:
    event = {**TABLE, "source_files": KEYS, "timestamp": "2024-01-01T00:00:00Z"}
    one, two = parse_transform_event(event), parse_transform_event(dict(reversed(
        list(event.items()))))
    assert one.request.processing_mode is ProcessingMode.FILE_SPECIFIC
    assert one.request.source_files == KEYS
    assert one.request.request_id == two.request.request_id  # a redelivery is a replay
    assert one.request.request_id != parse_transform_event(
        {**TABLE, "source_files": KEYS[:2]}).request.request_id
    assert one.ignored == ("timestamp",)


def test_the_seed_event_without_files_is_time_based_over_72_hours() -> None:
    parsed = parse_transform_event(TABLE)
    assert parsed.request.processing_mode is ProcessingMode.TIME_BASED
    assert parsed.request.lookback_hours == 72.0 and not parsed.legacy


def test_the_legacy_per_batch_event_is_accepted_and_time_based() -> None:
    parsed = parse_transform_event({**TABLE, "s3_key": KEYS[0]})
    request = parsed.request
    assert parsed.legacy
    assert request.processing_mode is ProcessingMode.TIME_BASED
    assert request.trigger == "per_batch" and request.reprocess  # re-reads its window
    assert request.request_id == parse_transform_event(
        {**TABLE, "s3_key": KEYS[0]}).request.request_id
    assert request.request_id != parse_transform_event(
        {**TABLE, "s3_key": KEYS[1]}).request.request_id


@pytest.mark.parametrize("event", [
    {**TABLE, "s3_key": "raw/other/crm/contacts/job-1/c/part-00000.jsonl.zst"},
    {**TABLE, "s3_key": "raw/acme/crm/contacts/../../../other/x"},
    {**TABLE, "tenant_id": "../acme"},
    {"service_name": "crm", "table_name": "contacts"},
    {**TABLE, "source_files": "raw/acme/crm/contacts/x"},
    [1, 2],
    "not json",
])
def test_malformed_or_foreign_events_are_rejected(event: object) -> None:
    with pytest.raises(RequestRejected):
        parse_transform_event(event)


def test_chunk_events_and_sqs_batches() -> None:
    with pytest.raises(RequestRejected):
        parse_chunk_event({"job_id": "j"})
    assert is_sqs({"Records": [{"eventSource": "aws:sqs", "body": "{}"}]})
    assert not is_sqs({"Records": [{"eventSource": "aws:s3"}]})
    assert not is_sqs({**TABLE})
