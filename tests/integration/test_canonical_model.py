"""The canonical transform on deliberately bad data: accounting, quarantine and its replay,
the ledger, schema evolution, child entities."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest
from deltalake import DeltaTable

from canonflow.chunk import encode_batch
from canonflow.config import Settings
from canonflow.model import TransformRequest
from canonflow.query import run_query
from canonflow.runtime import Runtime
from canonflow.transform.quarantine import replay, summary
from canonflow.transform.run import run_transform

PREFIX = "raw/acme/crm/deals/job-1/c-0/"
TS = "2026-03-01T10:00:00Z"


def deal(i: int, **kw: object) -> bytes:
    rec: dict[str, object] = {
        "id": str(i), "properties": {"dealname": f"D{i}", "amount": "10.50",
                                     "dealstage": "won", "closedate": TS},
        "associations": {"companies": [f"c{i}", f"c{i + 1}"]}, "updated_at": TS}
    rec.update(kw)
    return orjson.dumps(rec)


@pytest.fixture
def rt(tmp_path: Path) -> Runtime:
    return Runtime(Settings(object_store=f"file://{tmp_path}/data",
                            state_store=f"sqlite:///{tmp_path}/data/state.db"))


def write_bad_dataset(rt: Runtime) -> list[str]:
    good = [deal(i) for i in range(10)]
    bad = [
        deal(100, id=None),                                            # missing key
        deal(101, properties={"amount": "n/a", "dealstage": "won"}),   # failing cast
        deal(102, updated_at="last tuesday"),                          # bad timestamp
        deal(103, properties={"amount": "1", "dealstage": "maybe"}),   # not in the enum
        b'{"id": "104", "properties": {"amount": "1"',                   # broken JSON line
        b'["not", "an", "object"]',                                    # not an object
    ]
    dup = [deal(5, updated_at="2026-03-02T00:00:00Z", properties={
        "dealname": "D5 newer", "amount": "99", "dealstage": "lost", "closedate": TS})]
    rt.objects.put(PREFIX + "part-00000.jsonl.zst", encode_batch(good))
    rt.objects.put(PREFIX + "part-00001.jsonl.zst", encode_batch(bad + dup))
    return [PREFIX + "part-00000.jsonl.zst", PREFIX + "part-00001.jsonl.zst"]


def request(files: list[str] | None = None, **kw: object) -> TransformRequest:
    return TransformRequest(tenant_id="acme", service_name="crm", table_name="deals",
                            source_files=files, **kw)


def rows(rt: Runtime, sql: str) -> list[tuple[object, ...]]:
    return run_query(rt.canonical._store, sql)[1]


def test_accounting_holds_on_a_deliberately_bad_dataset(rt: Runtime) -> None:
    result = run_transform(request(write_bad_dataset(rt)), rt)
    assert result.records_read == 17
    assert (result.records_written, result.records_quarantined, result.records_merged) == (
        10, 6, 1)
    assert result.records_read == (result.records_written + result.records_quarantined
                                   + result.records_merged)
    assert rows(rt, "SELECT name, stage, amount FROM deal WHERE id = '5'") == [
        ("D5 newer", "lost", pytest.approx(99))]
    reasons = {(r["field"], r["reason"].split(":")[0]) for r in summary(rt)}
    assert reasons == {
        ("id", "required field 'id' is missing"),
        ("amount", "cannot cast 'properties.amount' to decimal"),
        ("updated_at", "cannot cast 'updated_at' to timestamp"),
        ("stage", "cannot cast 'properties.dealstage' to enum (one of open, won, lost)"),
        (None, "invalid JSON at byte 42"),
        (None, "record is not a JSON object"),
    }
    raw = rows(rt, "SELECT raw, line, _source_file, _job_id FROM quarantine WHERE field = 'id'")
    assert raw == [(deal(100, id=None).decode(), 0, PREFIX + "part-00001.jsonl.zst", "job-1")]
    # children: one row per association of each landed deal, keyed by (deal, company)
    assert rows(rt, "SELECT count(*), count(DISTINCT (deal_id, company_id)) "
                    "FROM deal_company") == [(20, 20)]


def test_replay_after_a_mapping_fix_lands_the_record_exactly_once(
        rt: Runtime, tmp_path: Path) -> None:
    run_transform(request(write_bad_dataset(rt)), rt)
    assert replay(rt).landed == 0  # nothing changed yet: everything stays quarantined
    fix = tmp_path / "fix"
    fix.mkdir()
    (fix / "deals.yaml").write_text("""
source: {service: crm, table: deals}
entity: deal
fields:
  id: {path: id}
  name: {path: properties.dealname}
  amount: {path: properties.amount, nulls: ["n/a"]}
  stage: {path: properties.dealstage, values: {won: won, lost: lost, maybe: open}}
  updated_at: {path: updated_at}
""")
    fixed = Runtime(rt.settings.model_copy(update={"mapping_dirs": [str(fix)]}))
    first = replay(fixed)
    assert (first.records, first.landed, first.still_quarantined) == (6, 2, 4)
    assert rows(fixed, "SELECT id, amount, stage FROM deal WHERE id IN ('101', '103') "
                       "ORDER BY id") == [("101", None, "won"), ("103", pytest.approx(1), "open")]
    again = replay(fixed)  # resolved rows are not replayed again
    assert (again.records, again.landed) == (4, 0)
    assert rows(fixed, "SELECT count(*) FROM deal WHERE id IN ('101', '103')") == [(2,)]
    assert rows(fixed, "SELECT count(*) FROM deal") == [(12,)]
    assert len(summary(fixed)) == 4


def test_time_based_mode_skips_what_the_ledger_knows_unless_reprocessing(rt: Runtime) -> None:
    write_bad_dataset(rt)
    first = run_transform(request(), rt)
    assert (first.processing_mode.value, first.files_read, first.files_skipped) == (
        "time_based", 2, 0)
    second = run_transform(request(), rt)
    assert (second.files_read, second.files_skipped, second.records_read) == (0, 2, 0)
    third = run_transform(request(reprocess=True), rt)
    assert (third.files_read, third.records_written) == (2, 10)
    assert rows(rt, "SELECT count(*) FROM deal") == [(10,)]


def test_a_new_optional_field_adds_a_column_without_rewriting_history(
        rt: Runtime, tmp_path: Path) -> None:
    files = write_bad_dataset(rt)
    run_transform(request([files[0]]), rt)
    uri, _ = rt.canonical.uri("canonical/deal")
    before = DeltaTable(uri)
    version, data_files = before.version(), set(before.file_uris())
    # the entity grows an optional field; its mapping fills it
    from canonflow.mappings import FieldDef, FieldRule, load_catalog

    catalog = load_catalog()
    deal_entity = catalog.entities["deal"]
    grown = deal_entity.model_copy(update={"fields": {
        **deal_entity.fields, "pipeline": FieldDef(type="string")}})
    spec = catalog.mappings[("crm", "deals")]
    grown_spec = spec.model_copy(update={"fields": {
        **spec.fields, "pipeline": FieldRule(value="sales")}})
    catalog.entities["deal"] = grown
    catalog.mappings[("crm", "deals")] = grown_spec
    rt.__dict__["catalog"] = catalog
    rt.objects.put(PREFIX + "part-00002.jsonl.zst", encode_batch([deal(50)]))
    run_transform(request([PREFIX + "part-00002.jsonl.zst"]), rt)
    after = DeltaTable(uri)
    assert "pipeline" in after.schema().to_arrow().names
    assert after.version() == version + 1
    for uri_ in data_files:  # history intact: the old version's files are all still there
        assert Path(uri_.removeprefix("file://")).exists()
    assert rows(rt, "SELECT pipeline, count(*) FROM deal GROUP BY 1 ORDER BY 1") == [
        ("sales", 1), (None, 10)]
    assert DeltaTable(uri, version=version).to_pyarrow_table().num_rows == 10
