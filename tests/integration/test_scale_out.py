"""Scale-out on real engines: Celery workers (Redis broker), PostgreSQL state, S3 objects.

The commands run here are the ones in the README's "Running on several machines" section,
read from the README itself.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from canonflow.config import load_settings
from canonflow.connectors.demo_api import DemoApi, serve, tenant_token
from canonflow.dispatch import open_dispatcher
from canonflow.query import run_query
from canonflow.report import job_report
from canonflow.runner import JobRunner
from canonflow.runtime import Runtime
from canonflow.stores import open_object_store

ROOT = Path(__file__).resolve().parents[2]
CLI = [sys.executable, "-c", "from canonflow.cli import main; main()"]
TABLES = {"crm": ["contacts", "deals"], "helpdesk": ["users"]}
ENTITIES = ["contact", "deal", "user"]


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Running on several machines", 1)[1].split("\n## ", 1)[0]
    block = re.findall(r"```sh\n(.*?)```", section, re.S)[0]
    return [line.strip() for line in block.splitlines() if line.strip().startswith("canonflow")]


def write_pipeline(path: Path, base_url: str, state: str, objects: str, redis: str,
                   tables: dict[str, list[str]], page_size: int, pages_per_chunk: int) -> Path:
    sources = "\n".join(
        f"  - {{service: {svc}, base_url: '{base_url}/{svc}/v1', tables: {tbls}, "
        f"page_size: {page_size}, pages_per_chunk: {pages_per_chunk}}}"
        for svc, tbls in tables.items())
    creds = ", ".join(f"{svc}: {{token: {tenant_token('acme')}}}" for svc in tables)
    path.write_text(f"""
name: scale-out
object_store: '{objects}'
state_store: '{state}'
dispatcher: 'celery+{redis}'
celery_queue: 'q-{uuid.uuid4().hex[:10]}'
celery_visibility_timeout: 60
batch_records: 250
sources:
{sources}
tenants:
  - {{tenant_id: acme, credentials: {{{creds}}}}}
""")
    return path


@contextmanager
def workers(pipeline: Path, command: str, count: int = 2) -> Iterator[list[subprocess.Popen[str]]]:
    """Start ``count`` workers with the README's worker command; stop them by PID."""
    args = shlex.split(command)[1:]
    procs = []
    for i in range(count):
        argv = [pipeline.as_posix() if a == "pipeline.yaml" else a for a in args]
        argv = [f"w{i}-{uuid.uuid4().hex[:6]}@127.0.0.1" if a.startswith("w1@") else a
                for a in argv]
        argv = [("1" if argv[j - 1] == "--concurrency" else a) for j, a in enumerate(argv)]
        procs.append(subprocess.Popen([*CLI, *argv], stdout=subprocess.DEVNULL,
                                      stderr=subprocess.PIPE, text=True))
    try:
        from canonflow.dispatch.celery import app, configure

        configure(load_settings(pipeline))
        deadline = time.monotonic() + 60
        while len(app.control.ping(timeout=0.5) or []) < count:
            for p in procs:
                assert p.poll() is None, f"worker exited: {p.stderr.read() if p.stderr else ''}"
            assert time.monotonic() < deadline, "workers did not come up"
        yield procs
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def canonical_rows(object_store: str, entity: str) -> list[tuple[Any, ...]]:
    _, rows = run_query(open_object_store(object_store),
                        f"SELECT * EXCLUDE (_source_file, _job_id, _request_id, _extracted_at) "
                        f"FROM {entity} "
                        "ORDER BY _tenant_id, _service_name, id")
    return rows


def test_readme_commands_run_a_job_on_celery_postgres_and_s3(
        tmp_path: Path, demo_server: Any, postgres_url: str, s3_url: str, redis_url: str,
        make_settings: Any) -> None:
    pipeline = write_pipeline(tmp_path / "pipeline.yaml", demo_server.base_url, postgres_url,
                              s3_url, redis_url, TABLES, page_size=100, pages_per_chunk=2)
    commands = readme_commands()
    assert [c.split()[1] for c in commands] == ["db", "worker", "run", "recover"]

    def run(command: str) -> subprocess.CompletedProcess[str]:
        argv = [pipeline.as_posix() if a == "pipeline.yaml" else a
                for a in shlex.split(command)[1:]]
        return subprocess.run([*CLI, *argv, *(["--json"] if argv[0] == "run" else [])],
                              capture_output=True, text=True, timeout=300)

    upgrade = run(commands[0])
    assert upgrade.returncode == 0, upgrade.stderr
    with workers(pipeline, commands[1]):
        proc = run(commands[2])
        assert proc.returncode == 0, proc.stderr
        import json

        (job,) = json.loads(proc.stdout)["jobs"]
        assert job["status"] == "done" and job["outcome"] == "completed"
        assert all(t["transforms_triggered"] == 1 for t in job["tables"].values())
        sweep = run(commands[3])
        assert sweep.returncode == 0, sweep.stderr
    # the same input on the embedded default gives the same canonical tables
    local = make_settings(tables=TABLES)
    rt = Runtime(local)
    JobRunner(local, rt, open_dispatcher("inline://", local)).run()
    for entity in ENTITIES:
        remote_rows = canonical_rows(s3_url, entity)
        assert remote_rows == canonical_rows(local.object_store, entity)
        assert len(remote_rows) > 0


def test_a_worker_killed_mid_chunk_loses_nothing(
        tmp_path: Path, postgres_url: str, s3_url: str, redis_url: str) -> None:
    tables = {"crm": ["companies"]}
    with serve(DemoApi(1200, page_delay=0.3)) as slow:  # 10 pages per chunk: ~3 s a chunk
        pipeline = write_pipeline(tmp_path / "pipeline.yaml", slow.base_url, postgres_url,
                                  s3_url, redis_url, tables, page_size=40, pages_per_chunk=10)
        settings = load_settings(pipeline)
        with workers(pipeline, readme_commands()[1]):
            from canonflow.dispatch.celery import app

            rt = Runtime(settings)
            runner = JobRunner(settings, rt, open_dispatcher(settings.dispatcher, settings))
            import threading

            job_ids: list[str] = []
            thread = threading.Thread(target=lambda: job_ids.extend(runner.run()))
            thread.start()
            killed: dict[str, Any] = {}
            deadline = time.monotonic() + 60
            while not killed and time.monotonic() < deadline:
                for tasks in (app.control.inspect(timeout=0.5).active() or {}).values():
                    for task in tasks:
                        if task["name"] == "canonflow.chunk":
                            killed = task
                            os.kill(task["worker_pid"], signal.SIGKILL)
                            break
                    if killed:
                        break
            assert killed, "no chunk task seen running"
            thread.join(timeout=120)
            assert not thread.is_alive()
    (job_id,) = job_ids
    report = job_report(rt.state, job_id)
    assert report["status"] == "done" and report["outcome"] == "completed"
    killed_chunk = re.search(r'"chunk_id":"([^"]+)"', killed["args"][0]
                             if isinstance(killed["args"], list) else killed["args"])
    assert killed_chunk is not None
    results = {r.chunk_id: r for r in rt.state.chunk_results(job_id)}
    assert results[killed_chunk.group(1)].completed  # redelivered and finished
    assert report["tables"]["acme/crm.companies"]["records_extracted"] == 1200
    rows = canonical_rows(s3_url, "company")
    assert len(rows) == len({r[0] for r in rows}) == 1200
