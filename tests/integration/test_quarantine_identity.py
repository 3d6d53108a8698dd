"""A quarantine entry is one bad record: re-syncs and concurrent runs that meet the same bad
record again update its open entry (last seen, request, occurrences) instead of adding one;
resolved entries stay as history."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest

from canonflow.chunk import encode_batch
from canonflow.config import Settings
from canonflow.model import TransformRequest, TransformResult
from canonflow.runtime import Runtime
from canonflow.transform.quarantine import quarantined, replay
from canonflow.transform.run import run_transform
from tests.processes import run_together

T1, T2 = "2026-03-01T10:00:00Z", "2026-03-02T10:00:00Z"


def deal(i: int | None, amount: str = "1", ts: str = T1,
         companies: list[str | None] | None = None) -> bytes:
    return orjson.dumps({"id": None if i is None else str(i),
                         "properties": {"dealname": f"D{i}", "amount": amount,
                                        "dealstage": "won"},
                         "associations": {"companies": companies or ["a"]}, "updated_at": ts})


BAD = [
    deal(1, amount="n/a"),                 # keyed: the key is its identity
    deal(None, amount="2"),                # no key: the raw text is its identity
    b'{"id": "3", "properties": {',        # broken JSON: the raw text too
    deal(4, companies=["a", None]),        # a child row that fails (entity deal_company)
]


def make_rt(tmp_path: Path) -> Runtime:
    return Runtime(Settings(object_store=f"file://{tmp_path}/data",
                            state_store=f"sqlite:///{tmp_path}/data/state.db"))


@pytest.fixture
def rt(tmp_path: Path) -> Runtime:
    return make_rt(tmp_path)


def sync(rt: Runtime, job: str, lines: list[bytes]) -> TransformResult:
    key = f"raw/acme/crm/deals/{job}/c-0/part-00000.jsonl.zst"
    rt.objects.put(key, encode_batch(lines))
    return run_transform(TransformRequest(
        tenant_id="acme", service_name="crm", table_name="deals", job_id=job,
        source_files=[key], request_id=f"{job}:crm:deals"), rt)


def entries(rt: Runtime, include_resolved: bool = False) -> list[dict[str, Any]]:
    rows = quarantined(rt, include_resolved=include_resolved).to_pylist()
    return sorted(rows, key=lambda r: (r["entity"], r["raw"]))


def test_re_syncing_the_same_bad_records_keeps_one_open_entry_each(rt: Runtime) -> None:
    for n in range(3):
        result = sync(rt, f"job-{n}", [deal(10), *BAD, deal(11)])
        assert (result.records_quarantined, result.child_rows_rejected) == (3, 1)
    rows = entries(rt)
    assert len(rows) == 4
    assert {r["occurrences"] for r in rows} == {3}
    assert {r["_request_id"] for r in rows} == {"job-2:crm:deals"}  # the last occurrence
    assert all(r["quarantined_at"] < r["last_seen_at"] for r in rows)
    # a newer version of a keyed record that is still bad updates its entry
    sync(rt, "job-3", [deal(1, amount="none", ts=T2)])
    (keyed,) = [r for r in entries(rt) if r["raw"].startswith('{"id":"1"')]
    assert keyed["raw"] == deal(1, amount="none", ts=T2).decode()
    assert keyed["occurrences"] == 4
    assert len(entries(rt)) == 4


def test_a_resolved_entry_stays_as_history_and_a_new_occurrence_opens_one(
        rt: Runtime, tmp_path: Path) -> None:
    sync(rt, "job-1", [deal(1, amount="n/a")])
    fix = tmp_path / "fix"
    fix.mkdir()
    (fix / "deals.yaml").write_text("""
source: {service: crm, table: deals}
entity: deal
fields:
  id: {path: id}
  amount: {path: properties.amount, nulls: ["n/a"]}
  updated_at: {path: updated_at}
""")
    fixed = Runtime(rt.settings.model_copy(update={"mapping_dirs": [str(fix)]}))
    assert replay(fixed).landed == 1
    assert entries(rt) == []
    sync(rt, "job-2", [deal(1, amount="n/a")])  # the unfixed pipeline meets it again
    assert len(entries(rt)) == 1
    history = entries(rt, include_resolved=True)
    assert len(history) == 2
    assert sorted(r["resolved_at"] is None for r in history) == [False, True]


def _sync_in_process(settings_json: str, job: str, barrier: Any) -> None:
    rt = Runtime(Settings.model_validate_json(settings_json))
    barrier.wait()
    sync(rt, job, [deal(10), *BAD])


def test_concurrent_runs_of_one_tenant_keep_one_entry_per_bad_record(tmp_path: Path) -> None:
    rt = make_rt(tmp_path)
    run_together(_sync_in_process,
                 [(rt.settings.to_worker_json(), f"job-{w}") for w in range(3)])
    rows = entries(rt)
    assert len(rows) == 4
    assert sum(r["occurrences"] for r in rows) == 12


def test_quarantine_list_shows_each_bad_record_once_after_demo_re_runs(tmp_path: Path) -> None:
    data = str(tmp_path / "data")

    def cli(*args: str) -> str:
        proc = subprocess.run([sys.executable, "-c", "from canonflow.cli import main; main()",
                               *args], capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    def listed() -> list[dict[str, Any]]:
        return list(json.loads(cli("quarantine", "list", "--records", "--limit", "1000",
                                   "--json", "--data-dir", data)))

    cli("demo", "--records", "1000", "--data-dir", data, "--json")
    first = listed()
    assert len(first) == 8  # 2 tenants x (deals, tickets) x 1000 // 499
    for _ in range(2):
        cli("demo", "--records", "1000", "--data-dir", data, "--json")
    again = listed()
    assert len(again) == 8
    key = ("_tenant_id", "_source_table", "field", "reason", "raw")
    assert sorted(tuple(r[k] for k in key) for r in again) == sorted(
        tuple(r[k] for k in key) for r in first)


def test_new_bad_records_are_appended_and_known_ones_merged(rt: Runtime) -> None:
    """A group whose bad records the tenant's partition has no entry for is appended (a
    merge would only insert them); one that meets an entry again is merged."""
    from deltalake import DeltaTable

    def operations() -> list[str]:
        uri, opts = rt.canonical.uri("quarantine")
        table = DeltaTable(uri, storage_options=opts or None)
        return [h["operation"] for h in reversed(table.history())
                if h.get("canonflow.request_id")]

    sync(rt, "job-1", [deal(1, amount="n/a")])
    sync(rt, "job-2", [deal(2, amount="n/a")])  # another record: no entry matches
    sync(rt, "job-3", [deal(1, amount="n/a"), deal(3, amount="n/a")])  # one known
    assert operations() == ["WRITE", "WRITE", "MERGE"]
    rows = {r["record_key"]: r["occurrences"] for r in entries(rt)}
    assert rows == {"key:1": 2, "key:2": 1, "key:3": 1}
