"""Runs that are killed: SIGKILL (or Ctrl-C) of `canonflow run` at moments across the run leaves
jobs that `status` shows as orphaned and that the next `canonflow run` of the same pipeline
resumes, running only their missing chunks; the data ends exact, without a by-hand re-sync."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from canonflow.connectors.demo_api import DemoServer, expected_bad
from canonflow.query import run_query
from canonflow.stores import open_object_store

# the session's demo API: 5,000 contacts, 1,200 of everything else
SIZES = {("crm", "contacts"): 5000, ("crm", "companies"): 1200, ("helpdesk", "users"): 1200}
ENTITIES = {("crm", "contacts"): "contact", ("crm", "companies"): "company",
            ("helpdesk", "users"): "user"}


def cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", "from canonflow.cli import main; main()",
                           *args], capture_output=True, text=True, timeout=timeout)


def write_pipeline(path: Path, base_url: str) -> Path:
    path.write_text(f"""
name: killed
object_store: file://./data
state_store: sqlite:///./data/state.db
dispatcher: local://?workers=2
batch_records: 200
sources:
  - service: crm
    base_url: {base_url}/crm/v1
    tables: [contacts, companies]
    page_size: 100
    pages_per_chunk: 1
  - service: helpdesk
    base_url: {base_url}/helpdesk/v1
    tables: [users]
    page_size: 100
    pages_per_chunk: 1
tenants:
  - tenant_id: acme
    credentials: {{crm: {{token: tok-acme}}, helpdesk: {{token: tok-acme}}}}
  - tenant_id: globex
    credentials: {{crm: {{token: tok-globex}}, helpdesk: {{token: tok-globex}}}}
""")
    return path


def assert_exact(data: Path) -> None:
    """One canonical row per good source record, per tenant, and nothing else."""
    store = open_object_store(f"file://{data}")
    for (service, table), entity in ENTITIES.items():
        good = SIZES[(service, table)] - expected_bad((service, table), SIZES[(service, table)])
        _, rows = run_query(store, f"SELECT _tenant_id, count(*), count(DISTINCT id) "
                                   f"FROM {entity} GROUP BY 1 ORDER BY 1")
        assert rows == [("acme", good, good), ("globex", good, good)], (entity, rows)


def wait_for_a_job(db: Path, proc: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        if _count(db, "SELECT count(*) FROM jobs"):
            return
        time.sleep(0.05)


def _count(db: Path, sql: str) -> int:
    if not db.exists():
        return 0
    with contextlib.suppress(sqlite3.Error), sqlite3.connect(db, timeout=1) as conn:
        return int(conn.execute(sql).fetchone()[0])
    return 0


# The moment of each trial, counted in the run's progress (in seconds it would land after
# the run on a fast machine, where the whole run takes well under a second): a share of the
# chunks recorded, or the first transform running.
MOMENTS = [(signal.SIGKILL, "chunks", 0.1), (signal.SIGKILL, "chunks", 0.6),
           (signal.SIGKILL, "transforms", 0.0), (signal.SIGINT, "chunks", 0.35),
           (signal.SIGINT, "transforms", 0.0)]


def wait_for(moment: tuple[str, float], db: Path, proc: subprocess.Popen[str]) -> None:
    phase, share = moment
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        if phase == "chunks":
            total = _count(db, "SELECT count(*) FROM chunks")
            if total and _count(db, "SELECT count(*) FROM chunk_results") >= share * total:
                return
        elif _count(db, "SELECT count(*) FROM outbox WHERE status IN ('running', 'done')"):
            return
        time.sleep(0.005)


@pytest.mark.parametrize("trial", range(len(MOMENTS)))
def test_a_killed_run_is_resumed_by_the_next_run_and_the_data_is_exact(
        tmp_path: Path, demo_server: DemoServer, trial: int) -> None:
    pipeline = write_pipeline(tmp_path / "pipeline.yaml", demo_server.base_url)
    from canonflow.connectors.demo_api import tenant_token
    text = pipeline.read_text()
    for tenant in ("acme", "globex"):
        text = text.replace(f"tok-{tenant}", tenant_token(tenant))
    pipeline.write_text(text)
    how, *moment = MOMENTS[trial]
    proc = subprocess.Popen(
        [sys.executable, "-c", "from canonflow.cli import main; main()", "run",
         str(pipeline), "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for((moment[0], moment[1]), tmp_path / "data" / "state.db", proc)
    assert proc.poll() is None, "the run ended before its moment came"
    os.kill(proc.pid, how)
    proc.wait(timeout=120)
    _, err = proc.communicate(timeout=60)  # its workers exit soon after it
    data = tmp_path / "data"

    status = json.loads(cli("status", "--data-dir", str(data), "--json").stdout)
    unfinished = [j for j in status["jobs"] if j["status"] not in ("done", "failed")]
    if how == signal.SIGINT:
        assert proc.returncode == 130, (proc.returncode, err)
        assert "can be resumed" in err
    for job in unfinished:  # the killed runner is known dead at once on this host
        assert job["runner"] == "lost", job

    again = cli("run", str(pipeline), "--json")
    assert again.returncode == 0, again.stderr
    doc = json.loads(again.stdout)
    assert sorted(doc["resumed"]) == sorted(j["job_id"] for j in unfinished)
    resumed_ids = {j["job_id"] for j in unfinished}
    for job in doc["jobs"]:
        assert (job["status"], job["outcome"]) == ("done", "completed"), job
        assert all(t["transforms_triggered"] == 1 for t in job["tables"].values())
        if job["job_id"] in resumed_ids:  # the same job, finished: no second job
            assert job["chunks"]["completed"] == job["chunks"]["total"]
    assert_exact(data)
    final = json.loads(cli("status", "--data-dir", str(data), "--json").stdout)
    assert all(j["status"] == "done" for j in final["jobs"])
