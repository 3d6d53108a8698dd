"""Costs that must not grow with syncs: a tenant's partition stays few-filed (compaction after
a transform), old files go after a retention (vacuum) while time travel within it and every
reader of the current version keep working, and other tenants are never touched."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import orjson
import pytest
from deltalake import DeltaTable

from canonflow.chunk import encode_batch
from canonflow.config import Settings
from canonflow.connectors.demo_api import contact
from canonflow.model import TableRef, TransformRequest, raw_key
from canonflow.query import run_query
from canonflow.runtime import Runtime
from canonflow.transform.run import run_transform
from canonflow.transform.versions import CanonicalWrites

ENTITY = "canonical/contact"


def sync(rt: Runtime, tenant: str, job: str, records: list[dict[str, Any]]) -> None:
    table = TableRef(tenant_id=tenant, service_name="crm", table_name="contacts")
    key = raw_key(table, job, "crm-contacts-00000", 0)
    rt.objects.put(key, encode_batch([orjson.dumps(r) for r in records]))
    run_transform(TransformRequest(tenant_id=tenant, service_name="crm",
                                   table_name="contacts", source_files=[key]), rt)


def changed(tenant: str, i: int, n: int) -> dict[str, Any]:
    record = contact(tenant, i)
    record["properties"]["phone"] = f"+1-555-{n:04d}"
    record["updated_at"] = f"2030-01-01T00:{n // 60:02d}:{n % 60:02d}Z"
    return record


def table(rt: Runtime) -> DeltaTable:
    uri, opts = rt.canonical.uri(ENTITY)
    return DeltaTable(uri, storage_options=opts or None)


def partition_files(rt: Runtime, tenant: str) -> list[str]:
    return table(rt).file_uris(file_pruning_predicate=[("_tenant_id", "=", tenant)])


@pytest.mark.parametrize("writes", ["copy_on_write", "merge_on_read"])
def test_partitions_stay_few_filed_and_vacuum_keeps_time_travel(
        tmp_path: Path, writes: CanonicalWrites) -> None:
    rt = Runtime(Settings(object_store=f"file://{tmp_path / 'data'}",
                          state_store=f"sqlite:///{tmp_path / 'data' / 'state.db'}",
                          compact_after_files=4, canonical_writes=writes))
    sync(rt, "acme", "job-0", [contact("acme", i) for i in range(2000)])
    sync(rt, "globex", "job-0", [contact("globex", i) for i in range(500)])
    globex_files = partition_files(rt, "globex")
    most = 0
    for n in range(1, 25):  # 1% changed and 10 new keys each sync
        records = [changed("acme", i, n) for i in range(n % 100, 2000, 100)]
        records += [contact("acme", 2000 + 10 * n + j) for j in range(10)]
        sync(rt, "acme", f"job-{n}", records)
        most = max(most, len(partition_files(rt, "acme")))
    assert most <= 5, f"the partition grew to {most} files"
    assert partition_files(rt, "globex") == globex_files  # never rewritten for acme
    store = rt.canonical._store
    rows = run_query(store, "SELECT count(*), count(DISTINCT id) FROM contact "
                            "WHERE _tenant_id = 'acme'")[1]
    assert rows == [(2240, 2240)]
    changes = run_query(store, "SELECT count(*), count(*) FILTER (WHERE phone = '+1-555-' || "
                               "lpad(((id::INT - 100000) % 100)::VARCHAR, 4, '0')) FROM contact "
                               "WHERE _tenant_id = 'acme' AND updated_at >= '2030-01-01'")[1]
    assert changes == [(480, 480)]  # every change landed, newest wins

    old_version = table(rt).version() - 10
    before = DeltaTable(table(rt).table_uri, version=old_version).to_pyarrow_table().num_rows
    assert rt.canonical.vacuum(ENTITY, retention_hours=1) == 0  # all within the retention
    assert DeltaTable(table(rt).table_uri, version=old_version).to_pyarrow_table().num_rows \
        == before
    def data_files() -> list[str]:
        return sorted(str(p) for p in (tmp_path / "data" / "canonical" / "contact").glob(
            "_tenant_id=*/*.parquet"))

    live = table(rt).file_uris()
    unread = len(data_files()) - len(live)
    assert unread > 0
    assert rt.canonical.vacuum(ENTITY, retention_hours=0) == unread
    assert data_files() == sorted(live)
    assert run_query(store, "SELECT count(*) FROM contact WHERE _tenant_id = 'acme'")[1] \
        == [(2240,)]
    log = tmp_path / "data" / "canonical" / "contact" / "_delta_log"
    assert list(log.glob("*.checkpoint.parquet"))
    assert len(list(log.glob("*.json"))) <= 3  # entries before the checkpoint are gone
    assert run_query(store, "SELECT count(*) FROM contact")[1] == [(2740,)]
    rt.close()


def test_maintain_compacts_vacuums_and_reports(tmp_path: Path) -> None:
    data = tmp_path / "data"
    rt = Runtime(Settings(object_store=f"file://{data}", state_store=f"sqlite:///{data}/state.db",
                          compact_after_files=0))  # no compaction after transforms
    for n in range(18):  # more files than compact_after_files' default (8)
        sync(rt, "acme", f"job-{n}", [contact("acme", 100 * n + i) for i in range(100)])
    assert len(partition_files(rt, "acme")) == 18
    rt.close()
    proc = subprocess.run([sys.executable, "-c", "from canonflow.cli import main; main()",
                           "maintain", "--data-dir", str(data), "--json"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    report = {r["table"]: r for r in json.loads(proc.stdout)}
    assert report[ENTITY]["files_compacted"] == 18
    assert report[ENTITY]["files_deleted"] == 0  # replaced files stay for the retention
    rt = Runtime(Settings(object_store=f"file://{data}", state_store=f"sqlite:///{data}/state.db"))
    assert len(partition_files(rt, "acme")) == 1
    assert run_query(rt.canonical._store, "SELECT count(DISTINCT id) FROM contact")[1] == [
        (1800,)]
    rt.close()


def test_a_first_load_skips_the_compaction_look_and_later_syncs_take_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Counting a partition's files lists every file of the table (all tenants'); a tenant's
    first load, written in one upsert, leaves its partition one file: nothing to count."""
    rt = Runtime(Settings(object_store=f"file://{tmp_path / 'data'}",
                          state_store=f"sqlite:///{tmp_path / 'data' / 'state.db'}",
                          compact_after_files=1))
    looked: list[tuple[str, str]] = []
    compact = rt.canonical.compact

    def counting(name: str, tenant_id: str, max_files: int) -> int:
        looked.append((name, tenant_id))
        return compact(name, tenant_id, max_files)

    monkeypatch.setattr(rt.canonical, "compact", counting)
    sync(rt, "acme", "job-0", [contact("acme", i) for i in range(200)])
    sync(rt, "globex", "job-0", [contact("globex", i) for i in range(50)])
    assert looked == []
    assert len(partition_files(rt, "acme")) == 1
    sync(rt, "acme", "job-1", [changed("acme", i, 1) for i in range(0, 200, 20)]
         + [contact("acme", 500)])
    assert looked == [(ENTITY, "acme")]
    assert len(partition_files(rt, "acme")) == 1  # 2 files, more than 1: compacted
    assert run_query(rt.canonical._store, "SELECT count(*) FROM contact "
                     "WHERE _tenant_id = 'acme'")[1] == [(201,)]
    rt.close()


def test_maintain_deletes_the_first_pages_planning_kept_for_ended_jobs(
        make_settings: Any, tmp_path: Path) -> None:
    """Planning keeps page 1 of each table for its chunk (plan/); a job that ended needs it
    no more: maintain deletes those (and their folders), keeps a running job's until the
    retention, and reports them."""
    from canonflow.model import ChunkSpec, first_page_key
    from canonflow.plan import forget_pages
    from tests.jobs import run_job

    settings = make_settings(tables={"crm": ["contacts", "companies"]})
    rt, job = run_job(settings)
    kept = [o.key for o in rt.objects.list("plan/")]
    assert kept and all(f"/{job}/" in key for key in kept)
    running = TableRef(tenant_id="acme", service_name="crm", table_name="contacts")
    rt.state.create_job("job-running", "acme", "test", "aggregated", [ChunkSpec(
        job_id="job-running", chunk_id="crm-contacts-00000", table=running, start_page=1,
        end_page=None, page_size=100, batch_records=500, first_page_stored=True)])
    page = first_page_key(running, "job-running", "crm-contacts-00000")
    rt.objects.put(page, b'{"results": []}')
    # a job being planned: its pages are stored before the state store knows it
    planning = first_page_key(running, "job-planning", "crm-contacts-00000")
    rt.objects.put(planning, b'{"results": []}')
    # one the state store never came to know (its planning failed), written long ago
    failed = first_page_key(running, "job-failed-plan", "crm-contacts-00000")
    rt.objects.put(failed, b'{"results": []}')
    hours_ago = time.time() - 2 * 3600
    os.utime(tmp_path / "data" / failed, (hours_ago, hours_ago))
    rt.close()
    proc = subprocess.run([sys.executable, "-c", "from canonflow.cli import main; main()",
                           "maintain", "--data-dir", str(tmp_path / "data"), "--json"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    report = {r["table"]: r for r in json.loads(proc.stdout)}
    assert report["plan/"]["files_deleted"] == len(kept) + 1
    rt = Runtime(settings)
    # the running job's stays, and the one being planned
    assert sorted(o.key for o in rt.objects.list("plan/")) == sorted([page, planning])
    assert not (tmp_path / "data" / "plan" / "acme" / "crm" / "contacts" / job).exists()
    assert forget_pages(rt, retention_hours=0) == 2  # past the retention: any job's
    assert list(rt.objects.list("plan/")) == []
    rt.close()
