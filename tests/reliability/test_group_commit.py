"""Group commits: a transform worker claims the waiting requests of its source table (other
tenants' jobs) and writes them in one Delta commit per table. Each request must still be
claimed, accounted and finished exactly once, and a replay of any one of them (a duplicate
delivery, a crash between the group's commit and marking its requests done) must change
nothing. SQLite and PostgreSQL state stores."""

from __future__ import annotations

import random
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest

from canonflow import jsonio
from canonflow.config import Settings
from canonflow.connectors.demo_api import expected_bad
from canonflow.dispatch import open_dispatcher, tasks
from canonflow.dispatch.local import LocalDispatcher
from canonflow.model import TransformRequest
from canonflow.query import run_query
from canonflow.runner import JobRunner
from canonflow.runtime import Runtime
from canonflow.transform import run as transform_run
from canonflow.transform.writer import canonical_path

TENANTS = tuple(f"g{i:02d}" for i in range(7))
TABLES = {"crm": ["deals"]}
DEALS = 1200  # the session's demo API: records per table


@pytest.fixture(params=["sqlite", "postgres"])
def settings(request: pytest.FixtureRequest, make_settings: Any) -> Settings:
    overrides: dict[str, Any] = {}
    if request.param == "postgres":
        overrides["state_store"] = request.getfixturevalue("postgres_url")
    return make_settings(tenants=TENANTS, tables=TABLES, transform_lease_seconds=1.0,
                         group_commit_requests=4, **overrides)


@pytest.fixture
def waiting(settings: Settings) -> Iterator[tuple[Runtime, list[TransformRequest]]]:
    """Every tenant's job planned and its chunks run: one transform request per job waits
    in the outbox."""
    rt = Runtime(settings)
    dispatcher = open_dispatcher("inline://", settings)
    try:
        started, failed = JobRunner(settings, rt, dispatcher).start()
    finally:
        dispatcher.close()
    assert not failed
    for _, specs in started:
        for spec in specs:
            tasks.run_chunk(spec.model_dump_json(), rt)
    requests = [rec.request for plan, _ in started for rec in rt.state.requests(plan.job_id)]
    assert len(requests) == len(TENANTS)
    try:
        yield rt, requests
    finally:
        rt.close()


class Killed(BaseException):
    """The worker died (no handler catches a BaseException)."""


def labels(rt: Runtime, table: str) -> Counter[tuple[str, str]]:
    """(request id, label) of every commit of a canonical table, group commits included."""
    uri, _ = rt.canonical.uri(table)
    from deltalake import DeltaTable

    found: Counter[tuple[str, str]] = Counter()
    for h in DeltaTable(uri).history():
        if "canonflow.requests" in h:
            for rid, names in jsonio.loads(h["canonflow.requests"]).items():
                found.update((rid, n) for n in names)
        elif "canonflow.request_id" in h and "canonflow.group" in h:
            found[(h["canonflow.request_id"], str(h["canonflow.group"]))] += 1
    return found


def group_sizes(rt: Runtime, table: str) -> list[int]:
    uri, _ = rt.canonical.uri(table)
    from deltalake import DeltaTable

    return [len(jsonio.loads(h["canonflow.requests"])) for h in DeltaTable(uri).history()
            if "canonflow.requests" in h]


def check_exact(rt: Runtime, requests: list[TransformRequest]) -> None:
    """Every request done; each tenant's deals exactly its distinct good records, once;
    each request's rows appended by exactly one commit."""
    for r in requests:
        rec = rt.state.request(r.request_id)
        assert rec is not None and rec.status == "done", rec
        assert rec.result is not None and rec.result.records_read == DEALS
        job = rt.state.job(r.job_id or "")
        assert job is not None and job.status == "done" and job.outcome == "completed"
    good = DEALS - expected_bad(("crm", "deals"), DEALS)
    _, rows = run_query(rt.canonical._store, "SELECT _tenant_id, count(*), count(DISTINCT id) "
                        "FROM deal GROUP BY ALL ORDER BY ALL")
    assert rows == [(t, good, good) for t in TENANTS]
    appended = labels(rt, canonical_path("deal"))
    for r in requests:
        assert appended[(r.request_id, "0/append")] == 1, r.request_id
    assert all(n == 1 for n in appended.values()), appended


def test_group_commits_under_concurrent_workers_every_request_exactly_once(
        waiting: tuple[Runtime, list[TransformRequest]], settings: Settings) -> None:
    rt, requests = waiting
    deliveries = requests * 2  # every request delivered twice, out of order
    random.Random(5).shuffle(deliveries)
    dispatcher = LocalDispatcher("local://?workers=3", settings)
    try:
        outcomes = [f.result(timeout=120) for f in
                    [dispatcher.submit_transform(r) for r in deliveries]]
    finally:
        dispatcher.close()
    assert all("error" not in o for o in outcomes), outcomes
    for r in requests:
        rec = rt.state.request(r.request_id)
        assert rec is not None and rec.attempts == 1  # claimed once, by one worker
    check_exact(rt, requests)
    sizes = group_sizes(rt, canonical_path("deal"))
    assert max(sizes) > 1, sizes  # requests did go together
    # a worker that claims a request whose waiting mates other groups took just before runs
    # it alone (a commit of its own): each request once either way (``check_exact``)
    assert sum(sizes) <= len(TENANTS)


def test_a_request_replayed_after_its_group_committed_changes_nothing(
        waiting: tuple[Runtime, list[TransformRequest]]) -> None:
    rt, requests = waiting
    first = tasks.run_transform_task(requests[0].model_dump_json(), rt)
    assert "result" in first
    grouped = [r for r in requests
               if (rec := rt.state.request(r.request_id)) and rec.status == "done"]
    assert len(grouped) == 4  # the first and three more: group_commit_requests=4
    for r in requests:
        tasks.run_transform_task(r.model_dump_json(), rt)  # the rest, then each again
    from deltalake import DeltaTable

    uri, _ = rt.canonical.uri(canonical_path("deal"))
    version = DeltaTable(uri).version()
    claims: list[str] = []
    claim = rt.state.claim_request

    def counted(request_id: str, *args: Any, **kwargs: Any) -> int | None:
        claims.append(request_id)
        return claim(request_id, *args, **kwargs)

    rt.state.claim_request = counted  # type: ignore[method-assign]
    for r in reversed(requests):  # duplicates of every request, the group's included
        outcome = tasks.run_transform_task(r.model_dump_json(), rt)
        assert outcome["result"]["skipped"] is True
        assert outcome["result"]["records_written"] > 0  # the counts of the run that did it
    assert DeltaTable(uri).version() == version  # nothing written
    assert claims == []  # a finished request is known from a read: no write step queued
    check_exact(rt, requests)


def test_a_crash_between_the_group_commit_and_marking_its_requests_done(
        waiting: tuple[Runtime, list[TransformRequest]],
        monkeypatch: pytest.MonkeyPatch) -> None:
    rt, requests = waiting
    finish = transform_run._finish

    def die(*_args: Any) -> None:
        raise Killed("after the group commit, before any request is marked done")

    monkeypatch.setattr(transform_run, "_finish", die)
    with pytest.raises(Killed):
        tasks.run_transform_task(requests[0].model_dump_json(), rt)
    monkeypatch.setattr(transform_run, "_finish", finish)
    committed = labels(rt, canonical_path("deal"))
    in_group = [r for r in requests if committed[(r.request_id, "0/append")]]
    assert len(in_group) == 4  # the group's rows landed in one commit
    assert group_sizes(rt, canonical_path("deal")) == [4]
    for r in in_group:  # none marked done: each is running under the dead worker
        rec = rt.state.request(r.request_id)
        assert rec is not None and rec.status == "running", rec
    time.sleep(1.2)  # their lease (1 s) lapses: another worker may take them over
    for r in random.Random(3).sample(requests, len(requests)):
        outcome = tasks.run_transform_task(r.model_dump_json(), rt)
        assert "error" not in outcome, outcome
    check_exact(rt, requests)
    good = DEALS - expected_bad(("crm", "deals"), DEALS)
    after = labels(rt, canonical_path("deal"))
    for r in in_group:  # the replay skipped what the group had committed: no second write
        rec = rt.state.request(r.request_id)
        assert rec is not None and rec.attempts == 2 and rec.result is not None
        assert [k for k in after if k[0] == r.request_id] == [(r.request_id, "0/append")]
        assert rec.result.records_written == good and rec.result.records_merged == 0


def test_a_group_reads_its_table_log_once_and_ends_its_requests_in_one_step(
        waiting: tuple[Runtime, list[TransformRequest]],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Fixed costs are paid per group, not per request: the partitions a group holds cannot
    change under it, so its table handle is brought up to date once (then at its commit),
    and its requests end in one state-store step (one transaction on SQL stores)."""
    from deltalake import DeltaTable

    rt, requests = waiting
    updates: list[int] = []
    update = DeltaTable.update_incremental

    def counted(self: DeltaTable) -> None:
        updates.append(1)
        update(self)

    ends: list[int] = []
    finish_requests = rt.state.finish_requests

    def counted_ends(batch: Any, holder: str) -> list[bool]:
        ends.append(len(batch))
        return finish_requests(batch, holder=holder)

    tasks.run_transform_task(requests[0].model_dump_json(), rt)  # the table exists now
    rt.state.finish_requests = counted_ends  # type: ignore[method-assign]
    monkeypatch.setattr(DeltaTable, "update_incremental", counted)
    outcome = tasks.run_transform_task(requests[4].model_dump_json(), rt)
    assert "result" in outcome and not outcome["result"]["skipped"], outcome
    assert ends == [3], ends  # the three requests left, ended together
    # deal and deal_company: each read once before the group's first look-up, once to
    # commit (each request read both again before)
    assert len(updates) <= 4, len(updates)
    for r in requests[4:]:
        tasks.run_transform_task(r.model_dump_json(), rt)
    check_exact(rt, requests)


def test_a_group_maps_its_files_in_one_pass_and_a_missing_file_fails_its_request_alone(
        waiting: tuple[Runtime, list[TransformRequest]],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The group's requests' files are read up front and mapped in one pass; one of them
    names a file that is gone: it fails, alone; the others land with the counts each
    request has alone."""
    rt, requests = waiting
    passes: list[list[bool]] = []
    together = transform_run.map_together

    def counted(mapping: Any, files: Any) -> Any:
        out = together(mapping, files)
        passes.append([part is not None for part in out])
        return out

    monkeypatch.setattr(transform_run, "map_together", counted)
    gone = (requests[1].source_files or [])[0]
    (rt.canonical._store._root / gone).unlink()  # type: ignore[attr-defined]
    outcome = tasks.run_transform_task(requests[0].model_dump_json(), rt)
    assert outcome["result"]["records_read"] == DEALS
    # one pass over the files of the three requests that could read all theirs
    assert passes == [[True] * sum(len(r.source_files or []) for r in (
        requests[0], requests[2], requests[3]))]
    records = {r.request_id: rt.state.request(r.request_id) for r in requests[:4]}
    failed = records.pop(requests[1].request_id)
    assert failed is not None and failed.status == "failed"
    assert "does not exist" in (failed.error or "")
    ok = [rec.result for rec in records.values() if rec is not None and rec.result]
    assert [rec.status for rec in records.values() if rec] == ["done"] * 3 and len(ok) == 3
    bad = expected_bad(("crm", "deals"), DEALS)
    assert {(r.records_read, r.records_written, r.records_quarantined) for r in ok} == {
        (DEALS, DEALS - bad, bad)}


def test_a_group_keeps_its_requests_leased_while_it_reads_their_files(
        waiting: tuple[Runtime, list[TransformRequest]],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Reading a group's files up front can take longer than a lease (slow storage, its
    retries): the requests the group took stay its own meanwhile, never claimable by
    another worker (which would run them a second time)."""
    rt, requests = waiting
    lease = rt.settings.transform_lease_seconds
    load = transform_run._load
    stolen: list[str] = []

    def slow(key: str, mapping: Any, rt_: Runtime) -> Any:
        if not stolen:  # once, on the first file: a read three leases long
            stolen.append("")
            time.sleep(3 * lease)
            for r in requests[1:4]:  # another worker tries to take them
                if rt.state.claim_request(r.request_id, lease, holder="thief:1:x",
                                          holder_dead=lambda _: False) is not None:
                    stolen.append(r.request_id)
        return load(key, mapping, rt_)

    monkeypatch.setattr(transform_run, "_load", slow)
    outcome = tasks.run_transform_task(requests[0].model_dump_json(), rt)
    assert stolen == [""], stolen[1:]  # none of them was taken
    assert outcome["result"]["records_read"] == DEALS
    for r in requests[:4]:
        record = rt.state.request(r.request_id)
        assert record is not None and record.status == "done", (r.request_id, record)
