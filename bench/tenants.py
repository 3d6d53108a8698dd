"""Many small tenants: ``tenants`` demo tenants x 7 tables x ``records`` records through the
whole pipeline (plan, chunks, aggregation, one transform per (job, table), canonical Delta).

``python -m bench.tenants CONFIG``: ``engine`` is ``local`` (SQLite state,
``local://?workers=2``) or ``celery`` (PostgreSQL state in a schema of its own, a Redis
broker, one ``canonflow worker --concurrency 2`` process started and stopped by PID; the
object store is a local folder in both). The demo API runs in its own process. Reports wall
seconds of the run, records/s, milliseconds per tenant job, the CPU seconds the runner, the
demo API and the workers used during the run, and the invariants it checked: transforms per
(job, table) and canonical rows against the records extracted.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import orjson
import sqlalchemy as sa

from bench.e2e import command_line, cpu_seconds, descendants
from bench.server import demo_api
from canonflow import memory
from canonflow.config import Settings, SourceConfig, TenantConfig
from canonflow.connectors.demo_api import tenant_token
from canonflow.dispatch import open_dispatcher
from canonflow.query import run_query
from canonflow.report import job_report
from canonflow.runner import JobRunner
from canonflow.runtime import Runtime

SERVICES = ("crm", "helpdesk", "billing")
POSTGRES = os.environ.get("CANONFLOW_BENCH_POSTGRES",
                          "postgresql://postgres@127.0.0.1:5432/test")
REDIS = os.environ.get("CANONFLOW_BENCH_REDIS", "redis://127.0.0.1:6379/0")
CLI = [sys.executable, "-c", "from canonflow.cli import main; main()"]


@contextmanager
def postgres_schema() -> Iterator[str]:
    """A state-store URL in a schema of its own, dropped afterwards."""
    engine = sa.create_engine(POSTGRES.replace("postgresql://", "postgresql+psycopg://", 1))
    schema = f"bench_{uuid.uuid4().hex[:10]}"
    with engine.begin() as conn:
        conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
    try:
        sep = "&" if "?" in POSTGRES else "?"
        yield f"{POSTGRES}{sep}options=-csearch_path%3D{schema}"
    finally:
        with engine.begin() as conn:
            conn.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))
        engine.dispose()


@contextmanager
def celery_worker(settings: Settings, root: Path) -> Iterator[None]:
    pipeline = root / "pipeline.json"  # JSON is YAML
    pipeline.write_text(settings.to_worker_json())
    proc = subprocess.Popen([*CLI, "worker", str(pipeline), "--concurrency", "2",
                             "--name", f"bench-{uuid.uuid4().hex[:6]}@127.0.0.1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        from canonflow.dispatch.celery import app, configure

        configure(settings)
        deadline = time.monotonic() + 60
        while not app.control.ping(timeout=0.5):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"worker did not start: {proc.stderr.read()[-2000:]}"
                                   if proc.stderr else "worker did not start")
        yield
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def settings_for(base_url: str, root: Path, tenants: int, state: str,
                 dispatcher: str) -> Settings:
    return Settings(
        name="many-tenants", object_store=f"file://{root}", state_store=state,
        dispatcher=dispatcher, celery_queue=f"bench-{uuid.uuid4().hex[:8]}",
        sources=[SourceConfig(service=svc, base_url=f"{base_url}/{svc}/v1")
                 for svc in SERVICES],
        tenants=[TenantConfig.model_validate({
            "tenant_id": f"t{i:05d}",
            "credentials": {svc: {"token": tenant_token(f"t{i:05d}")} for svc in SERVICES}})
            for i in range(tenants)])


def run(settings: Settings) -> dict[str, Any]:
    rt = Runtime(settings)
    rt.state.upgrade()
    dispatcher = open_dispatcher(settings.dispatcher, settings)
    before = cpu_by_role()
    started = time.perf_counter()
    try:
        jobs = JobRunner(settings, rt, dispatcher).run()
        seconds = time.perf_counter() - started
        cpu = {role: round(used - before.get(role, 0.0), 1)  # the workers are still alive
               for role, used in cpu_by_role().items()}
    finally:
        dispatcher.close()
    totals = {"tables": 0, "records_extracted": 0, "records_read": 0,
              "transforms_triggered": 0, "records_canonical": 0, "records_quarantined": 0}
    for job in jobs:
        for table in job_report(rt.state, job)["tables"].values():
            totals["tables"] += 1
            for name in list(totals)[1:]:
                totals[name] += table[name]
    # canonical rows against the distinct source records (the demo's bad records aside)
    _, ((contacts, distinct),) = run_query(
        rt.canonical._store, "SELECT count(*), count(DISTINCT (_tenant_id, id)) FROM contact")
    rt.close()
    return {"seconds": seconds, "jobs": len(jobs), **totals, "contact_rows": contacts,
            "distinct_contacts": distinct, "cpu_s": cpu}


def cpu_by_role() -> dict[str, float]:
    """CPU seconds used so far by this process (the runner), the demo API and the worker
    processes (every other descendant: the local pool, or the Celery worker and its pool)."""
    used = {"runner": cpu_seconds(os.getpid()), "api": 0.0, "workers": 0.0}
    for pid in descendants(os.getpid()):
        used["api" if "demo-api" in command_line(pid) else "workers"] += cpu_seconds(pid)
    return used


def main(cfg: dict[str, Any]) -> dict[str, Any]:
    memory.tune()
    root, tenants, records = Path(cfg["root"]), cfg["tenants"], cfg["records"]
    root.mkdir(parents=True, exist_ok=True)
    engine = cfg.get("engine", "local")
    with demo_api(records, [], 100) as base_url:
        if engine == "local":
            result = run(settings_for(base_url, root, tenants, f"sqlite:///{root}/state.db",
                                      "local://?workers=2"))
        else:
            with postgres_schema() as state:
                settings = settings_for(base_url, root, tenants, state, f"celery+{REDIS}")
                with celery_worker(settings, root):
                    result = run(settings)
    seconds = result["seconds"]
    return {"engine": engine, "tenants": tenants, "records_per_table": records, **result,
            "records_per_s": result["records_extracted"] / seconds,
            "ms_per_tenant": 1000 * seconds / tenants}


if __name__ == "__main__":
    print(orjson.dumps(main(orjson.loads(sys.argv[1]))).decode(), flush=True)
