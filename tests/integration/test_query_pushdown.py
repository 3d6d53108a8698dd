"""Queries read what they filter for: a query for one tenant opens that tenant's files only,
also after merges wrote ``string_view`` files (the comparison that once failed in pyarrow
and made the query layer turn pushdown off), and quarantine listings are bounded the same
way."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from deltalake import DeltaTable

from canonflow.dispatch import open_dispatcher
from canonflow.query import Scan, run_query
from canonflow.runner import JobRunner
from canonflow.runtime import Runtime
from canonflow.transform.quarantine import quarantined, summary
from tests.conftest import SettingsFactory

TENANTS = ("acme", "globex", "initech")


def sync(settings: Any) -> None:
    rt = Runtime(settings)
    dispatcher = open_dispatcher(settings.dispatcher, settings)
    try:
        JobRunner(settings, rt, dispatcher, full_refresh=True).run()
    finally:
        dispatcher.close()
        rt.close()


def files_of(rt: Runtime, table: str, tenant: str | None = None) -> list[str]:
    uri, opts = rt.canonical.uri(table)
    return [u for u in DeltaTable(uri, storage_options=opts or None).file_uris()
            if tenant is None or f"_tenant_id={tenant}/" in u]


def test_one_tenants_query_opens_only_its_files_after_merges_wrote_string_views(
        make_settings: SettingsFactory) -> None:
    settings = make_settings(tenants=TENANTS, tables={"crm": ["contacts", "deals"]})
    sync(settings)
    sync(settings)  # the second sync merges into every tenant's rows
    rt = Runtime(settings)
    store = rt.canonical._store
    files = files_of(rt, "canonical/contact")
    kinds = {pq.read_schema(f).field("email").type for f in files}
    assert pa.string_view() in kinds, "the merge wrote string_view files (the case that broke)"
    (some_id,) = run_query(store, "SELECT min(id) FROM contact WHERE _tenant_id = 'acme'")[1][0]

    scan = Scan()
    _, rows = run_query(store, "SELECT count(*), min(email) FROM contact "
                               f"WHERE _tenant_id = 'acme' AND id >= '{some_id}' "
                               "AND email LIKE '%@acme.example'", scan=scan)
    assert rows[0][0] == 5000
    acme = files_of(rt, "canonical/contact", "acme")
    assert {p.rsplit("/", 2)[-2] for p in scan.opened} == {"_tenant_id=acme"}
    assert scan.files_read == len(acme) < len(files)
    assert scan.total == len(files)  # the files of the tables the query names, no others

    scan = Scan()  # a string equality on a merged column, across tenants
    _, rows = run_query(store, f"SELECT _tenant_id FROM contact WHERE id = '{some_id}' "
                               "ORDER BY 1", scan=scan)
    assert [r[0] for r in rows] == sorted(TENANTS)

    scan = Scan()  # statistics rule every file out: none is opened
    _, rows = run_query(store, "SELECT count(*) FROM contact WHERE id = 'no-such-id'",
                        scan=scan)
    assert rows == [(0,)] and scan.files_read == 0

    scan = Scan()
    groups = summary(rt, tenant="globex", scan=scan)
    assert groups and {g["_tenant_id"] for g in groups} == {"globex"}
    assert {p.rsplit("/", 2)[-2] for p in scan.opened} == {"_tenant_id=globex"}
    listed = quarantined(rt, tenant="globex", columns=["_tenant_id", "reason"], limit=1)
    assert listed.num_rows == 1 < sum(g["records"] for g in groups)
    assert listed.column("_tenant_id").to_pylist() == ["globex"]
    rt.close()


def test_query_scanned_prints_the_files_read_of_the_tables_it_names(
        make_settings: SettingsFactory, tmp_path: Path) -> None:
    settings = make_settings(tenants=TENANTS, tables={"crm": ["contacts", "deals"]})
    sync(settings)
    rt = Runtime(settings)
    contact, deal = files_of(rt, "canonical/contact"), files_of(rt, "canonical/deal")
    acme = files_of(rt, "canonical/contact", "acme")
    rt.close()
    pipeline = tmp_path / "pipeline.json"  # JSON is YAML
    pipeline.write_text(settings.to_worker_json())
    cli = [sys.executable, "-c", "from canonflow.cli import main; main()", "query",
           "--pipeline", str(pipeline), "--scanned"]
    one = subprocess.run([*cli, "SELECT count(*) FROM contact WHERE _tenant_id = 'acme'"],
                         capture_output=True, text=True, timeout=120)
    assert one.returncode == 0, one.stderr
    assert one.stderr.strip() == f"read {len(acme)} of {len(contact)} data files"
    both = subprocess.run([*cli, "SELECT count(*) FROM contact c JOIN deal d "
                                 "ON c._tenant_id = d._tenant_id AND c.id = d.id"],
                          capture_output=True, text=True, timeout=120)
    assert both.returncode == 0, both.stderr
    total = len(contact) + len(deal)
    assert both.stderr.strip() == f"read {total} of {total} data files"
