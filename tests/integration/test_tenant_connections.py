"""One pipeline, one run, several tenants of an API that puts the tenant in the URL: each
tenant's requests go to its own URL (tenant values), each page is read once, and each
tenant's canonical rows are exactly its own records."""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import yaml

from canonflow.config import load_settings
from canonflow.dispatch import open_dispatcher
from canonflow.query import run_query
from canonflow.report import job_report
from canonflow.runner import JobRunner
from canonflow.runtime import Runtime
from canonflow.stores import open_object_store
from tests.servers import JsonHandler, serve_api

# tenant -> (region its URL names, records it holds)
TENANTS = {"acme": ("eu", 25), "globex": ("us", 40), "initech": ("eu", 7)}
PAGE = 10

SPEC = """
service: tenantcrm
base_url: http://127.0.0.1:1/unused
tables:
  contacts:
    path: /tenants/{tenant.tenant_id}/contacts
    records_path: data
    primary_key: id
    params: {account: "{tenant.account}"}
    pagination: {type: page_number, page_size: 10, total_path: meta.total,
                 has_more_path: meta.has_more}
    chunking: {type: page_ranges, pages_per_chunk: 2}
"""
MAPPING = """
source: {service: tenantcrm, table: contacts}
entity: contact
fields:
  id: {path: id}
  email: {path: email}
  updated_at: {path: updated_at}
"""


def record(tenant: str, i: int) -> dict[str, Any]:
    """The same ids in every tenant: only the e-mail tells whose record a row is."""
    return {"id": f"c-{i:03d}", "email": f"{i}@{tenant}.example",
            "updated_at": "2026-01-02T03:04:05Z"}


@dataclass
class TenantApi:
    """``/regions/{region}/tenants/{id}/contacts?account=&page=&per_page=``; a tenant's
    token, region and account must all match the tenant the path names."""

    pages: Counter[tuple[str, int]] = field(default_factory=Counter)
    refused: list[str] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def answer(self, path: str, query: dict[str, str], auth: str) -> tuple[int, Any]:
        parts = path.strip("/").split("/")
        if len(parts) != 5 or parts[0] != "regions" or parts[2] != "tenants" \
                or parts[4] != "contacts" or parts[3] not in TENANTS:
            return 404, {"error": "no such path"}
        region, tenant = parts[1], parts[3]
        if (region, auth, query.get("account")) != (
                TENANTS[tenant][0], f"Bearer tok-{tenant}", f"acct-{tenant}"):
            with self._lock:
                self.refused.append(path)
            return 403, {"error": "not this tenant's"}
        page, size = int(query["page"]), int(query["per_page"])
        with self._lock:
            self.pages[(tenant, page)] += 1
        total = TENANTS[tenant][1]
        first = (page - 1) * size
        data = [record(tenant, i) for i in range(first, min(first + size, total))]
        return 200, {"data": data, "meta": {"total": total, "has_more": first + size < total}}


class _Handler(JsonHandler):
    def do_GET(self) -> None:
        api: TenantApi = self.server.api  # type: ignore[attr-defined]
        parts = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        self._send(*api.answer(parts.path, query, self.headers.get("Authorization", "")))


def write_pipeline(tmp_path: Path) -> Path:
    """A pipeline file in its own folder, naming its spec and mappings relatively."""
    folder = tmp_path / "project"
    (folder / "mappings").mkdir(parents=True)
    (folder / "tenantcrm.yaml").write_text(SPEC)
    (folder / "mappings" / "contacts.yaml").write_text(MAPPING)
    pipeline = {
        "name": "tenants", "dispatcher": "local://?workers=2", "batch_records": 15,
        "object_store": "file://./data", "state_store": "sqlite:///./data/state.db",
        "mapping_dirs": ["mappings"],
        "sources": [{"service": "tenantcrm", "spec": "tenantcrm.yaml",
                     "base_url": "${TENANT_API}/regions/{tenant.region}"}],
        "tenants": [{"tenant_id": t,
                     "values": {"region": region, "account": f"acct-${{ACCOUNT_{t.upper()}}}"},
                     "credentials": {"tenantcrm": {"token": f"${{TOKEN_{t.upper()}}}"}}}
                    for t, (region, _) in TENANTS.items()],
    }
    path = folder / "pipeline.yaml"
    path.write_text(yaml.safe_dump(pipeline))
    return path


def test_three_tenants_of_one_api_in_one_run_each_get_exactly_their_records(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    api = TenantApi()
    with serve_api(api, _Handler, "tenant-api") as server:
        monkeypatch.setenv("TENANT_API", server.base_url)
        for tenant in TENANTS:
            monkeypatch.setenv(f"TOKEN_{tenant.upper()}", f"tok-{tenant}")
            monkeypatch.setenv(f"ACCOUNT_{tenant.upper()}", tenant)
        monkeypatch.chdir(tmp_path)  # paths in the file are relative to the file, not here
        settings = load_settings(write_pipeline(tmp_path))
        rt = Runtime(settings)
        dispatcher = open_dispatcher(settings.dispatcher, settings)  # worker processes
        try:
            job_ids = JobRunner(settings, rt, dispatcher).run()
            reports = {r["tenant_id"]: r for r in (job_report(rt.state, j) for j in job_ids)}
        finally:
            dispatcher.close()
            rt.close()
    assert api.refused == []
    for tenant, (_, n) in TENANTS.items():
        rep = reports[tenant]
        assert (rep["status"], rep["outcome"]) == ("done", "completed"), rep
        assert rep["tables"][f"{tenant}/tenantcrm.contacts"]["records_extracted"] == n
    # every page once: page 1 only by planning (the first chunk was handed its body), and
    # no page after the last (has_more is false there, even when it is full)
    expected = {(t, p): 1 for t, (_, n) in TENANTS.items() for p in range(1, -(-n // PAGE) + 1)}
    assert dict(api.pages) == expected
    data = tmp_path / "project" / "data"
    assert (data / "canonical" / "contact").is_dir()
    _, rows = run_query(open_object_store(f"file://{data}"),
                        "SELECT _tenant_id, id, email FROM contact",
                        [str(tmp_path / "project" / "mappings")])
    for tenant, (_, n) in TENANTS.items():
        assert sorted((r[1], r[2]) for r in rows if r[0] == tenant) == sorted(
            (record(tenant, i)["id"], record(tenant, i)["email"]) for i in range(n))
    assert len(rows) == sum(n for _, n in TENANTS.values())


def test_a_process_serving_more_tenants_than_it_keeps_clients_for_closes_the_oldest(
        make_settings: Any) -> None:
    """A run of 10 tenants through one runtime (inline dispatcher) that keeps 4 clients:
    every tenant's job is done, and at most 4 clients (one connection each) stay open."""
    from canonflow.connectors.pool import ClientPool

    tenants = tuple(f"t{i:03d}" for i in range(10))
    settings = make_settings(tenants=tenants, tables={"crm": ["contacts"]})
    rt = Runtime(settings)
    made: list[Any] = []

    def make(key: tuple[str, str]) -> Any:
        made.append(rt._open_client(key))
        return made[-1]

    rt.clients = ClientPool(make, kept=4)
    dispatcher = open_dispatcher(settings.dispatcher, settings)
    try:
        jobs = JobRunner(settings, rt, dispatcher).run()
    finally:
        dispatcher.close()
    assert len(jobs) == len(tenants)
    assert all(job_report(rt.state, job)["status"] == "done" for job in jobs)
    open_now = {id(c) for c in rt.clients.open.values()}
    assert len(open_now) <= 4 and len(made) >= len(tenants)
    assert all(c._client.is_closed for c in made if id(c) not in open_now)
    rt.close()
    assert all(c._client.is_closed for c in made)
