import pytest
from pydantic import ValidationError

from canonflow.errors import InvalidIdentifier
from canonflow.model import (
    ChunkResult,
    ProcessingMode,
    TableRef,
    TransformRequest,
    raw_key,
    validate_identifier,
)


@pytest.mark.parametrize("bad", ["", "a/b", "..", "a..b", "a b", "tab\tx", "nul\x00", "é",
                                 "x" * 129, "-leading-dash"])
def test_unsafe_identifiers_are_rejected(bad: str) -> None:
    with pytest.raises(InvalidIdentifier, match="invalid tenant_id"):
        validate_identifier(bad, "tenant_id")


@pytest.mark.parametrize("good", ["acme", "tenant_01", "a.b-c", "x" * 128])
def test_safe_identifiers_pass(good: str) -> None:
    assert validate_identifier(good) == good


def test_models_validate_identifiers_with_a_clear_message() -> None:
    with pytest.raises(ValidationError, match=r"invalid tenant_id '\.\./other'"):
        TableRef(tenant_id="../other", service_name="crm", table_name="contacts")


def test_raw_key_is_deterministic() -> None:
    t = TableRef(tenant_id="acme", service_name="crm", table_name="contacts")
    assert raw_key(t, "job1", "c-1", 7) == "raw/acme/crm/contacts/job1/c-1/part-00007.jsonl.zst"
    assert raw_key(t, "job1", "c-1", 7) == raw_key(t, "job1", "c-1", 7)


def _result(**kw: object) -> ChunkResult:
    base: dict[str, object] = dict(
        job_id="j", chunk_id="c", completed=True, records_processed=1, processing_time=0.1,
        s3_files_written=["raw/acme/crm/contacts/j/c/part-00000.jsonl.zst"], s3_files_count=1,
        table_metadata={"tenant_id": "acme", "service_name": "crm", "table_name": "contacts"},
    )
    base.update(kw)
    return ChunkResult.model_validate(base)


def test_chunk_result_keeps_the_seed_field_names() -> None:
    doc = _result().model_dump(mode="json")
    for name in ("completed", "records_processed", "processing_time", "final_page",
                 "final_offset", "s3_files_written", "s3_files_count", "table_metadata"):
        assert name in doc
    assert set(doc["table_metadata"]) == {"tenant_id", "service_name", "table_name"}


def test_chunk_result_file_count_must_match() -> None:
    with pytest.raises(ValidationError, match="s3_files_count"):
        _result(s3_files_count=2)


def test_transform_mode_follows_presence_of_source_files() -> None:
    base = dict(tenant_id="acme", service_name="crm", table_name="contacts")
    assert TransformRequest(**base).processing_mode is ProcessingMode.TIME_BASED
    assert TransformRequest(**base).lookback_hours == 72
    assert TransformRequest(**base, source_files=[]).processing_mode is ProcessingMode.FILE_SPECIFIC
    payload = TransformRequest(**base).payload()
    assert "source_files" not in payload and "source_files_manifest" not in payload
