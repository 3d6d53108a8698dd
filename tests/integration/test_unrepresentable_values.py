"""One record whose value cannot be represented in the canonical type (NaN, infinity, a number
too big for its column, a date that does not exist) is quarantined with its reason; it never
fails the whole table's transform (invariant 6)."""

from __future__ import annotations

from pathlib import Path

import pytest

from canonflow.chunk import encode_batch
from canonflow.config import Settings
from canonflow.model import TransformRequest
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
    pytest.param("companies", company(1, "NaN"), "employees", EMPLOYEES, id="nan-int"),
    pytest.param("companies", company(1, "9.3e18"), "employees", EMPLOYEES,
                 id="too-big-float-int"),
    pytest.param("companies", company(1, '"99999999999999999999999"'), "employees", EMPLOYEES,
                 id="too-big-text-int"),
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
