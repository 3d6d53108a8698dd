"""State-store upgrades: a store created by release 0.1.0 (revision 0001), with jobs, outbox
rows, ledger entries and cursors in it, is upgraded by ``canonflow db upgrade`` and keeps
them, and a sync runs on it; a store from before migrations is adopted; several processes
opening a new store at once create it once."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory

from canonflow.model import TableRef
from canonflow.report import job_report
from canonflow.stores import migrations, open_state_store
from canonflow.stores.sql import metadata
from tests.conftest import SettingsFactory
from tests.jobs import run_job
from tests.processes import run_together

T = TableRef(tenant_id="acme", service_name="crm", table_name="contacts")


@pytest.fixture(params=["sqlite", "postgres"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "postgres":
        yield request.getfixturevalue("postgres_url")
    else:
        yield f"sqlite:///{tmp_path / 'state.db'}"


def engine(url: str) -> sa.Engine:
    return sa.create_engine(url.replace("postgresql://", "postgresql+psycopg://", 1))


def revision(url: str) -> str | None:
    eng = engine(url)
    with eng.connect() as conn:
        rev = migrations.current(conn)
    eng.dispose()
    return rev


def test_head_is_the_newest_revision() -> None:
    script = ScriptDirectory(str(Path(migrations.__file__).parent))
    assert script.get_current_head() == migrations.HEAD


SCHEMAS = Path(__file__).parent.parent / "schemas"


def release_0_1_0_schema(conn: sa.Connection) -> None:
    """The tables and indexes release 0.1.0 created, from the DDL it issued (kept beside
    the tests, independent of the migrations under test)."""
    ddl = (SCHEMAS / f"state_0_1_0_{conn.dialect.name}.sql").read_text()
    for statement in ddl.split(";"):
        code = "\n".join(line for line in statement.splitlines()
                         if not line.startswith("--")).strip()
        if code:
            conn.execute(sa.text(code))


def release_0_1_0_store(url: str) -> None:
    """A store as release 0.1.0 left it: its schema (no migration history), a finished job
    with an outbox row and a ledger entry, an unfinished job, a cursor."""
    eng = engine(url)
    now = time.time()
    with eng.begin() as conn:
        release_0_1_0_schema(conn)
        for job_id, status in (("job-old-done", "done"), ("job-old-open", "running")):
            conn.execute(sa.text(
                "INSERT INTO jobs (job_id, tenant_id, pipeline, trigger_mode, status, "
                "outcome, total_chunks, completed_chunks, failed_chunks, created_at, "
                "updated_at, report) VALUES (:j, 'acme', 'test', 'aggregated', :s, NULL, 1, "
                "0, 0, :t, :t, '{}')"), {"j": job_id, "s": status, "t": now})
        payload = json.dumps({"tenant_id": "acme", "service_name": "crm",
                              "table_name": "contacts", "job_id": "job-old-done",
                              "request_id": "job-old-done:crm:contacts",
                              "trigger": "aggregated", "source_files": ["raw/acme/x"]})
        conn.execute(sa.text(
            "INSERT INTO outbox (request_id, job_id, trigger, payload, status, attempts, "
            "created_at, updated_at) VALUES ('job-old-done:crm:contacts', 'job-old-done', "
            "'aggregated', :p, 'done', 1, :t, :t)"), {"p": payload, "t": now})
        conn.execute(sa.text(
            "INSERT INTO ledger VALUES ('acme', 'crm', 'contacts', 'raw/acme/x', "
            "'job-old-done:crm:contacts', :t)"), {"t": now})
        conn.execute(sa.text(
            "INSERT INTO sync_cursors VALUES ('acme', 'crm', 'contacts', "
            "'2026-01-02T03:04:05Z', 'job-old-done', :t)"), {"t": now})
    eng.dispose()


def test_a_release_0_1_0_store_is_upgraded_with_its_data_and_syncs(
        url: str, make_settings: SettingsFactory, tmp_path: Path) -> None:
    release_0_1_0_store(url)
    assert revision(url) is None  # 0.1.0 kept no migration history
    pipeline = tmp_path / "pipeline.yaml"
    pipeline.write_text(json.dumps({
        "name": "test", "object_store": f"file://{tmp_path / 'data'}", "state_store": url,
        "sources": [{"service": "crm", "base_url": "http://127.0.0.1:9/crm/v1"}],
        "tenants": [{"tenant_id": "acme", "credentials": {"crm": {"token": "t"}}}]}))
    proc = subprocess.run([sys.executable, "-c", "from canonflow.cli import main; main()",
                           "db", "upgrade", "--pipeline", str(pipeline)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert revision(url) == migrations.HEAD

    state = open_state_store(url)
    old = state.job("job-old-done")
    assert old is not None and old.status == "done"
    (rec,) = state.requests("job-old-done")
    assert rec.status == "done" and rec.request.source_files == ["raw/acme/x"]
    assert state.processed_files(rec.request, ["raw/acme/x", "raw/acme/y"]) == {"raw/acme/x"}
    assert state.sync_cursors([T]).get(T) == "2026-01-02T03:04:05Z"
    assert [j.job_id for j in state.unfinished_jobs()] == ["job-old-open"]
    eng = engine(url)
    with eng.connect() as conn:  # the migrated database is what the code declares
        assert compare_metadata(MigrationContext.configure(conn), metadata) == []
    eng.dispose()

    rt, job_id = run_job(make_settings(state_store=url, tables={"crm": ["companies"]}))
    report = job_report(rt.state, job_id)
    assert report["status"] == "done" and report["outcome"] == "completed"
    assert {j.job_id for j in rt.state.jobs(limit=10)} >= {job_id, "job-old-done"}
    rt.close()
    state.close()


def test_a_store_from_before_migrations_is_adopted(url: str) -> None:
    eng = engine(url)
    with eng.begin() as conn:  # an early store: no runner/holder columns, fewer tables
        conn.execute(sa.text(
            "CREATE TABLE jobs (job_id VARCHAR(128) NOT NULL PRIMARY KEY, tenant_id VARCHAR(128) "
            "NOT NULL, pipeline VARCHAR(200) NOT NULL, trigger_mode VARCHAR(20) NOT NULL, "
            "status VARCHAR(24) NOT NULL, outcome VARCHAR(24), total_chunks INTEGER NOT NULL, "
            "completed_chunks INTEGER NOT NULL, failed_chunks INTEGER NOT NULL, "
            "created_at FLOAT NOT NULL, updated_at FLOAT NOT NULL, report TEXT)"))
        conn.execute(sa.text(
            "INSERT INTO jobs VALUES ('job-early', 'acme', 'p', 'aggregated', 'done', "
            "'completed', 1, 1, 0, 1.0, 1.0, '{}')"))
    eng.dispose()
    state = open_state_store(url)
    assert revision(url) == migrations.HEAD
    job = state.job("job-early")
    assert job is not None and job.outcome == "completed" and job.runner is None
    eng = engine(url)
    with eng.connect() as conn:
        assert compare_metadata(MigrationContext.configure(conn), metadata) == []
    eng.dispose()
    state.close()


def open_at_once(url: str, barrier: Any) -> None:
    barrier.wait()
    open_state_store(url).close()


def test_processes_opening_a_new_store_at_once_create_it_once(url: str) -> None:
    run_together(open_at_once, [(url,)] * 4)
    assert revision(url) == migrations.HEAD


def test_a_request_waiting_in_a_revision_0002_store_runs_after_the_upgrade(url: str) -> None:
    """Outbox rows written before revision 0003 have no target: after the upgrade they are
    still sent and claimed one by one, and a group commit never takes them."""
    eng = engine(url)
    now = time.time()
    with eng.begin() as conn:
        migrations.upgrade(conn, "0002")
        conn.execute(sa.text(
            "INSERT INTO jobs (job_id, tenant_id, pipeline, trigger_mode, status, outcome, "
            "total_chunks, completed_chunks, failed_chunks, created_at, updated_at, report) "
            "VALUES ('job-0002', 'acme', 'test', 'aggregated', 'transforms_enqueued', "
            "'completed', 1, 1, 0, :t, :t, '{}')"), {"t": now})
        for table in ("contacts", "companies"):
            payload = json.dumps({"tenant_id": "acme", "service_name": "crm",
                                  "table_name": table, "job_id": "job-0002",
                                  "request_id": f"job-0002:crm:{table}",
                                  "trigger": "aggregated", "source_files": ["raw/acme/x"]})
            conn.execute(sa.text(
                "INSERT INTO outbox (request_id, job_id, trigger, payload, status, attempts, "
                "created_at, updated_at) VALUES (:r, 'job-0002', 'aggregated', :p, "
                "'pending', 0, :t, :t)"), {"r": f"job-0002:crm:{table}", "p": payload,
                                            "t": now})
    eng.dispose()
    assert revision(url) == "0002"
    state = open_state_store(url)  # first use upgrades
    assert revision(url) == migrations.HEAD
    sent = state.claim_for_dispatch(job_ids=["job-0002"])
    assert sorted(r.request_id for r in sent) == ["job-0002:crm:companies",
                                                  "job-0002:crm:contacts"]
    contacts = next(r for r in sent if r.table_name == "contacts")
    assert state.claim_request(contacts.request_id, 60.0, holder="w1") == 1
    assert state.claim_group(contacts, 15, 60.0, "w1", 3, "test") == []  # no target
    assert state.claim_request("job-0002:crm:companies", 60.0, holder="w2") == 1
    state.close()
