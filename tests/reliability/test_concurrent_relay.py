"""The outbox relay run in several places at once sends every row exactly once."""

from __future__ import annotations

import multiprocessing
from pathlib import Path

import pytest

from canonflow.model import TransformRequest
from canonflow.stores import open_state_store

ROWS = 120


def _relay(url: str, barrier, out) -> None:
    state = open_state_store(url)
    barrier.wait()
    sent: list[str] = []
    while batch := state.claim_for_dispatch(limit=7):
        sent += [r.request_id for r in batch]
    out.put(sent)


@pytest.mark.parametrize("backend", ["sqlite", "postgres", "dynamodb"])
def test_concurrent_relays_claim_each_row_once(
        tmp_path: Path, backend: str, request: pytest.FixtureRequest) -> None:
    url = (request.getfixturevalue(f"{backend}_url") if backend != "sqlite"
           else f"sqlite:///{tmp_path}/state.db")
    state = open_state_store(url)
    for i in range(ROWS):
        state.enqueue_request(TransformRequest(
            tenant_id="acme", service_name="crm", table_name="contacts",
            request_id=f"r{i:04d}", source_files=[]))
    ctx = multiprocessing.get_context("spawn")
    barrier, out = ctx.Barrier(4), ctx.Queue()
    procs = [ctx.Process(target=_relay, args=(url, barrier, out)) for _ in range(4)]
    for p in procs:
        p.start()
    sent = [rid for _ in procs for rid in out.get(timeout=120)]
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    assert sorted(sent) == [f"r{i:04d}" for i in range(ROWS)]  # all sent, none twice
