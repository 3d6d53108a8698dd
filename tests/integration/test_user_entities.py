"""A user's own model, outside the package: a new entity, a field added to a built-in one,
mappings for them beside other YAML files; synced by worker processes, read back with
`canonflow query` from a pipeline whose credentials are not set. And the checks around
mappings: a table without one is refused before any extraction, `canonflow mappings check`
reports invalid ones and probes one page."""

from __future__ import annotations

import json
from pathlib import Path

from canonflow.config import Settings
from canonflow.connectors.demo_api import BAD_EVERY, DemoServer
from canonflow.errors import ConfigError
from tests.conftest import SettingsFactory
from tests.integration.test_cli import cli
from tests.jobs import run_job

ENTITIES = """kind: entities
entities:
  support_case:
    description: A helpdesk ticket as the team tracks it.
    primary_key: id
    ordering: updated_at
    fields:
      id: {type: string, required: true, description: Ticket id}
      title: {type: string, description: Subject line}
      urgency: {type: string, description: Priority as the source says}
      updated_at: {type: timestamp, required: true, description: Last change}
extends:
  deal:
    fields:
      currency: {type: string, description: ISO 4217 code of the amount}
"""
CASES = """source: {service: helpdesk, table: tickets}
entity: support_case
keep_unmapped: true
fields:
  id: {path: id}
  title: {path: subject}
  urgency: {path: priority}
  updated_at: {path: updated_at}
"""
BUILTIN_DEALS = (Path(__file__).resolve().parents[2] / "src" / "canonflow" / "mappings"
                 / "crm" / "deals.yaml").read_text()
SPEC = (Path(__file__).resolve().parents[2] / "src" / "canonflow" / "connectors" / "specs"
        / "crm.yaml").read_text()


def _model(folder: Path) -> Path:
    folder.mkdir()
    (folder / "entities.yaml").write_text(ENTITIES)
    (folder / "support_cases.yaml").write_text(CASES)
    (folder / "deals.yaml").write_text(BUILTIN_DEALS.replace(
        "fields:\n  id: {path: id}\n", "fields:\n  id: {path: id}\n  currency: {value: EUR}\n",
        1))
    (folder / "crm-spec.yaml").write_text(SPEC)  # not a mapping: skipped
    return folder


def _pipeline(path: Path, settings: Settings, model: Path, extra: str = "") -> Path:
    path.write_text(f"""name: test
object_store: {settings.object_store}
state_store: {settings.state_store}
dispatcher: inline://
mapping_dirs: [{model}]
sources:
{"".join(f"  - {{service: {s.service}, base_url: '{s.base_url}', page_size: 500}}{chr(10)}"
         for s in settings.sources)}{extra}tenants:
  - tenant_id: acme
    credentials:
{"".join(f"      {s.service}: {{token: '${{CANONFLOW_TEST_UNSET_TOKEN}}'}}{chr(10)}"
         for s in settings.sources)}""")
    return path


def test_a_user_entity_and_an_added_field_land_and_query_without_credentials(
        tmp_path: Path, make_settings: SettingsFactory, monkeypatch) -> None:
    monkeypatch.delenv("CANONFLOW_TEST_UNSET_TOKEN", raising=False)
    model = _model(tmp_path / "model")
    settings = make_settings(tables={"crm": ["deals"], "helpdesk": ["tickets"]},
                             mapping_dirs=[str(model)], dispatcher="local://?workers=1")
    rt, job_id = run_job(settings)  # transforms in another process: the JSON settings
    try:
        assert rt.state.job(job_id).outcome == "completed"
    finally:
        rt.close()
    pipeline = _pipeline(tmp_path / "pipeline.yaml", settings, model)

    q = cli("query", "--pipeline", str(pipeline), "--json",
            "SELECT count(*) AS n, min(currency) AS lo, max(currency) AS hi FROM deal")
    assert q.returncode == 0, q.stderr
    assert json.loads(q.stdout) == [{"n": 1200 - 1200 // BAD_EVERY, "lo": "EUR", "hi": "EUR"}]
    q = cli("query", "--pipeline", str(pipeline), "--json",
            "SELECT id, title, urgency, _extra FROM support_case ORDER BY id LIMIT 1")
    assert q.returncode == 0, q.stderr
    (row,) = json.loads(q.stdout)
    assert (row["id"], row["title"]) == ("7000", "Ticket 0: cannot sync")
    extra = json.loads(row["_extra"])
    assert set(extra) == {"status", "requester_id", "tags", "created_at"}  # the rest
    assert extra["tags"][0] == "sync"
    count = cli("query", "--pipeline", str(pipeline), "--json",
                "SELECT count(*) AS n FROM support_case")
    assert json.loads(count.stdout) == [{"n": 1200 - 1200 // BAD_EVERY}]

    status = cli("status", "--pipeline", str(pipeline), "--json", job_id)
    assert status.returncode == 0, status.stderr
    assert cli("quarantine", "list", "--pipeline", str(pipeline)).returncode == 0
    docs = cli("entities", "--markdown", "--pipeline", str(pipeline))
    assert docs.returncode == 0, docs.stderr
    assert "## support_case\n" in docs.stdout and "`helpdesk.tickets`" in docs.stdout
    assert "| `currency` | string |" in docs.stdout and "| `_extra` | string |" in docs.stdout
    # a mapping broken after the sync does not keep the tables from being read
    (model / "broken.yaml").write_text("kind: mapping\nsource: {service: crm, table: deals}\n")
    again = cli("query", "--pipeline", str(pipeline), "--json",
                "SELECT count(*) AS n FROM support_case")
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout) == json.loads(count.stdout)
    # a command that calls the API still needs the credentials
    run = cli("run", str(pipeline))
    assert run.returncode == 2 and "CANONFLOW_TEST_UNSET_TOKEN is not set" in run.stderr


def test_a_table_without_a_mapping_is_refused_before_any_extraction(
        tmp_path: Path, make_settings: SettingsFactory) -> None:
    spec = tmp_path / "crm.yaml"
    deals = SPEC[SPEC.index("  deals:\n"):]  # the last table: a copy named notes
    spec.write_text(SPEC.rstrip("\n") + "\n" + deals.replace("  deals:", "  notes:", 1))
    settings = make_settings(tables={"crm": ["contacts", "notes"]})
    settings = settings.model_copy(update={"sources": [
        settings.sources[0].model_copy(update={"spec": str(spec)})]})
    try:
        run_job(settings)
    except ConfigError as exc:
        message = str(exc)
    else:
        raise AssertionError("a table without a mapping was planned")
    assert message.startswith("no mapping for crm.notes:") and "mapping_dirs" in message
    assert not (tmp_path / "data" / "raw").exists()  # nothing was extracted


def test_mappings_check_reports_invalid_mappings_and_probes_one_page(
        tmp_path: Path, make_settings: SettingsFactory, demo_server: DemoServer,
        monkeypatch) -> None:
    monkeypatch.delenv("CANONFLOW_TEST_UNSET_TOKEN", raising=False)
    model = _model(tmp_path / "model")
    settings = make_settings(tables={"crm": ["deals"], "helpdesk": ["tickets"]})
    path = _pipeline(tmp_path / "pipeline.yaml", settings, model)
    static = cli("mappings", "check", "--pipeline", str(path))  # no credentials needed
    assert static.returncode == 0, static.stderr
    no_creds = cli("mappings", "check", "--pipeline", str(path), "--probe")
    assert no_creds.returncode == 2 and "CANONFLOW_TEST_UNSET_TOKEN" in no_creds.stderr
    pipeline = path.read_text()
    path.write_text(pipeline.replace("${CANONFLOW_TEST_UNSET_TOKEN}", "demo-acme"))

    ok = cli("mappings", "check", "--pipeline", str(path), "--probe", "--json")
    assert ok.returncode == 0, ok.stderr
    doc = json.loads(ok.stdout)
    status = {(m["service"], m["table"]): m for m in doc["mappings"]}
    assert status[("helpdesk", "tickets")]["entity"] == "support_case"
    assert {m["status"] for m in doc["mappings"]} == {"ok"}
    probes = {p["table"]: p for p in doc["probe"]}
    tickets = probes["tickets"]
    page = 500  # the pipeline's page size: one bad record (the 499th) on the first page
    assert tickets["fetched"] == page
    assert (tickets["landed"], tickets["quarantined"]) == (page - 1, 1)
    assert tickets["reasons"] == {"required field 'id' is missing": 1}
    assert tickets["examples"] == [{"line": BAD_EVERY, "key": None,
                                    "reason": "required field 'id' is missing"}]
    assert probes["deals"]["reasons"] == {"cannot cast 'properties.amount' to decimal": 1}
    assert not (tmp_path / "data").exists()  # nothing written to any store

    (model / "support_cases.yaml").write_text(CASES.replace("urgency: {path: priority}",
                                                            "urgency: {path: priority, "
                                                            "format: '%Y'}"))
    bad = cli("mappings", "check", "--mapping-dir", str(model), "--json")
    assert bad.returncode == 2
    (row,) = [m for m in json.loads(bad.stdout)["mappings"] if m["status"] != "ok"]
    assert (row["service"], row["table"], row["entity"], row["status"]) == (
        "helpdesk", "tickets", "support_case", "invalid")
    assert row["problems"] == [f"{model / 'support_cases.yaml'}: field 'urgency': format is "
                               "for timestamp fields, not string"]
    human = cli("mappings", "check", "--mapping-dir", str(model))
    assert human.returncode == 2 and "1 invalid" in human.stdout
