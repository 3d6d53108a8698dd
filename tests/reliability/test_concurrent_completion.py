"""Invariant 2 and 3 under fire: every chunk completed twice, from 4 processes at once."""

from __future__ import annotations

import multiprocessing
import random
from pathlib import Path

import pytest

from canonflow.config import Settings
from canonflow.model import ChunkResult, ChunkSpec, TableRef
from canonflow.runtime import Runtime

TABLES = [TableRef(tenant_id="acme", service_name="crm", table_name=t)
          for t in ("contacts", "companies", "deals")]
CHUNKS_PER_TABLE = 8


def _specs(job_id: str) -> list[ChunkSpec]:
    return [ChunkSpec(job_id=job_id, chunk_id=f"{t.table_name}-{i}", table=t, start_page=i + 1,
                      end_page=i + 1, page_size=10, batch_records=10)
            for t in TABLES for i in range(CHUNKS_PER_TABLE)]


def _result(spec: ChunkSpec) -> ChunkResult:
    key = f"{spec.table.raw_prefix}{spec.job_id}/{spec.chunk_id}/part-00000.jsonl.zst"
    return ChunkResult(job_id=spec.job_id, chunk_id=spec.chunk_id, completed=True,
                       records_processed=10, processing_time=0.01, s3_files_written=[key],
                       s3_files_count=1, table_metadata=spec.table)


def _complete_all(settings_json: str, job_id: str, seed: int, barrier, out) -> None:
    from canonflow.aggregate import complete_chunk

    rt = Runtime(Settings.model_validate_json(settings_json))
    specs = _specs(job_id) * 2  # every chunk twice from this process too
    random.Random(seed).shuffle(specs)
    barrier.wait()
    claims = sum(complete_chunk(rt, _result(s)).claimed for s in specs)
    out.put(claims)


@pytest.mark.parametrize("backend", ["sqlite", "postgres", "dynamodb"])
def test_duplicate_concurrent_completions_aggregate_once(
        tmp_path: Path, backend: str, request: pytest.FixtureRequest) -> None:
    state_url = (request.getfixturevalue(f"{backend}_url") if backend != "sqlite"
                 else f"sqlite:///{tmp_path}/data/state.db")
    settings = Settings(object_store=f"file://{tmp_path}/data", state_store=state_url)
    rt = Runtime(settings)
    job_id = "job-race"
    rt.state.create_job(job_id, "acme", "race", "aggregated", _specs(job_id))
    ctx = multiprocessing.get_context("spawn")
    procs, barrier, out = 4, ctx.Barrier(4), ctx.Queue()
    workers = [ctx.Process(target=_complete_all,
                           args=(settings.to_worker_json(), job_id, seed, barrier, out))
               for seed in range(procs)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(120)
        assert w.exitcode == 0
    claims = [out.get(timeout=5) for _ in range(procs)]
    assert sum(claims) == 1  # exactly one aggregation
    job = rt.state.job(job_id)
    assert job is not None
    assert job.completed_chunks == job.total_chunks == len(TABLES) * CHUNKS_PER_TABLE
    assert job.status == "transforms_enqueued"
    rows = rt.state.requests(job_id)
    assert sorted(r.request.table_name for r in rows) == sorted(t.table_name for t in TABLES)
    for r in rows:
        assert len(r.request.source_files or []) == CHUNKS_PER_TABLE
