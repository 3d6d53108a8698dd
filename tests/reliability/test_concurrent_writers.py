"""Invariant 5 under concurrent writers: two processes upsert the same new keys into the same
tenant's entity at the same moment; the table still holds one row per key."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pytest

from canonflow.config import Settings
from canonflow.query import run_query
from canonflow.runtime import Runtime
from tests.processes import run_together

N = 3000


def _write(settings_json: str, writer: int, barrier) -> None:
    from datetime import UTC, datetime

    from canonflow.transform.mapping import constant, entity_schema

    rt = Runtime(Settings.model_validate_json(settings_json))
    entity = rt.catalog.entities["company"]
    n = N
    given = {
        "id": pa.array([str(i) for i in range(n)]),
        "name": constant(f"written by {writer}", n, pa.string()),
        "updated_at": constant(datetime(2026, 1, 1, tzinfo=UTC), n,
                               pa.timestamp("us", tz="UTC")),
        "_tenant_id": constant("acme", n, pa.string()),
        "_service_name": constant("crm", n, pa.string()),
        "_source_table": constant("companies", n, pa.string()),
        "_source_file": constant("x", n, pa.string()),
        "_job_id": constant("j", n, pa.string()),
        "_request_id": constant(f"r{writer}", n, pa.string()),
        "_extracted_at": constant(datetime(2026, 1, 1, tzinfo=UTC), n,
                                  pa.timestamp("us", tz="UTC")),
    }
    schema = entity_schema(entity)
    rows = pa.table({f.name: given.get(f.name, pa.nulls(n, f.type)) for f in schema},
                    schema=schema)
    barrier.wait()
    for start in range(0, n, 500):  # the same slices at the same time, several commits
        rt.canonical.upsert(entity, "acme", "crm", rows.slice(start, 500), f"r{writer}",
                            start // 500)


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_concurrent_upserts_of_overlapping_new_keys_keep_one_row_per_key(
        tmp_path: Path, backend: str, request: pytest.FixtureRequest) -> None:
    state_url = (request.getfixturevalue("postgres_url") if backend == "postgres"
                 else f"sqlite:///{tmp_path}/state.db")
    settings = Settings(object_store=f"file://{tmp_path}/data", state_store=state_url)
    run_together(_write, [(settings.to_worker_json(), w) for w in (1, 2)])
    rt = Runtime(settings)
    _, rows = run_query(rt.canonical._store,
                        "SELECT count(*), count(DISTINCT id) FROM company")
    assert rows == [(N, N)]
