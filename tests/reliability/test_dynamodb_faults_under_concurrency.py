"""Invariants 2 and 3 on DynamoDB with faults moto never produces, from 4 processes at once:
every chunk delivered twice per process, and each process's client throttled, refused with
transaction conflicts and losing responses of writes the server applied (botocore event
hooks, at random). Retries must be idempotent: one claim, every chunk counted once, one
outbox row per table, and the job settles once every row is finished."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import botocore.exceptions

from canonflow.config import Settings
from canonflow.model import ChunkResult, ChunkSpec, TableRef
from canonflow.runtime import Runtime
from canonflow.stores.dynamodb import DynamoStateStore
from tests.processes import run_together

TABLES = [TableRef(tenant_id="acme", service_name="crm", table_name=f"t{i}") for i in range(5)]
CHUNKS_PER_TABLE = 6
WRITES = {"PutItem", "UpdateItem", "DeleteItem", "TransactWriteItems", "BatchWriteItem"}


def _specs(job_id: str) -> list[ChunkSpec]:
    return [ChunkSpec(job_id=job_id, chunk_id=f"{t.table_name}-{i}", table=t, start_page=i + 1,
                      end_page=i + 1, page_size=10, batch_records=10)
            for t in TABLES for i in range(CHUNKS_PER_TABLE)]


def _result(spec: ChunkSpec) -> ChunkResult:
    key = f"{spec.table.raw_prefix}{spec.job_id}/{spec.chunk_id}/part-00000.jsonl.zst"
    return ChunkResult(job_id=spec.job_id, chunk_id=spec.chunk_id, completed=True,
                       records_processed=10, processing_time=0.01, s3_files_written=[key],
                       s3_files_count=1, table_metadata=spec.table)


def inject_faults(store: DynamoStateStore, seed: int, rate: float,
                  lost_rate: float) -> dict[str, int]:
    """Random throttling / transaction conflicts before a request leaves (``rate`` each),
    and lost responses after a write the server applied (``lost_rate``: only first
    deliveries write, so fewer writes succeed than are sent); the counts of each. The first
    call, the first transaction and the first applied write of each process meet their
    fault for sure: whether a few random draws land on the few writes that apply depends
    on how the processes interleave, and every kind must happen in every run."""
    rng = random.Random(seed)
    fired = {"throttled": 0, "conflict": 0, "lost_response": 0}

    def before(model: Any, **_: Any) -> None:
        roll = rng.random()
        if roll < rate or not fired["throttled"]:
            fired["throttled"] += 1
            raise botocore.exceptions.ClientError(
                {"Error": {"Code": "ThrottlingException", "Message": "slow down"}}, model.name)
        if (roll < 2 * rate or not fired["conflict"]) and model.name == "TransactWriteItems":
            fired["conflict"] += 1
            raise botocore.exceptions.ClientError(
                {"Error": {"Code": "TransactionCanceledException", "Message": "conflict"},
                 "CancellationReasons": [{"Code": "TransactionConflict"}]}, model.name)

    def after(model: Any, http_response: Any, **_: Any) -> None:
        if (model.name in WRITES and http_response.status_code == 200
                and (rng.random() < lost_rate or not fired["lost_response"])):
            fired["lost_response"] += 1
            raise botocore.exceptions.ReadTimeoutError(endpoint_url="http://dynamodb")

    store.client.meta.events.register("before-call.dynamodb", before)
    store.client.meta.events.register("after-call.dynamodb", after)
    return fired


def _complete_all(settings_json: str, job_id: str, seed: int, out: Any, barrier: Any) -> None:
    from canonflow.aggregate import complete_chunk

    rt = Runtime(Settings.model_validate_json(settings_json))
    store = rt.state
    assert isinstance(store, DynamoStateStore)
    fired = inject_faults(store, seed, rate=0.08, lost_rate=0.25)
    specs = _specs(job_id) * 2
    random.Random(seed).shuffle(specs)
    barrier.wait()
    claims = sum(complete_chunk(rt, _result(s)).claimed for s in specs)
    out.put((claims, fired))


def test_faulty_clients_in_several_processes_aggregate_once(
        tmp_path: Path, dynamodb_url: str) -> None:
    import multiprocessing

    settings = Settings(object_store=f"file://{tmp_path}/data", state_store=dynamodb_url)
    rt = Runtime(settings)
    job_id = "job-faults"
    rt.state.create_job(job_id, "acme", "faults", "aggregated", _specs(job_id))
    out = multiprocessing.get_context("spawn").Queue()
    run_together(_complete_all, [(settings.to_worker_json(), job_id, seed, out)
                                 for seed in range(4)], timeout=300)
    reports = [out.get(timeout=10) for _ in range(4)]
    assert sum(claims for claims, _ in reports) == 1
    fired = {k: sum(f[k] for _, f in reports) for k in reports[0][1]}
    assert all(n > 0 for n in fired.values()), fired  # every kind of fault happened
    job = rt.state.job(job_id)
    assert job is not None
    assert (job.completed_chunks, job.failed_chunks) == (len(TABLES) * CHUNKS_PER_TABLE, 0)
    assert job.status == "transforms_enqueued"
    rows = rt.state.requests(job_id)
    assert sorted(r.request.table_name for r in rows) == [t.table_name for t in TABLES]
    assert all(len(r.request.source_files or []) == CHUNKS_PER_TABLE for r in rows)
    for r in rows:  # the open-row count is exact: finishing every row settles the job
        assert rt.state.claim_request(r.request.request_id, 60, holder="h") == 1
        assert rt.state.finish_request(r.request.request_id, None, holder="h")
    assert rt.state.job(job_id).status == "done"  # type: ignore[union-attr]
    rt.close()
