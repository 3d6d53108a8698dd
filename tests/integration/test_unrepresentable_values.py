"""One record whose value cannot be represented in the canonical type (NaN, infinity, a number
too big for its column, a date that does not exist) is quarantined with its reason; it never
fails the whole table's transform (invariant 6)."""

from __future__ import annotations

from pathlib import Path

import pytest

from canonflow.chunk import encode_batch
from canonflow.config import Settings
from canonflow.model import TransformRequest
from canonflow.query import run_query
from canonflow.runtime import Runtime
from canonflow.transform.quarantine import quarantined
from canonflow.transform.run import run_transform

TS = '"2026-03-01T10:00:00Z"'


def deal(i: int, amount: str = "10.5", ts: str = TS) -> bytes:
    # written by hand: orjson cannot write NaN or Infinity tokens, pyarrow.json reads them
    return (f'{{"id": "{i}", "properties": {{"dealname": "D{i}", "amount": {amount}, '
            f'"dealstage": "won"}}, "associations": {{"companies": ["c{i}"]}}, '
            f'"updated_at": {ts}}}').encode()


def company(i: int, employees: str = "10", ts: str = TS) -> bytes:
    return (f'{{"id": "{i}", "properties": {{"name": "C{i}", "employees": {employees}}}, '
            f'"updated_at": {ts}}}').encode()


@pytest.fixture
def rt(tmp_path: Path) -> Runtime:
    return Runtime(Settings(object_store=f"file://{tmp_path}/data",
                            state_store=f"sqlite:///{tmp_path}/data/state.db"))


AMOUNT = "cannot cast 'properties.amount' to decimal"
UPDATED = "cannot cast 'updated_at' to timestamp"
EMPLOYEES = "cannot cast 'properties.employees' to int"


@pytest.mark.parametrize(("table", "bad", "field", "reason"), [
    pytest.param("deals", deal(1, "NaN"), "amount", AMOUNT, id="nan-decimal"),
    pytest.param("deals", deal(1, "-Infinity"), "amount", AMOUNT, id="infinity-decimal"),
    pytest.param("deals", deal(1, "1e40"), "amount", AMOUNT, id="too-big-decimal"),
    pytest.param("deals", deal(1, '"1e400"'), "amount", AMOUNT, id="infinite-text-decimal"),
    pytest.param("deals", deal(1, ts="1e30"), "updated_at", UPDATED, id="too-big-epoch"),
    pytest.param("deals", deal(1, ts='"NaN"'), "updated_at", UPDATED, id="nan-text-timestamp"),
    pytest.param("deals", deal(1, ts='"2026-13-45T10:00:00Z"'), "updated_at", UPDATED,
                 id="no-such-date"),
])
def test_an_unrepresentable_value_quarantines_its_record_only(
        rt: Runtime, table: str, bad: bytes, field: str, reason: str) -> None:
    make = deal if table == "deals" else company
    key = f"raw/acme/crm/{table}/job-1/c-0/part-00000.jsonl.zst"
    rt.objects.put(key, encode_batch([make(0), bad, make(2)]))
    result = run_transform(TransformRequest(tenant_id="acme", service_name="crm",
                                            table_name=table, source_files=[key]), rt)
    assert (result.records_read, result.records_written, result.records_quarantined) == (3, 2, 1)
    rows = quarantined(rt).to_pylist()
    assert [(r["field"], r["reason"], r["line"], r["raw"]) for r in rows] == [
        (field, reason, 1, bad.decode())]


@pytest.mark.parametrize("employees", [
    pytest.param("NaN", id="nan-int"),
    pytest.param("9.3e18", id="too-big-float-int"),
    pytest.param('"99999999999999999999999"', id="too-big-text-int"),
])
def test_an_unrepresentable_optional_value_becomes_null_and_is_counted(
        rt: Runtime, employees: str) -> None:
    """An optional field (company.employees) without an on_error policy: the record lands
    with the field null and the reason counted; nothing is quarantined."""
    key = "raw/acme/crm/companies/job-1/c-0/part-00000.jsonl.zst"
    rt.objects.put(key, encode_batch([company(0), company(1, employees), company(2)]))
    result = run_transform(TransformRequest(tenant_id="acme", service_name="crm",
                                            table_name="companies", source_files=[key]), rt)
    assert (result.records_read, result.records_written, result.records_quarantined) == (3, 3, 0)
    assert result.fields_nulled == {f"employees: {EMPLOYEES}": 1}
    assert quarantined(rt).num_rows == 0
    _, rows = run_query(rt.canonical._store, "SELECT id, employees FROM company ORDER BY id")
    assert rows == [("0", 10), ("1", None), ("2", 10)]
