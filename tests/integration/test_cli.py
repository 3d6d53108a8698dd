"""The command line as a user meets it: demo, run, status, query, and its errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from canonflow.connectors.demo_api import DemoServer


def cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", "from canonflow.cli import main; main()",
                           *args], capture_output=True, text=True, timeout=timeout)


def test_demo_runs_end_to_end_and_leaves_queryable_tables(tmp_path: Path) -> None:
    data = str(tmp_path / "data")
    proc = cli("demo", "--records", "600", "--data-dir", data, "--json")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert len(doc["jobs"]) == 2
    for job in doc["jobs"]:
        assert job["status"] == "done" and job["outcome"] == "completed"
        assert len(job["tables"]) == 7  # crm (3), helpdesk (2), billing (2)
        for t in job["tables"].values():
            assert t["transforms_triggered"] == 1
            assert t["records_extracted"] == 600
            assert t["records_canonical"] + t["records_quarantined"] == 600
    q = cli("query", "--data-dir", data, "--json",
            "SELECT _tenant_id AS tenant, count(*) AS n FROM contact GROUP BY 1 ORDER BY 1")
    assert q.returncode == 0, q.stderr
    assert json.loads(q.stdout) == [{"tenant": "acme", "n": 600}, {"tenant": "globex", "n": 600}]
    export = cli("query", "--data-dir", data, "--csv",
                 "SELECT id, stage FROM deal WHERE _tenant_id = 'acme' ORDER BY id LIMIT 2")
    assert export.stdout.splitlines()[0] == "id,stage" and len(export.stdout.splitlines()) == 3
    status = cli("status", "--data-dir", data, "--json", doc["jobs"][0]["job_id"])
    assert json.loads(status.stdout)["status"] == "done"
    human = cli("status", "--data-dir", data)
    assert "acme" in human.stdout and "globex" in human.stdout


def test_run_reads_a_pipeline_file(tmp_path: Path, demo_server: DemoServer,
                                   monkeypatch) -> None:
    pipeline = tmp_path / "pipeline.yaml"
    pipeline.write_text(f"""
name: docs-example
object_store: file://./data
state_store: sqlite:///./data/state.db
dispatcher: inline://
sources:
  - service: helpdesk
    base_url: {demo_server.base_url}/helpdesk/v1
    tables: [users]
tenants:
  - tenant_id: acme
    credentials:
      helpdesk: {{token: "${{ACME_HELPDESK_TOKEN}}"}}
""")
    monkeypatch.setenv("ACME_HELPDESK_TOKEN", "demo-acme")
    proc = cli("run", str(pipeline), "--json")
    assert proc.returncode == 0, proc.stderr
    (job,) = json.loads(proc.stdout)["jobs"]
    assert job["tables"]["acme/helpdesk.users"]["records_canonical"] == 1200
    assert (tmp_path / "data" / "canonical" / "user").is_dir()  # relative to the file
    assert "demo-acme" not in proc.stdout + proc.stderr


def test_manual_transform_in_both_modes(tmp_path: Path, demo_server: DemoServer) -> None:
    data = str(tmp_path / "data")
    assert cli("demo", "--records", "300", "--tenants", "1", "--data-dir", data,
               "--json").returncode == 0
    timed = cli("transform", "--data-dir", data, "--tenant", "acme", "--service", "crm",
                "--table", "contacts", "--json")
    assert timed.returncode == 0, timed.stderr
    result = json.loads(timed.stdout)
    # the ledger knows the demo's transform canonicalized the one file already
    assert result["processing_mode"] == "time_based"
    assert (result["files_read"], result["files_skipped"]) == (0, 1)
    again = cli("transform", "--data-dir", data, "--tenant", "acme", "--service", "crm",
                "--table", "contacts", "--reprocess", "--json")
    result = json.loads(again.stdout)
    assert (result["files_read"], result["files_skipped"], result["records_written"]) == (1, 0, 300)
    key = next((tmp_path / "data" / "raw" / "acme" / "crm" / "contacts").rglob("part-*"))
    rel = key.relative_to(tmp_path / "data").as_posix()
    specific = cli("transform", "--data-dir", data, "--tenant", "acme", "--service", "crm",
                   "--table", "contacts", "--source-file", rel, "--json")
    assert json.loads(specific.stdout)["processing_mode"] == "file_specific"


def test_errors_are_one_line_and_non_zero(tmp_path: Path) -> None:
    missing = cli("run", str(tmp_path / "nope.yaml"))
    assert missing.returncode == 2
    assert missing.stderr.strip().startswith("error: cannot read pipeline file")
    assert len(missing.stderr.strip().splitlines()) == 1
    bad = tmp_path / "bad.yaml"
    bad.write_text("sources: [{service: crm}]\ntenants: [{tenant_id: 'a/b'}]\n")
    proc = cli("run", str(bad))
    assert proc.returncode == 2
    assert "tenants.0.tenant_id" in proc.stderr and "invalid tenant_id 'a/b'" in proc.stderr
    query = cli("query", "--data-dir", str(tmp_path / "empty"), "SELECT 1")
    assert query.returncode == 2 and "no canonical tables" in query.stderr
    unknown = cli("status", "--data-dir", str(tmp_path / "empty"), "job-x")
    assert unknown.returncode == 2 and "no job 'job-x'" in unknown.stderr


def test_status_timings_and_timeline(tmp_path: Path) -> None:
    data = str(tmp_path / "data")
    demo = cli("demo", "--records", "300", "--tenants", "1", "--data-dir", data, "--json")
    assert demo.returncode == 0, demo.stderr
    job_id = json.loads(demo.stdout)["jobs"][0]["job_id"]
    doc = json.loads(cli("status", "--data-dir", data, "--json", job_id).stdout)
    assert doc["aggregated_at"] is not None
    for t in doc["tables"].values():
        assert 0 <= t["extraction_seconds"] <= doc["seconds"]
        assert t["aggregation_wait_seconds"] >= 0 and t["files_per_transform"] == 1
    human = cli("status", "--data-dir", data, job_id)
    assert "extraction s" in human.stdout and "wait for aggr. s" in human.stdout
    page = tmp_path / "timeline.html"
    written = cli("status", "--data-dir", data, job_id, "--timeline", str(page))
    assert written.returncode == 0, written.stderr
    assert written.stdout.strip() == str(page)
    assert job_id in page.read_text() and 'data-chunk-id' in page.read_text()
    for args, message in (
            ((job_id, "--timeline", str(tmp_path / "no" / "dir" / "t.html")),
             "cannot write the timeline to"),
            (("job-x", "--timeline", str(page)), "no job 'job-x'"),
            (("--timeline", str(page)), "--timeline needs a JOB_ID")):
        failed = cli("status", "--data-dir", data, *args)
        assert failed.returncode == 2 and failed.stderr.strip().startswith("error:"), args
        assert message in failed.stderr and len(failed.stderr.strip().splitlines()) == 1
    assert "--timeline" in cli("status", "--help").stdout


def test_pipeline_file_mistakes_exit_2_with_one_line_before_any_request(
        tmp_path: Path) -> None:
    stores = "object_store: file://./data\nstate_store: sqlite:///./data/state.db\n" \
             "dispatcher: inline://\n"
    cases = {
        "sources: [{service: crm, base_url: 'ftp://x'}]\ntenants: [{tenant_id: acme}]\n":
            "at sources.0.base_url: Value error, base_url 'ftp://x' is not an http(s) URL",
        "sources: [{service: crm, base_url: 'not a url'}]\ntenants: [{tenant_id: acme}]\n":
            "base_url 'not a url' is not an http(s) URL",
        "sources: [{service: crm, base_url: '${CF_UNSET_HOST}/crm'}]\n"
        "tenants: [{tenant_id: acme}]\n":
            "at sources.0.base_url: environment variable CF_UNSET_HOST is not set",
        "sources: [{service: crm, base_url: 'https://$HOST/crm'}]\n"
        "tenants: [{tenant_id: acme}]\n":
            "at sources.0.base_url: $HOST is not read from the environment: write ${HOST}",
        "sources: [{service: crm}, {service: crm}]\ntenants: [{tenant_id: acme}]\n":
            "duplicate source service crm",
        "sources: [{service: crm, base_url: 'http://127.0.0.1:9/{tenant.region}'}]\n"
        "tenants: [{tenant_id: acme, values: {region: eu}}, {tenant_id: globex}]\n":
            "tenant 'globex' has no value 'region' (crm base_url uses {tenant.region})",
    }
    for n, (text, message) in enumerate(cases.items()):
        path = tmp_path / f"p{n}.yaml"
        path.write_text(stores + text)
        proc = cli("run", str(path))
        assert proc.returncode == 2, (text, proc.stderr)
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert proc.stderr.strip().startswith("error: ") and message in proc.stderr, proc.stderr
    spec = tmp_path / "crm.yaml"
    spec.write_text("service: crm\nbase_url: https://api.example\ntables:\n  contacts:\n"
                    "    {path: /c, records_path: data, primary_key: id,"
                    " chunking: {type: sequential}}\n")
    probe = cli("connectors", "check", str(spec), "--probe", "ftp://x")
    assert probe.returncode == 2 and "base_url 'ftp://x' is not an http(s) URL" in probe.stderr
