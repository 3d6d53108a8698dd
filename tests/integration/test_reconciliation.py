"""Full-refresh reconciliation at the transform: keys a complete extraction no longer lists
are marked deleted; a record the source still lists but that was quarantined is not; a
record whose key cannot be read stops the reconciliation; a replay marks nothing twice."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from canonflow.chunk import encode_batch
from canonflow.config import Settings
from canonflow.model import TransformRequest
from canonflow.query import run_query
from canonflow.runtime import Runtime
from canonflow.transform.run import run_transform


@pytest.fixture(params=["copy_on_write", "merge_on_read"])
def rt(tmp_path: Path, request: pytest.FixtureRequest) -> Runtime:
    return Runtime(Settings(object_store=f"file://{tmp_path}/data",
                            state_store=f"sqlite:///{tmp_path}/data/state.db",
                            canonical_writes=request.param))


def contact(i: int, updated: str = "2026-01-01T00:00:00Z") -> bytes:
    return orjson.dumps({"id": str(i), "properties": {"email": f"p{i}@x"},
                         "updated_at": updated})


def sync(rt: Runtime, job: str, lines: list[bytes], reconcile: bool = True) -> int:
    key = f"raw/acme/crm/contacts/{job}/c-0/part-00000.jsonl.zst"
    rt.objects.put(key, encode_batch(lines))
    result = run_transform(TransformRequest(
        tenant_id="acme", service_name="crm", table_name="contacts", job_id=job,
        request_id=f"{job}:crm:contacts", source_files=[key], reconcile=reconcile), rt)
    assert result.records_read == result.records_written + result.records_quarantined \
        + result.records_merged
    return result.records_deleted


def deleted(rt: Runtime) -> list[tuple[str, str]]:
    return [tuple(r) for r in run_query(  # type: ignore[misc]
        rt.canonical._store, "SELECT id, _job_id FROM contact WHERE _deleted_at IS NOT NULL "
        "ORDER BY id")[1]]


def test_reconciliation_marks_only_keys_the_source_no_longer_lists(rt: Runtime) -> None:
    assert sync(rt, "job-1", [contact(i) for i in range(6)]) == 0
    # an incremental extraction lists only what changed: nothing is reconciled
    assert sync(rt, "job-2", [contact(0, "2026-01-02T00:00:00Z")], reconcile=False) == 0
    assert deleted(rt) == []
    # 4 is gone; 3 is still listed but quarantined (its time cannot be read): kept live
    lines = [contact(0), contact(1), contact(2), contact(3, "yesterday"), contact(5)]
    assert sync(rt, "job-3", lines) == 1
    assert deleted(rt) == [("4", "job-3")]
    # a record without a readable key might be any of them: no reconciliation at all
    assert sync(rt, "job-4", [contact(0), b'{"id": null, "updated_at": "x"}']) == 0
    assert sync(rt, "job-5", [contact(0), b"not json"]) == 0
    assert deleted(rt) == [("4", "job-3")]
    # a later full extraction without 1 and 2 marks them; 4 keeps its first deletion
    assert sync(rt, "job-6", [contact(0), contact(3), contact(5)]) == 2
    assert deleted(rt) == [("1", "job-6"), ("2", "job-6"), ("4", "job-3")]
    # the key listed again with a newer version is live again
    sync(rt, "job-7", [contact(i, "2026-02-01T00:00:00Z") for i in (0, 1, 3, 5)])
    assert deleted(rt) == [("2", "job-6"), ("4", "job-3")]


def test_a_first_load_reads_nothing_back_to_reconcile(rt: Runtime,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A tenant's first full load: its partition held nothing before the request wrote, so
    every row there was listed and nothing is read back; the next full load reconciles."""
    looked: list[str] = []
    real = rt.canonical.absent_keys

    def absent_keys(*args: object, **kwargs: object) -> object:
        looked.append(str(kwargs.get("request_id", args[-1])))
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(rt.canonical, "absent_keys", absent_keys)
    assert sync(rt, "job-1", [contact(i) for i in range(3)]) == 0
    assert looked == []
    assert sync(rt, "job-2", [contact(0), contact(1)]) == 1
    assert looked == ["job-2:crm:contacts"] and deleted(rt) == [("2", "job-2")]
