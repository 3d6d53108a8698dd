"""The whole pipeline against the demo API: one transform per table, nothing lost, and the
legacy per-batch trigger reproduced behind its flag."""

from __future__ import annotations

from typing import Any

import pytest

from canonflow.connectors.demo_api import expected_bad
from canonflow.model import TriggerMode
from canonflow.query import run_query
from canonflow.report import job_report
from canonflow.runtime import Runtime
from tests.jobs import run_job as run_one_job

TABLES = {"crm": ["contacts", "companies", "deals"], "helpdesk": ["tickets"]}
SIZES = {"contacts": 5000, "companies": 1200, "deals": 1200, "tickets": 1200}
ENTITY = {"contacts": "contact", "companies": "company", "deals": "deal", "tickets": "ticket"}


def run_job(settings: Any) -> tuple[Runtime, dict[str, Any]]:
    rt, job_id = run_one_job(settings)
    return rt, job_report(rt.state, job_id)


def canonical_counts(rt: Runtime, entity: str) -> tuple[int, int]:
    _, rows = run_query(rt.canonical._store, f"SELECT count(*), count(DISTINCT "
                        f"(_tenant_id, _service_name, id)) FROM {entity}")
    return rows[0][0], rows[0][1]


def unique_expected(service: str, table: str) -> int:
    return SIZES[table] - expected_bad((service, table), SIZES[table])


@pytest.mark.parametrize(("dispatcher", "state"), [
    ("local://?workers=2", "sqlite"), ("inline://", "sqlite"),
    ("local://?workers=2", "dynamodb")])
def test_aggregated_mode_one_transform_per_table_with_exactly_its_files(
        make_settings, dispatcher: str, state: str, request: pytest.FixtureRequest) -> None:
    overrides = {"state_store": request.getfixturevalue("dynamodb_url")} if state != "sqlite" \
        else {}
    rt, report = run_job(make_settings(tables=TABLES, dispatcher=dispatcher, **overrides))
    assert report["status"] == "done" and report["outcome"] == "completed"
    results = rt.state.chunk_results(report["job_id"])
    requests = rt.state.requests(report["job_id"])
    assert len(requests) == 4  # exactly one per table
    for rec in requests:
        req = rec.request
        assert rec.status == "done" and req.trigger == "aggregated"
        written = sorted(k for r in results if r.table_metadata == req.table
                         for k in r.s3_files_written)
        assert req.source_files == written  # exactly its table's files, no other
        assert rec.result is not None and rec.result.files_read == len(written)
    for service, tables in TABLES.items():
        for table in tables:
            t = report["tables"][f"acme/{service}.{table}"]
            assert t["chunks"] >= 5
            assert t["transforms_triggered"] == 1
            assert t["records_extracted"] == SIZES[table]
            # nothing lost: extracted == canonical + quarantined + merged duplicates
            assert t["records_extracted"] == (
                t["records_canonical"] + t["records_quarantined"] + t["records_merged"])
            assert t["records_quarantined"] == expected_bad((service, table), SIZES[table])
            rows, distinct = canonical_counts(rt, ENTITY[table])
            assert rows == distinct == unique_expected(service, table)
            # the seed's headline in the report: each record read once, every file once
            assert t["read_per_extracted"] == 1.0
            assert t["files_per_transform"] == t["files_written"]
            assert t["chunk_seconds"] > 0 and t["transform_seconds"] > 0


@pytest.mark.parametrize("state", ["sqlite", "dynamodb"])
def test_per_batch_rollback_flag_reproduces_the_legacy_trigger_without_duplicates(
        make_settings, state: str, request: pytest.FixtureRequest) -> None:
    overrides = {"state_store": request.getfixturevalue("dynamodb_url")} if state != "sqlite" \
        else {}
    settings = make_settings(tables=TABLES, trigger_mode=TriggerMode.PER_BATCH, **overrides)
    rt, report = run_job(settings)
    assert report["status"] == "done"
    files_written = sum(t["files_written"] for t in report["tables"].values())
    transforms = report["transforms"]
    assert all(t["trigger"] == "per_batch" and t["processing_mode"] == "time_based"
               for t in transforms)
    assert len(transforms) == files_written  # one transform per batch write
    files_read = sum(t["files_read"] for t in report["tables"].values())
    records_read = sum(t["records_read"] for t in report["tables"].values())
    extracted = sum(t["records_extracted"] for t in report["tables"].values())
    assert files_read > files_written  # overlapping transforms re-read files
    assert records_read > extracted
    assert all(t["read_per_extracted"] > 1.0 for t in report["tables"].values())
    for service, tables in TABLES.items():
        for table in tables:
            rows, distinct = canonical_counts(rt, ENTITY[table])
            assert rows == distinct == unique_expected(service, table)


def test_a_failed_table_is_reported_not_transformed(make_settings) -> None:
    settings = make_settings(tables={"crm": ["companies", "deals"]})
    spec = settings.spec_for("crm")
    broken = spec.model_copy(update={"tables": {
        **spec.tables, "deals": spec.tables["deals"].model_copy(update={"path": "/gone"})}})
    settings.sources[0].spec = None
    rt = Runtime(settings)
    # the plan reads totals with the good spec; chunks then hit a path that 404s
    from canonflow.plan import plan_job
    plan = plan_job(settings, rt, "acme", job_id="job-partial")
    rt.state.create_job(plan.job_id, "acme", "t", "aggregated", plan.chunks)
    rt.clients.open[("acme", "crm")].spec = broken  # type: ignore[misc]
    from canonflow.dispatch.tasks import run_chunk, run_transform_task
    for c in plan.chunks:
        run_chunk(c.model_dump_json(), rt)
    for req in rt.state.claim_for_dispatch():
        run_transform_task(req.model_dump_json(), rt)
    report = job_report(rt.state, "job-partial")
    assert report["outcome"] == "partial_success" and report["status"] == "done"
    assert report["tables"]["acme/crm.companies"]["transforms_triggered"] == 1
    deals = report["tables"]["acme/crm.deals"]
    assert deals["transforms_triggered"] == 0 and deals["chunks_failed"] == deals["chunks"]
    assert "HTTP 404" in deals["errors"][0]
