"""`canonflow run` never waits forever, and pipelines sharing a broker keep to their own
queues."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from canonflow.config import Settings
from canonflow.connectors.demo_api import DemoServer, tenant_token

REDIS = "redis://127.0.0.1:6379/0"


def cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", "from canonflow.cli import main; main()",
                           *args], capture_output=True, text=True, timeout=timeout)


def test_a_run_with_no_worker_stops_at_its_wait_limit_with_exit_code_3(
        tmp_path: Path, demo_server: DemoServer) -> None:
    import redis

    try:
        redis.Redis.from_url(REDIS, socket_timeout=2).ping()
    except redis.RedisError as exc:
        from tests.conftest import service_missing
        service_missing("Redis", exc)
    pipeline = tmp_path / "pipeline.yaml"
    pipeline.write_text(f"""
name: nobody-listens-{tmp_path.name[-12:]}
object_store: file://./data
state_store: sqlite:///./data/state.db
dispatcher: celery+{REDIS}
sources:
  - {{service: helpdesk, base_url: '{demo_server.base_url}/helpdesk/v1', tables: [users]}}
tenants:
  - {{tenant_id: acme, credentials: {{helpdesk: {{token: {tenant_token('acme')}}}}}}}
""")
    started = time.monotonic()
    proc = cli("run", str(pipeline), "--wait-limit", "3")
    assert proc.returncode == 3, proc.stderr
    assert time.monotonic() - started < 60
    (line,) = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert "stopped waiting after" in line and "unfinished jobs: job-" in line
    status = json.loads(cli("status", "--data-dir", str(tmp_path / "data"), "--json").stdout)
    (job,) = status["jobs"]
    assert job["job_id"] in line and job["status"] == "running"
    assert job["runner"] == "lost"  # the run ended: the job is resumable, and says so
    cancel = cli("cancel", job["job_id"], "--data-dir", str(tmp_path / "data"))
    assert cancel.returncode == 0 and "cancelled" in cancel.stdout


def test_each_pipeline_has_its_own_default_queue() -> None:
    a, b = Settings(name="crm-sync"), Settings(name="billing-sync")
    assert (a.queue, b.queue) == ("canonflow.crm-sync", "canonflow.billing-sync")
    assert Settings(name="x", celery_queue="shared").queue == "shared"


def test_a_worker_refuses_a_task_of_another_pipeline() -> None:
    pytest.importorskip("celery")
    from celery.exceptions import Reject

    from canonflow.dispatch import celery as celery_dispatch

    celery_dispatch.configure(Settings(name="mine", dispatcher=f"celery+{REDIS}"))
    with pytest.raises(Reject):
        celery_dispatch.chunk_task.run("{}", pipeline="theirs")
    with pytest.raises(Reject):
        celery_dispatch.transform_task.run("{}", pipeline="theirs")
