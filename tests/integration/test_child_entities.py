"""Child entities (rows exploded from an array of each parent record, deal -> deal_company):
a child row that fails its mapping is counted and quarantined, never silently dropped, and a
parent's children are replaced by the ones of the version that wins (an association removed
upstream is removed from the canonical child table)."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from canonflow.chunk import encode_batch
from canonflow.config import Settings
from canonflow.model import TransformRequest, TransformResult
from canonflow.query import run_query
from canonflow.report import job_report, totals
from canonflow.runtime import Runtime
from canonflow.transform.quarantine import quarantined
from canonflow.transform.run import run_transform

T1, T2, T3 = "2026-03-01T10:00:00Z", "2026-03-02T10:00:00Z", "2026-03-03T10:00:00Z"


def deal(i: str, companies: list[str | None], ts: str = T1) -> bytes:
    return orjson.dumps({"id": i, "properties": {"dealname": f"D{i}", "amount": "1",
                                                 "dealstage": "won"},
                         "associations": {"companies": companies}, "updated_at": ts})


@pytest.fixture(params=["copy_on_write", "merge_on_read"])
def rt(tmp_path: Path, request: pytest.FixtureRequest) -> Runtime:
    return Runtime(Settings(object_store=f"file://{tmp_path}/data",
                            state_store=f"sqlite:///{tmp_path}/data/state.db",
                            canonical_writes=request.param,
                            transform_group_records=2))


def sync(rt: Runtime, job: str, *files: list[bytes], tenant: str = "acme") -> TransformResult:
    keys = []
    for n, lines in enumerate(files):
        key = f"raw/{tenant}/crm/deals/{job}/c-0/part-{n:05d}.jsonl.zst"
        rt.objects.put(key, encode_batch(lines))
        keys.append(key)
    return run_transform(TransformRequest(
        tenant_id=tenant, service_name="crm", table_name="deals", job_id=job,
        source_files=keys, request_id=f"{job}:crm:deals:{tenant}"), rt)


def links(rt: Runtime, tenant: str = "acme") -> list[tuple[object, ...]]:
    return run_query(rt.canonical._store, "SELECT deal_id, company_id FROM deal_company "
                     f"WHERE _tenant_id = '{tenant}' ORDER BY 1, 2")[1]


def test_a_child_row_that_fails_its_mapping_is_counted_and_quarantined(rt: Runtime) -> None:
    result = sync(rt, "job-1", [deal("1", ["a", None, "b"]), deal("2", ["c"])])
    assert (result.records_written, result.records_quarantined) == (2, 0)  # parents land
    assert (result.child_rows_written, result.child_rows_rejected) == (3, 1)
    assert links(rt) == [("1", "a"), ("1", "b"), ("2", "c")]
    (entry,) = quarantined(rt).to_pylist()
    assert (entry["entity"], entry["field"], entry["reason"]) == (
        "deal_company", "company_id", "required field '$item' is missing")
    assert entry["raw"] == deal("1", ["a", None, "b"]).decode()


def test_the_job_report_sums_rejected_child_rows(rt: Runtime) -> None:
    rt.state.create_job("job-1", "acme", "t", "aggregated", [])
    sync(rt, "job-1", [deal("1", [None, None, "b"])])
    report = job_report(rt.state, "job-1")
    assert report["tables"]["acme/crm.deals"]["child_rows_rejected"] == 2
    assert totals(report)["child_rows_rejected"] == 2


def test_an_association_removed_upstream_is_removed(rt: Runtime) -> None:
    sync(rt, "job-1", [deal("1", ["a", "b"]), deal("2", ["c", "d"]), deal("3", ["e"])])
    sync(rt, "job-1", [deal("1", ["a", "b"])], tenant="globex")
    sync(rt, "job-2", [deal("1", ["a"], T2), deal("2", [], T2)])
    assert links(rt) == [("1", "a"), ("3", "e")]
    assert links(rt, "globex") == [("1", "a"), ("1", "b")]  # another tenant's: untouched
    # an older version of a deal does not bring its old associations back
    sync(rt, "job-3", [deal("1", ["a", "b", "x"], T1)])
    assert links(rt) == [("1", "a"), ("3", "e")]
    # a newer one replaces them again
    sync(rt, "job-4", [deal("1", ["y"], T3)])
    assert links(rt) == [("1", "y"), ("3", "e")]


@pytest.mark.parametrize("newer_first", [False, True])
def test_two_versions_of_a_parent_in_one_request_keep_the_newest_children(
        rt: Runtime, newer_first: bool) -> None:
    old, new = deal("1", ["a", "b"], T1), deal("1", ["a"], T2)
    first, second = (new, old) if newer_first else (old, new)
    # groups of 2 records: the two versions travel in different groups, and in one group
    result = sync(rt, "job-1", [first, deal("2", ["c"])], [second, deal("3", ["e"])])
    assert links(rt) == [("1", "a"), ("2", "c"), ("3", "e")]
    assert (result.records_written, result.records_merged) == (3, 1)
    rt2 = sync(rt, "job-2", [deal("4", ["x"]), first, second])
    assert links(rt) == [("1", "a"), ("2", "c"), ("3", "e"), ("4", "x")]
    assert (rt2.records_written, rt2.records_merged) == (2, 1)
