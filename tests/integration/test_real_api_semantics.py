"""The built-in HubSpot, Zendesk and Stripe specs and mappings, synced twice through the
pipeline against local stand-ins that follow each API's documented paging, limits, filters
and record shapes (tests/real_apis.py): fields arrive, values land with their meaning,
deletions and archives propagate, second runs ask only for what changed in the API's own
cursor format."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from datetime import timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from canonflow.config import Settings, SourceConfig, TenantConfig
from canonflow.dispatch import open_dispatcher
from canonflow.model import TableRef
from canonflow.query import run_query
from canonflow.report import job_report
from canonflow.runner import JobRunner
from canonflow.runtime import Runtime
from tests.real_apis import (
    HUBSPOT_TOKEN,
    STRIPE_KEY,
    T0,
    ZENDESK_TOKEN,
    ZENDESK_USER,
    RealApis,
    RealApiServer,
    serve_real_apis,
)

CREDENTIALS = {"hubspot": {"token": HUBSPOT_TOKEN},
               "zendesk": {"username": ZENDESK_USER, "api_token": ZENDESK_TOKEN},
               "stripe": {"secret_key": STRIPE_KEY}}
BASES = {"hubspot": "/hubspot", "zendesk": "/zendesk/api/v2", "stripe": "/stripe/v1"}


class Sync:
    def __init__(self, tmp_path: Path, server: RealApiServer, service: str,
                 tables: list[str] | None = None, page_size: int | None = None) -> None:
        self.settings = Settings(
            name="real", object_store=f"file://{tmp_path / 'data'}",
            state_store=f"sqlite:///{tmp_path / 'data' / 'state.db'}",
            dispatcher="inline://", batch_records=100,
            sources=[SourceConfig(service=service, base_url=server.base_url + BASES[service],
                                  tables=tables, page_size=page_size)],
            tenants=[TenantConfig.model_validate({
                "tenant_id": "acme", "credentials": {service: CREDENTIALS[service]}})])
        self.rt = Runtime(self.settings)

    def __call__(self, full_refresh: bool = False) -> dict[str, Any]:
        runner = JobRunner(self.settings, self.rt, open_dispatcher("inline://", self.settings),
                           full_refresh=full_refresh)
        (job_id,) = runner.run()
        return job_report(self.rt.state, job_id)

    def rows(self, sql: str) -> list[tuple[Any, ...]]:
        return run_query(self.rt.canonical._store, sql)[1]


@pytest.fixture
def apis() -> Iterator[tuple[RealApis, RealApiServer]]:
    api = RealApis.seeded()
    with serve_real_apis(api) as server:
        yield api, server


def balanced(table: dict[str, Any]) -> bool:
    return bool(table["records_extracted"] == table["records_canonical"]
                + table["records_quarantined"] + table["records_merged"])


def test_hubspot_properties_arrive_values_keep_their_meaning_and_archives_propagate(
        tmp_path: Path, apis: tuple[RealApis, RealApiServer]) -> None:
    api, server = apis
    sync = Sync(tmp_path, server, "hubspot")
    first = sync()
    assert first["outcome"] == "completed"
    contacts = first["tables"]["acme/hubspot.contacts"]
    assert (contacts["records_extracted"], contacts["records_canonical"],
            contacts["records_quarantined"]) == (250, 250, 0)
    # every request named the properties the mappings read, at the API's maximum page size
    for q in api.seen("/hubspot/crm/v3/objects/contacts"):
        assert q["properties"] == ("email,firstname,lastname,phone,associatedcompanyid,"
                                   "lifecyclestage") and q["limit"] == "100"
    assert len(api.seen("/hubspot/crm/v3/objects/contacts")) == 3 + 1  # 3 live, 1 archived
    # fields present on every row the API returns them for; "" is null, not quarantined
    assert sync.rows("SELECT count(phone), count(company_id), count(lifecycle_stage), "
                     "count(*) FROM contact") == [(200, 187, 209, 250)]
    assert sync.rows("SELECT id, full_name, phone, company_id, lifecycle_stage, "
                     "lifecycle_stage_raw FROM contact WHERE id IN ('1000', '1001', '1005') "
                     "ORDER BY id") == [
        ("1000", "Last0", None, None, "lead", None),   # cleared first name: no stray space
        ("1001", "First1 Last1", "+1 555 010001", "5001", "lead", None),
        ("1005", "First5 Last5", None, "5005", "other", "987654321")]  # a custom stage
    assert contacts["fields_nulled"] == {
        "lifecycle_stage: cannot cast 'properties.lifecyclestage' to enum (one of lead, "
        "opportunity, customer, churned, other); mapped to 'other'": 41}
    companies = first["tables"]["acme/hubspot.companies"]
    assert (companies["records_canonical"], companies["records_quarantined"]) == (120, 0)
    assert sync.rows("SELECT count(industry), count(employees), sum(employees) "
                     "FROM company") == [(80, 108, 65880)]

    # 25 contacts archived, 5 deleted for good (gone from both listings), 1 company archived
    at = T0 + timedelta(days=60)
    archived = [str(1000 + i) for i in range(0, 250, 10)]
    purged = [str(1000 + i) for i in (3, 4, 6, 7, 8)]
    api.hs_archive("contacts", archived, at)
    api.hs_purge("contacts", purged)
    api.hs_archive("companies", ["5007"], at)
    second = sync()
    assert second["outcome"] == "completed"
    assert all(balanced(t) for t in second["tables"].values())
    assert second["tables"]["acme/hubspot.contacts_archived"]["records_extracted"] == 25
    # the archived ones at archivedAt, with their last values; the purged ones at the sync
    assert sync.rows("SELECT count(*) FROM contact WHERE _deleted_at = "
                     "TIMESTAMPTZ '2024-03-01 00:00:00+00'") == [(25,)]
    assert sorted(r[0] for r in sync.rows(
        "SELECT id FROM contact WHERE _deleted_at > TIMESTAMPTZ '2025-01-01 00:00:00+00'")) \
        == purged
    # the live listing no longer holds the 30 (25 of them already marked by the archived
    # listing when its transform ran first); the archived listing says when 25 went
    assert second["tables"]["acme/hubspot.contacts"]["records_deleted"] in (5, 30)
    assert second["tables"]["acme/hubspot.contacts_archived"]["records_deleted"] == 25
    assert sync.rows("SELECT count(*) FROM contact WHERE _deleted_at IS NULL") == [(220,)]
    assert sync.rows("SELECT email FROM contact WHERE id = '1010'") == [
        ("person10@example.com",)]
    assert sync.rows("SELECT id FROM company WHERE _deleted_at IS NOT NULL") == [("5007",)]


def test_a_failed_or_partial_full_refresh_never_marks_anything_deleted(
        tmp_path: Path, apis: tuple[RealApis, RealApiServer]) -> None:
    api, server = apis
    sync = Sync(tmp_path, server, "hubspot", tables=["contacts"])
    assert sync()["outcome"] == "completed"
    api.hs_purge("contacts", [str(1000 + i) for i in range(200, 250)])
    api.fail.add("/hubspot/crm/v3/objects/contacts")  # page 2 and later answer 400
    failed = sync()
    table = failed["tables"]["acme/hubspot.contacts"]
    assert failed["outcome"] == "failed" and table["chunks_failed"] == 1
    assert table["records_deleted"] == 0 and table["transforms_triggered"] == 0
    assert table["errors"][0].endswith(
        'HTTP 400: {"status":"error","category":"VALIDATION_ERROR","message":"The paging '
        'cursor has expired"}')
    assert sync.rows("SELECT count(*) FROM contact WHERE _deleted_at IS NULL") == [(250,)]
    api.fail.clear()
    repaired = sync()
    assert repaired["tables"]["acme/hubspot.contacts"]["records_deleted"] == 50
    assert sync.rows("SELECT count(*) FROM contact WHERE _deleted_at IS NULL") == [(200,)]


def test_zendesk_incremental_export_first_and_second_run_and_deleted_tickets(
        tmp_path: Path, apis: tuple[RealApis, RealApiServer]) -> None:
    api, server = apis
    sync = Sync(tmp_path, server, "zendesk", tables=["tickets"], page_size=100)
    first = sync()
    assert first["outcome"] == "completed"
    table = first["tables"]["acme/zendesk.tickets"]
    assert (table["records_extracted"], table["records_canonical"]) == (300, 300)
    requests = api.seen("/zendesk/api/v2/incremental/tickets/cursor.json")
    # start_time (epoch seconds) first, then only the cursor from after_url, until the end
    assert requests[0] == {"start_time": "0", "per_page": "100"}
    assert [set(q) for q in requests[1:]] == [{"cursor", "per_page"}] * 2
    assert sync.rows("SELECT count(*), count(*) FILTER (status = 'pending') FROM ticket") == [
        (300, 100)]  # hold -> pending
    tickets = TableRef(tenant_id="acme", service_name="zendesk", table_name="tickets")
    mark = sync.rt.state.sync_cursors([tickets]).get(tickets)
    assert mark == "2024-01-02T04:59:00Z"  # the newest updated_at

    at = T0 + timedelta(days=30)
    api.zd_change([35000 + i for i in range(10)], at)  # 10 edited
    api.zd_change([35100 + i for i in range(30)], at + timedelta(minutes=5), status="deleted")
    del api.requests[:]
    second = sync()
    table = second["tables"]["acme/zendesk.tickets"]
    requests = api.seen("/zendesk/api/v2/incremental/tickets/cursor.json")
    assert requests[0] == {"start_time": "1704171540", "per_page": "100"}  # the mark, epoch s
    # the changed 40 and the one ticket at the old mark (the filter is inclusive)
    assert table["records_extracted"] == 41 and balanced(table)
    assert table["records_deleted"] == 30
    assert sync.rows("SELECT count(*), min(_deleted_at), max(_deleted_at) FROM ticket "
                     "WHERE _deleted_at IS NOT NULL")[0][0] == 30
    assert sync.rows("SELECT count(*) FROM ticket WHERE _deleted_at IS NOT NULL "
                     "AND id BETWEEN '35100' AND '35129'") == [(30,)]
    # an incremental run lists only what changed: the rest is not reconciled away
    assert sync.rows("SELECT count(*) FROM ticket WHERE _deleted_at IS NULL") == [(270,)]
    assert sync.rows("SELECT count(*) FROM ticket WHERE subject LIKE '%(edited)'") == [(10,)]


def test_stripe_money_in_major_units_created_filter_and_deleted_customers(
        tmp_path: Path, apis: tuple[RealApis, RealApiServer]) -> None:
    api, server = apis
    sync = Sync(tmp_path, server, "stripe")
    first = sync()
    assert first["outcome"] == "completed"
    assert first["tables"]["acme/stripe.customers"]["records_canonical"] == 150
    assert first["tables"]["acme/stripe.invoices"]["records_canonical"] == 40
    for q in api.seen("/stripe/v1/customers"):
        assert q["limit"] == "100" and "created[gte]" not in q
    assert sync.rows(
        "SELECT id, currency, amount_due, amount_paid, issued_at FROM invoice "
        "WHERE id IN ('in_00000000000000', 'in_00000000000001', 'in_00000000000002', "
        "'in_00000000000003', 'in_00000000000009') ORDER BY id") == [
        ("in_00000000000000", "usd", Decimal("2237.57"), Decimal("2237.57"),
         T0 + timedelta(hours=1)),
        ("in_00000000000001", "jpy", Decimal("349"), Decimal("349"), T0 + timedelta(hours=2)),
        ("in_00000000000002", "kwd", Decimal("1.234"), Decimal("1.234"),
         T0 + timedelta(hours=3)),
        ("in_00000000000003", "eur", Decimal("0.05"), Decimal("0.05"),
         T0 + timedelta(hours=4)),
        ("in_00000000000009", "jpy", Decimal("349"), Decimal("0"), None)]  # a draft

    # query --json: decimals as exact text, timestamps as ISO text
    data = sync.settings.object_store.removeprefix("file://")
    proc = subprocess.run(
        [sys.executable, "-c", "from canonflow.cli import main; main()", "query", "--data-dir",
         data, "--json", "SELECT id, amount_due, issued_at FROM invoice "
         "WHERE id = 'in_00000000000001'"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == [{"id": "in_00000000000001", "amount_due": "349.000000",
                                        "issued_at": "2024-01-01T02:00:00+00:00"}]

    deleted = [f"cus_{i:014d}" for i in range(0, 100, 5)]
    api.stripe_delete(deleted, T0 + timedelta(days=40))
    api.stripe_add(150, 5, T0 + timedelta(days=41))
    del api.requests[:]
    second = sync()
    assert second["outcome"] == "completed"
    newest = int((T0 + timedelta(hours=149)).timestamp())
    customers = api.seen("/stripe/v1/customers")
    assert customers[0] == {"limit": "100", "created[gte]": str(newest)}  # epoch seconds
    assert second["tables"]["acme/stripe.customers"]["records_extracted"] == 6  # 5 + the mark
    events = api.seen("/stripe/v1/events")
    assert events[0]["type"] == "customer.deleted"
    deletions = second["tables"]["acme/stripe.customer_deletions"]
    assert (deletions["records_extracted"], deletions["records_deleted"]) == (20, 20)
    assert sorted(r[0] for r in sync.rows(
        "SELECT id FROM contact WHERE _deleted_at IS NOT NULL")) == deleted
    assert sync.rows("SELECT email, _deleted_at FROM contact WHERE id = 'cus_00000000000005'"
                     ) == [("buyer5@example.com", T0 + timedelta(days=40, seconds=1))]
    assert sync.rows("SELECT count(*) FROM contact WHERE _deleted_at IS NULL") == [(135,)]
    third = sync()
    assert api.seen("/stripe/v1/events")[-1]["created[gte]"] == str(
        int((T0 + timedelta(days=40)).timestamp()) + 19)
    assert third["tables"]["acme/stripe.customer_deletions"]["records_extracted"] == 1


def test_a_page_size_above_the_apis_maximum_is_refused_before_any_request(
        tmp_path: Path, apis: tuple[RealApis, RealApiServer]) -> None:
    api, server = apis
    sync = Sync(tmp_path, server, "stripe", tables=["customers"], page_size=500)
    report = sync()
    assert report["status"] == "failed" and report["error"] == (
        "source stripe: page_size 500 is above the API's maximum for customers "
        "(max_page_size 100)")
    assert api.requests == []
