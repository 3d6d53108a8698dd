"""Tenant isolation (invariant 4), replays (3) and crashes mid-transform: try to break them."""

from __future__ import annotations

from typing import Any

import pytest
import sqlalchemy as sa
from deltalake import DeltaTable

from canonflow.aggregate import complete_chunk
from canonflow.chunk import process_chunk
from canonflow.errors import RequestRejected
from canonflow.model import TransformRequest
from canonflow.plan import plan_job
from canonflow.runtime import Runtime
from canonflow.stores.sql import outbox
from canonflow.transform.run import run_transform


class RecordingStore:
    """Wraps an object store and records every read."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.reads: list[str] = []

    def get(self, key: str) -> bytes:
        self.reads.append(key)
        return self._inner.get(key)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def sync_acme_contacts(rt: Runtime) -> str:
    """Run every chunk of a contacts-only job and return its one transform request id."""
    plan = plan_job(rt.settings, rt, "acme")
    rt.state.create_job(plan.job_id, "acme", "t", "aggregated", plan.chunks)
    for spec in plan.chunks:
        complete_chunk(rt, process_chunk(spec, rt))
    (req,) = rt.state.claim_for_dispatch()
    return req.request_id


@pytest.fixture
def contacts_rt(make_settings) -> Runtime:
    return Runtime(make_settings(tenants=("acme", "globex"),
                                 tables={"crm": ["contacts"]}, transform_group_records=1000))


def delta_state(rt: Runtime, entity: str) -> tuple[int, list[dict[str, Any]]]:
    uri, _ = rt.canonical.uri(f"canonical/{entity}")
    table = DeltaTable(uri)
    rows = table.to_pyarrow_table().sort_by([("_tenant_id", "ascending"), ("id", "ascending")])
    return table.version(), rows.to_pylist()


@pytest.mark.parametrize("bad_key", [
    "raw/globex/crm/contacts/{job}/crm-contacts-00000/part-00000.jsonl.zst",
    "raw/acme/crm/contacts/../../../globex/crm/contacts/{job}/x.jsonl.zst",
    "../raw/acme/crm/contacts/x.jsonl.zst",
])
def test_foreign_keys_in_source_files_are_rejected_before_any_read(
        contacts_rt: Runtime, bad_key: str) -> None:
    rt = contacts_rt
    plan = plan_job(rt.settings, rt, "globex")
    rt.state.create_job(plan.job_id, "globex", "t", "aggregated", plan.chunks)
    globex_files = [k for s in plan.chunks for k in process_chunk(s, rt).s3_files_written]
    assert globex_files
    recording = RecordingStore(rt.objects)
    rt.__dict__["objects"] = recording
    good = "raw/acme/crm/contacts/job-x/c/part-00000.jsonl.zst"
    request = TransformRequest(tenant_id="acme", service_name="crm", table_name="contacts",
                               source_files=[good, bad_key.format(job=plan.job_id)])
    with pytest.raises(RequestRejected, match=r"source file .* (lies outside|is not a normalized)"):
        run_transform(request, rt)
    assert recording.reads == []  # nothing read, not even the good key
    assert rt.state.request(request.request_id) is None  # never claimed


def test_cli_rejects_a_foreign_key_with_one_clear_line(contacts_rt: Runtime, tmp_path) -> None:
    import subprocess
    import sys
    root = contacts_rt.settings.object_store[len("file://"):]
    proc = subprocess.run(
        [sys.executable, "-c", "from canonflow.cli import main; main()", "transform",
         "--data-dir", root, "--tenant", "acme", "--service", "crm", "--table", "contacts",
         "--source-file", "raw/globex/crm/contacts/j/c/part-00000.jsonl.zst"],
        capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: source file")
    assert "lies outside 'raw/acme/crm/contacts/'" in lines[0]


def test_replayed_request_changes_nothing(contacts_rt: Runtime) -> None:
    rt = contacts_rt
    rid = sync_acme_contacts(rt)
    record = rt.state.request(rid)
    assert record is not None
    first = run_transform(record.request, rt)
    assert not first.skipped and first.records_written == 5000
    before = delta_state(rt, "contact")
    replay = run_transform(record.request, rt)  # the same event delivered again
    assert replay.skipped
    assert delta_state(rt, "contact") == before  # same version, same rows


def test_crash_after_some_commits_resumes_without_duplicates(contacts_rt: Runtime) -> None:
    """A transform that committed some groups then died: after its lease the request is
    claimed again, the committed groups are skipped, the rest land, no duplicates."""
    rt = contacts_rt
    rid = sync_acme_contacts(rt)
    request = rt.state.request(rid).request  # type: ignore[union-attr]
    writer = rt.canonical
    real_upsert = writer.upsert
    calls = {"n": 0}

    def dying_upsert(*args: Any, **kw: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 3:
            raise SystemExit("worker killed")  # not caught: like a SIGKILL mid-transform
        return real_upsert(*args, **kw)

    writer.upsert = dying_upsert  # type: ignore[method-assign]
    with pytest.raises(SystemExit):
        run_transform(request, rt)
    writer.upsert = real_upsert  # type: ignore[method-assign]
    version_after_crash, _ = delta_state(rt, "contact")
    assert rt.state.request(rid).status == "running"  # type: ignore[union-attr]
    assert run_transform(request, rt).skipped  # lease not expired: a duplicate delivery waits
    engine = sa.create_engine(rt.settings.state_store)
    with engine.begin() as conn:  # let the lease expire
        conn.execute(outbox.update().where(outbox.c.request_id == rid).values(updated_at=0))
    engine.dispose()
    result = run_transform(request, rt)
    assert not result.skipped and result.records_written == 5000
    version, rows = delta_state(rt, "contact")
    assert version == version_after_crash + 3  # groups 2, 3, 4 only; 0 and 1 were skipped
    assert len(rows) == len({r["id"] for r in rows}) == 5000


def test_time_based_mode_reads_the_tables_recent_files_only(contacts_rt: Runtime) -> None:
    import os
    import time

    rt = contacts_rt
    sync_acme_contacts(rt)
    files = sorted(o.key for o in rt.objects.list("raw/acme/crm/contacts/"))
    root = rt.settings.object_store[len("file://"):]
    old = time.time() - 100 * 3600
    os.utime(os.path.join(root, files[0]), (old, old))  # older than the 72 h window
    result = run_transform(TransformRequest(
        tenant_id="acme", service_name="crm", table_name="contacts"), rt)
    assert result.processing_mode.value == "time_based"
    assert result.files_read == len(files) - 1
