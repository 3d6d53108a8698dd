"""Logs from every process a run starts: structured, with the work's context on every line,
at the level and in the format the command line asks for."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from canonflow.connectors.demo_api import DemoApi, DemoFaults, serve, tenant_token


def cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", "from canonflow.cli import main; main()",
                           *args], capture_output=True, text=True, timeout=timeout)


def json_lines(stderr: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]


def test_worker_processes_log_the_transform_mode_and_file_count_with_context(
        tmp_path: Path) -> None:
    proc = cli("demo", "--records", "300", "--tenants", "1", "--data-dir",
               str(tmp_path / "data"), "--json", "--log-level", "info", "--log-format", "json")
    assert proc.returncode == 0, proc.stderr
    lines = json_lines(proc.stderr)
    (planned,) = [d for d in lines if d["event"] == "job planned"]
    starts = [d for d in lines if d["event"] == "canonical transform starting"]
    assert len(starts) == 7  # one per table, from the local pool's workers
    for d in starts:
        assert d["processing_mode"] == "file_specific" and d["source_files_count"] >= 1
        assert (d["pipeline"], d["tenant_id"], d["job_id"]) == (
            "demo", "acme", planned["job_id"])
        assert d["request_id"].startswith(planned["job_id"]) and d["service"]
        assert d["pid"] != planned["pid"]  # logged by a worker process, not the runner


def test_a_failed_chunk_logs_its_chunk_id_and_error_in_text_or_json(tmp_path: Path) -> None:
    faults = DemoFaults(malformed={("users", 2)})
    with serve(DemoApi(300, faults=faults)) as server:
        pipeline = tmp_path / "pipeline.yaml"
        pipeline.write_text(f"""
name: logs
object_store: file://./data
state_store: sqlite:///./data/state.db
dispatcher: local://?workers=2
sources:
  - {{service: helpdesk, base_url: '{server.base_url}/helpdesk/v1', tables: [users],
     page_size: 100, pages_per_chunk: 1}}
tenants:
  - {{tenant_id: acme, credentials: {{helpdesk: {{token: {tenant_token('acme')}}}}}}}
""")
        as_json = cli("run", str(pipeline), "--json", "--log-format", "json")
        as_text = cli("--log-format", "text", "run", str(pipeline), "--json")
    assert as_json.returncode == 1  # the table failed: the job did not complete
    (failed,) = [d for d in json_lines(as_json.stderr) if d["event"] == "chunk failed"]
    assert failed["level"] == "warning" and failed["chunk_id"] == "helpdesk-users-00001"
    assert "invalid JSON" in failed["error"] and failed["tenant_id"] == "acme"
    assert failed["job_id"].startswith("job-") and failed["pipeline"] == "logs"
    (line,) = [ln for ln in as_text.stderr.splitlines() if "chunk failed" in ln]
    assert "WARNING" in line and "chunk_id=helpdesk-users-00001" in line
    assert not line.startswith("{")


def test_an_unknown_log_level_is_one_clear_error() -> None:
    proc = cli("status", "--log-level", "chatty")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: unknown log level 'chatty'")
