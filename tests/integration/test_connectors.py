"""Every pagination and chunking strategy against the demo API, with its fault switches."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from canonflow.config import SourceConfig
from canonflow.connectors.demo_api import DemoApi, DemoFaults, DemoServer, serve, tenant_token
from canonflow.connectors.rest import RestClient
from canonflow.connectors.spec import builtin_specs, parse_spec
from canonflow.dispatch import open_dispatcher
from canonflow.errors import MalformedPage
from canonflow.query import run_query
from canonflow.report import job_report
from canonflow.runner import JobRunner
from canonflow.runtime import Runtime

CURSOR_SPEC = """
service: helpdesk
base_url: http://127.0.0.1/helpdesk/v1
tables:
  tickets:
    path: /tickets
    records_path: data
    primary_key: id
    pagination: {type: cursor, cursor_param: cursor, cursor_path: meta.next_cursor,
                 size_param: limit, page_size: 70}
    chunking: {type: sequential}
"""
OFFSET_SPEC = """
service: billing
base_url: http://127.0.0.1/billing/v1
tables:
  invoices:
    path: /invoices
    records_path: data
    primary_key: id
    pagination: {type: offset, offset_param: offset, limit_param: limit, page_size: 70}
    chunking: {type: sequential}
"""


@pytest.fixture(scope="module")
def api() -> Iterator[DemoServer]:
    with serve(DemoApi(500)) as server:
        yield server


def client(server: DemoServer, spec_text: str | None, service: str) -> RestClient:
    spec = parse_spec(spec_text, "test") if spec_text else builtin_specs()[service]
    return RestClient(spec, {"token": tenant_token("acme")},
                      base_url=f"{server.base_url}/{service}/v1")


def ids(pages: Iterator[Any]) -> list[str]:
    import orjson

    return [str(orjson.loads(r).get("id")) for page in pages for r in page.records]


@pytest.mark.parametrize(("service", "table", "spec", "first", "count"), [
    ("crm", "contacts", None, "100000", 500),                 # page numbers with a total
    ("helpdesk", "tickets", CURSOR_SPEC, "7000", 500),        # cursor in the body
    ("billing", "invoices", OFFSET_SPEC, "in_000000", 500),   # offset / limit
    ("billing", "invoices", None, "in_000000", 500),          # RFC 8288 Link header
    ("billing", "customers", None, "cus_000000", 500),        # next URL in the body
])
def test_each_pagination_strategy_reads_every_record_once(
        api: DemoServer, service: str, table: str, spec: str | None, first: str,
        count: int) -> None:
    got = ids(client(api, spec, service).pages(table))
    assert got[0] == first
    assert len(got) == len(set(got)) == count


def test_page_ranges_stop_at_their_end(api: DemoServer) -> None:
    got = ids(client(api, None, "crm").pages("contacts", 2, 3, page_size=50))
    assert got == [str(100000 + i) for i in range(50, 150)]


def test_the_demo_api_answers_a_small_page_without_waiting_for_an_ack(
        api: DemoServer) -> None:
    """A page past the end (a few bytes) on a keep-alive connection: with Nagle's algorithm
    on, the body waited for the client's delayed ACK of the headers (40 ms a page)."""
    import statistics
    import time

    headers = {"Authorization": f"Bearer {tenant_token('acme')}"}
    with httpx.Client(base_url=api.base_url, headers=headers) as http:
        took = []
        for _ in range(10):
            started = time.perf_counter()
            response = http.get("/crm/v1/contacts", params={"page": 99, "per_page": 100})
            took.append(time.perf_counter() - started)
            assert response.json()["results"] == []
    assert statistics.median(took) < 0.02, took


def _loop(_: httpx.Request) -> httpx.Response:
    return httpx.Response(200, json={"data": [{"id": 1}], "meta": {"next_cursor": "same"}})


def test_a_repeated_cursor_is_an_error_not_a_loop() -> None:
    spec = parse_spec(CURSOR_SPEC, "test")
    rest = RestClient(spec, {"token": "t"}, base_url="http://api.test/helpdesk/v1",
                      transport=httpx.MockTransport(_loop))
    with pytest.raises(MalformedPage, match="sent page 3 again"):
        list(rest.pages("tickets"))


def test_a_next_url_on_another_host_is_refused() -> None:
    spec = builtin_specs()["billing"]

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json={"data": [{"id": 1}] * 250,
                                         "links": {"next": "http://evil.test/steal"}})

    rest = RestClient(spec, {"token": "t"}, base_url="http://api.test/billing/v1",
                      transport=httpx.MockTransport(handler))
    with pytest.raises(MalformedPage, match=r"another host: evil\.test"):
        list(rest.pages("customers"))


def test_range_chunking_needs_a_total() -> None:
    from canonflow.errors import ConfigError

    with pytest.raises(ConfigError, match="page_ranges chunking needs page_number or offset"):
        parse_spec(CURSOR_SPEC.replace("{type: sequential}", "{type: page_ranges}"), "s.yaml")


def sync(make_settings: Any, server: DemoServer, tables: dict[str, list[str]]) -> tuple[
        Runtime, dict[str, Any]]:
    settings = make_settings(tables=tables)
    settings.sources[:] = [SourceConfig(service=svc, base_url=f"{server.base_url}/{svc}/v1",
                                        tables=tbls, page_size=50 if svc == "crm" else None,
                                        pages_per_chunk=2 if svc == "crm" else None)
                           for svc, tbls in tables.items()]
    rt = Runtime(settings)
    (job_id,) = JobRunner(settings, rt, open_dispatcher("inline://", settings)).run()
    return rt, job_report(rt.state, job_id)


def test_429_storms_and_500s_end_in_a_complete_exact_sync(make_settings: Any) -> None:
    faults = DemoFaults(rate_limit_every=3, error_every=7)
    with serve(DemoApi(300, faults=faults)) as server:
        rt, report = sync(make_settings, server, {"crm": ["contacts"],
                                                  "billing": ["invoices"]})
    # 9 good responses (page 1 read by the plan, which the first chunk does not ask for
    # again, 5 more contact pages and the empty 7th after the full last page, 2 invoice
    # pages), every fault retried
    assert faults.injected >= 5 and faults.requests == 9 + faults.injected
    assert report["status"] == "done" and report["outcome"] == "completed"
    assert report["tables"]["acme/crm.contacts"]["chunks"] == 3  # 6 pages of 50, 2 a chunk
    assert report["tables"]["acme/billing.invoices"]["chunks"] == 1  # sequential
    for entity, n in (("contact", 300), ("invoice", 300)):
        _, rows = run_query(rt.canonical._store,
                            f"SELECT count(*), count(DISTINCT id) FROM {entity}")
        assert rows == [(n, n)]


def test_a_malformed_page_fails_its_chunk_and_only_its_table(make_settings: Any) -> None:
    faults = DemoFaults(malformed={("contacts", 4)})
    with serve(DemoApi(300, faults=faults)) as server:
        _, report = sync(make_settings, server, {"crm": ["contacts", "companies"]})
    assert report["outcome"] == "partial_success" and report["status"] == "done"
    contacts = report["tables"]["acme/crm.contacts"]
    assert (contacts["chunks_failed"], contacts["transforms_triggered"]) == (1, 0)
    assert "contacts?page=4" in contacts["errors"][0] and "invalid JSON" in contacts["errors"][0]
    assert "demo-acme" not in contacts["errors"][0]
    assert report["tables"]["acme/crm.companies"]["records_canonical"] == 300


def test_connectors_cli_lists_checks_and_probes(api: DemoServer, tmp_path: Any) -> None:
    import json
    import subprocess
    import sys

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-c", "from canonflow.cli import main; main()",
                               *args], capture_output=True, text=True, timeout=60)

    listed = json.loads(cli("connectors", "list", "--json").stdout)
    assert {(d["service"], d["pagination"]) for d in listed} >= {
        ("crm", "page_number"), ("billing", "link_header"), ("billing", "next_url")}
    good = tmp_path / "cursor.yaml"
    good.write_text(CURSOR_SPEC)
    probe = cli("connectors", "check", str(good), "--probe", f"{api.base_url}/helpdesk/v1",
                "--credential", "token=demo-acme")
    assert probe.returncode == 0, probe.stderr
    assert "tickets: 70 record(s) on the first page" in probe.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text(CURSOR_SPEC.replace("type: cursor,", "type: cursr,"))
    failed = cli("connectors", "check", str(bad))
    assert failed.returncode == 2
    assert "bad.yaml: at tables.tickets.pagination" in failed.stderr
    assert len(failed.stderr.strip().splitlines()) == 1


WINDOW_SPEC = """
service: helpdesk
base_url: http://127.0.0.1/helpdesk/v1
tables:
  tickets:
    path: /tickets
    records_path: data
    primary_key: id
    pagination: {type: page_number, page_param: page, size_param: limit, page_size: 40}
    chunking: {type: time_windows, since_param: updated_since, before_param: updated_before,
               start: "2026-01-01T00:00:00Z", end: "2027-01-01T00:00:00Z", window_hours: 720}
"""


def test_time_window_chunks_cover_the_table_exactly_once(make_settings: Any,
                                                         tmp_path: Any) -> None:
    spec_file = tmp_path / "helpdesk-windows.yaml"
    spec_file.write_text(WINDOW_SPEC)
    with serve(DemoApi(600)) as server:
        settings = make_settings(tables={"helpdesk": ["tickets"]})
        settings.sources[:] = [SourceConfig(service="helpdesk", spec=str(spec_file),
                                            base_url=f"{server.base_url}/helpdesk/v1",
                                            tables=["tickets"])]
        rt = Runtime(settings)
        (job_id,) = JobRunner(settings, rt, open_dispatcher("inline://", settings)).run()
    report = job_report(rt.state, job_id)
    tickets = report["tables"]["acme/helpdesk.tickets"]
    assert tickets["chunks"] == 13  # 366 days in 30-day windows
    assert tickets["records_extracted"] == 600  # every record in exactly one window
    specs = rt.state.chunk_specs(job_id)
    assert specs[0].params == {"updated_since": "2026-01-01T00:00:00Z",
                               "updated_before": "2026-01-31T00:00:00Z"}
    _, rows = run_query(rt.canonical._store, "SELECT count(*), count(DISTINCT id) FROM ticket")
    assert rows == [(599, 599)]  # one deliberately bad ticket quarantined


def test_a_total_that_undercounts_is_followed_past_to_the_last_record(
        make_settings: Any) -> None:
    # the API says 180 contacts but holds 300: the last page-range chunk keeps following
    # full pages instead of stopping where the announced total ends
    with serve(DemoApi(300, faults=DemoFaults(total_skew=-120))) as server:
        rt, report = sync(make_settings, server, {"crm": ["contacts"]})
    contacts = report["tables"]["acme/crm.contacts"]
    assert report["outcome"] == "completed"
    assert contacts["chunks"] == 2  # planned from 180: pages 1-2, then 3 onwards
    assert contacts["records_extracted"] == 300 and contacts["records_canonical"] == 300
    _, rows = run_query(rt.canonical._store, "SELECT count(*), count(DISTINCT id) FROM contact")
    assert rows == [(300, 300)]


def test_a_total_that_overcounts_reports_the_table_incomplete(make_settings: Any) -> None:
    # the API announces 400 contacts and serves 300: never "completed", never transformed
    with serve(DemoApi(300, faults=DemoFaults(total_skew=100))) as server:
        _, report = sync(make_settings, server, {"crm": ["contacts"], "billing": ["invoices"]})
    assert report["status"] == "done" and report["outcome"] == "partial_success"
    contacts = report["tables"]["acme/crm.contacts"]
    assert contacts["records_extracted"] == 300 and contacts["transforms_triggered"] == 0
    assert contacts["errors"] == [
        "incomplete: the source announced 400 records, 300 were extracted"]
    # a table without a total (Link-header pages) is complete when its pages end
    assert report["tables"]["acme/billing.invoices"]["records_canonical"] == 300


SEQUENTIAL_WITH_TOTAL = """
service: crm
base_url: http://127.0.0.1/crm/v1
tables:
  contacts:
    path: /contacts
    records_path: results
    primary_key: id
    pagination: {type: page_number, page_param: page, size_param: per_page, page_size: 100,
                 total_path: total}
    chunking: {type: sequential}
"""


def test_a_capped_page_size_is_caught_by_the_total_a_sequential_chunk_read(
        make_settings: Any, tmp_path: Any) -> None:
    # the API silently serves 40 records where 100 were asked: the first page looks like the
    # last one; the total the chunk read says otherwise
    spec_file = tmp_path / "crm-sequential.yaml"
    spec_file.write_text(SEQUENTIAL_WITH_TOTAL)
    with serve(DemoApi(300, faults=DemoFaults(page_size_cap=40))) as server:
        settings = make_settings(tables={"crm": ["contacts"]})
        settings.sources[:] = [SourceConfig(service="crm", spec=str(spec_file),
                                            base_url=f"{server.base_url}/crm/v1",
                                            tables=["contacts"])]
        rt = Runtime(settings)
        (job_id,) = JobRunner(settings, rt, open_dispatcher("inline://", settings)).run()
    report = job_report(rt.state, job_id)
    contacts = report["tables"]["acme/crm.contacts"]
    assert report["outcome"] == "failed" and contacts["transforms_triggered"] == 0
    assert contacts["records_extracted"] == 40
    assert contacts["errors"] == [
        "incomplete: the source announced 300 records, 40 were extracted"]
