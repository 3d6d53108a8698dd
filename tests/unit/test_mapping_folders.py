"""Mapping folders as users fill them: files that are not mappings, their own entities and
fields added to built-in ones, keep_unmapped, checks that name the file and the field."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pyarrow as pa
import pytest

from canonflow.config import load_settings
from canonflow.connectors.spec import builtin_specs
from canonflow.errors import ConfigError
from canonflow.mappings import load_catalog
from canonflow.mappings.check import check_mappings, first_query
from canonflow.transform.mapping import CompiledMapping, PathColumns

DEALS = """source: {service: crm, table: deals}
entity: deal
fields:
  id: {path: id}
  name: {path: properties.dealname}
  updated_at: {path: updated_at}
"""
SPEC = (Path(__file__).resolve().parents[2] / "src" / "canonflow" / "connectors" / "specs"
        / "crm.yaml").read_text()
PIPELINE = """name: p
sources: [{service: crm}]
tenants:
  - tenant_id: acme
    credentials: {crm: {token: "${CANONFLOW_TEST_NEVER_SET}"}}
"""


def test_a_spec_and_a_pipeline_beside_a_mapping_are_skipped(tmp_path: Path, caplog) -> None:
    (tmp_path / "deals.yaml").write_text(DEALS)
    (tmp_path / "crm-spec.yaml").write_text(SPEC)
    (tmp_path / "pipeline.yml").write_text(PIPELINE)
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    (tmp_path / "job.yaml").write_text("kind: job\nsource: x\nentity: y\n")  # not ours
    with caplog.at_level(logging.DEBUG, logger="canonflow.mappings"):
        catalog = load_catalog([tmp_path])
    assert catalog.mappings[("crm", "deals")].origin == str(tmp_path / "deals.yaml")
    skipped = {getattr(r, "file", None) for r in caplog.records}
    assert {str(tmp_path / n) for n in ("crm-spec.yaml", "pipeline.yml", "list.yaml",
                                         "job.yaml")} <= skipped


def test_a_mapping_folder_that_does_not_exist_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"mapping folder .*nope does not exist"):
        load_catalog([tmp_path / "nope"])


@pytest.mark.parametrize(("body", "message"), [
    # says it is a mapping: every problem is reported
    ("kind: mapping\nsource: {service: crm, table: deals}\n",
     r"m.yaml: at entity: Field required"),
    # two of source, entity, fields: a mapping without a source
    ("entity: deal\nfields: {id: {path: id}, updated_at: {path: u}}\n",
     r"m.yaml: at source: Field required"),
    ("kind: mapping\n" + DEALS.replace("name: {path: properties.dealname}",
                                        "name: {path: x, timezone: Mars/Olympus}"),
     r"m.yaml: field 'name': unknown time zone 'Mars/Olympus'"),
    (DEALS + "  amount: {value: lots}\n",
     r"m.yaml: field 'amount': value 'lots' cannot be cast to decimal"),
    (DEALS + "  stage: {path: s, default: maybe}\n",
     r"m.yaml: field 'stage': default 'maybe' cannot be cast to enum \(one of open, won, lost\)"),
    (DEALS + "  name2: {path: x}\n", r"m.yaml: field 'name2' is not a field of entity 'deal'"),
    (DEALS + "  _extra: {path: x}\n", r"m.yaml: field '_extra' is not a field of entity"),
])
def test_a_file_that_claims_to_be_a_mapping_fails_with_file_and_field(
        tmp_path: Path, body: str, message: str) -> None:
    (tmp_path / "m.yaml").write_text(body)
    with pytest.raises(ConfigError, match=message) as info:
        load_catalog([tmp_path])
    assert "\n" not in str(info.value)


ENTITIES = """entities:
  support_case:
    description: A ticket as the team tracks it.
    primary_key: id
    ordering: updated_at
    fields:
      id: {type: string, required: true, description: Ticket id}
      title: {type: string}
      updated_at: {type: timestamp, required: true}
extends:
  deal:
    fields:
      currency: {type: string, description: ISO 4217 code}
"""


def test_user_entities_and_added_fields(tmp_path: Path) -> None:
    (tmp_path / "entities.yaml").write_text(ENTITIES)
    (tmp_path / "deals.yaml").write_text(DEALS + "  currency: {value: EUR}\n")
    (tmp_path / "cases.yaml").write_text(
        "source: {service: helpdesk, table: tickets}\nentity: support_case\n"
        "keep_unmapped: true\nfields:\n  id: {path: id}\n  title: {path: subject}\n"
        "  updated_at: {path: updated_at}\n")
    catalog = load_catalog([tmp_path])
    assert list(catalog.entities["support_case"].fields) == ["id", "title", "updated_at",
                                                              "_extra"]
    deal = catalog.entities["deal"]
    assert deal.fields["currency"].type == "string" and "_extra" not in deal.fields
    assert "currency" not in load_catalog().entities["deal"].fields  # the package unchanged


@pytest.mark.parametrize(("body", "message"), [
    ("extends: {opportunity: {fields: {x: {type: string}}}}\n",
     r"entities.yaml: extends unknown entity 'opportunity'"),
    ("extends: {deal: {fields: {amount: {type: string}}}}\n",
     r"extends.deal: field 'amount' is already a field of 'deal'"),
    ("extends: {deal: {fields: {currency: {type: string, required: true}}}}\n",
     r"extends.deal: field 'currency': an added field cannot be required"),
    ("extends: {deal: {fields: {_currency: {type: string}}}}\n",
     r"entity 'deal': field '_currency': names starting with '_'"),
    ("entities: {deal: {primary_key: id, ordering: u, fields: {id: {type: string}}}}\n",
     r"entity 'deal' is already defined; add fields to it under 'extends"),
    ("kind: entities\nentities: {x: {primary_key: id, ordering: id, "
     "fields: {id: {type: strin, required: true}}}}\n",
     r"entities.yaml:x: at fields.id.type: Input should be"),
])
def test_entity_files_that_cannot_work(tmp_path: Path, body: str, message: str) -> None:
    (tmp_path / "entities.yaml").write_text(body)
    with pytest.raises(ConfigError, match=message):
        load_catalog([tmp_path])


def test_keep_unmapped_keeps_the_fields_no_rule_reads_as_json(tmp_path: Path) -> None:
    (tmp_path / "deals.yaml").write_text(DEALS + "keep_unmapped: true\n")
    catalog = load_catalog([tmp_path])
    spec = catalog.mappings[("crm", "deals")]
    mapping = CompiledMapping(spec, catalog.entities["deal"], catalog.entities)
    records = [
        {"id": "1", "properties": {"dealname": "A", "amount": "3.5"}, "updated_at":
         "2026-01-01T00:00:00Z", "owner": {"name": "Ada"}},
        {"id": "2", "properties": {"dealname": "B"}, "updated_at": "2026-01-01T00:00:00Z"},
    ]
    lines = [json.dumps(r).encode() for r in records]
    cols = PathColumns({p: pa.array([_at(r, p) for r in records]) for p in mapping.paths}, 2)
    rows = mapping.apply(cols, lambda i: lines[i]).canonical.to_pylist()
    assert json.loads(rows[0]["_extra"]) == {"properties": {"amount": "3.5"},
                                             "owner": {"name": "Ada"}}
    assert rows[1]["_extra"] is None  # nothing left
    assert mapping.apply(cols).canonical.column("_extra").null_count == 2  # no raw lines


def _at(record: dict[str, object], path: str) -> object:
    node: object = record
    for part in path.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def test_check_reports_each_mapping_and_the_tables_without_one(tmp_path: Path) -> None:
    (tmp_path / "deals.yaml").write_text(DEALS + "  stage: {path: s, values: {x: maybe}}\n")
    _, rows = check_mappings([tmp_path], [("crm", "deals"), ("crm", "notes")])
    by = {(r.service, r.table): r for r in rows}
    assert by[("crm", "deals")].status == "invalid"  # the broken file, not the built-in
    assert "value map targets ['maybe']" in by[("crm", "deals")].problems[0]
    assert by[("crm", "notes")].status == "missing"
    assert by[("crm", "contacts")].status == "ok"


def test_settings_load_without_credentials_for_commands_that_call_no_api(
        tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("CANONFLOW_TEST_NEVER_SET", raising=False)
    path = tmp_path / "pipeline.yaml"
    path.write_text(PIPELINE + "  - tenant_id: globex\n    credentials: {crm: {token: "
                    "secretsmanager://arn:aws:secretsmanager:us-east-1:1:secret:x}}\n")
    with pytest.raises(ConfigError, match="CANONFLOW_TEST_NEVER_SET is not set"):
        load_settings(path)
    settings = load_settings(path, credentials=False)
    assert [t.tenant_id for t in settings.tenants] == ["acme", "globex"]
    assert all(t.credentials == {} for t in settings.tenants)


def test_the_probe_asks_for_the_first_sync_s_query() -> None:
    from datetime import UTC, datetime

    from canonflow.connectors.spec import Incremental, TimeWindowChunking

    tspec = builtin_specs()["crm"].tables["deals"]
    windowed = tspec.model_copy(update={"chunking": TimeWindowChunking(
        type="time_windows", start="2024-01-01T00:00:00Z")})
    now = datetime(2026, 1, 1, tzinfo=UTC)
    assert first_query(windowed, now) == {"updated_since": "2024-01-01T00:00:00Z",
                                          "updated_before": "2026-01-01T00:00:00Z"}
    incremental = tspec.model_copy(update={"incremental": Incremental(
        cursor_param="since", format="epoch_s", start="2025-01-01T00:00:00Z")})
    assert first_query(incremental) == {"since": "1735689600"}
