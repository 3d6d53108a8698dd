"""A process keeps at most ``kept`` idle REST clients open, closes the least recently used
idle one first, never closes nor replaces a client under its user (one client per key at a
time), and makes a client outside its lock, once however many threads ask at once."""

from __future__ import annotations

import threading

import pytest

from canonflow.connectors.pool import ClientPool
from canonflow.connectors.rest import RestClient
from canonflow.connectors.spec import builtin_specs


def pool(kept: int) -> tuple[ClientPool, list[RestClient]]:
    made: list[RestClient] = []

    def make(key: tuple[str, str]) -> RestClient:
        tenant, service = key
        made.append(RestClient(builtin_specs()[service], {"token": "t"},
                               base_url="http://127.0.0.1:9/crm/v1", tenant=tenant))
        return made[-1]

    return ClientPool(make, kept), made


def closed(client: RestClient) -> bool:
    return bool(client._client.is_closed)


def test_one_client_per_key_and_the_least_recently_used_idle_one_closed_first() -> None:
    clients, made = pool(kept=2)
    for tenant in ("a", "b", "a"):
        with clients.use(tenant, "crm"):
            pass
    assert len(made) == 2  # "a" was reused
    with clients.use("c", "crm"):  # "b" is the least recently used
        pass
    assert [closed(c) for c in made] == [False, True, False]
    assert list(clients.open) == [("a", "crm"), ("c", "crm")]
    clients.close()
    assert all(closed(c) for c in made)


def test_a_client_in_use_is_never_closed_nor_replaced() -> None:
    clients, made = pool(kept=1)
    with clients.use("a", "crm") as a:
        with clients.use("a", "crm") as again:  # a second user of the same client
            assert again is a
            with clients.use("b", "crm") as b:  # two in use: the pool holds both
                assert not closed(a) and len(clients.open) == 2
            assert closed(b) and not closed(a)  # b went idle over the limit
            with clients.use("a", "crm") as third:
                assert third is a
        assert not closed(a)
    assert not closed(a) and list(clients.open) == [("a", "crm")]
    assert len(made) == 2 and clients.in_use == 0
    clients.close()
    assert closed(a)


def test_an_idle_client_goes_before_an_older_one_in_use() -> None:
    """A long chunk walk holds its client while others come and go: the idle one is closed,
    and the walk's key still has one client (its rate limit and token are shared)."""
    clients, made = pool(kept=2)
    with clients.use("a", "crm") as a:
        with clients.use("b", "crm") as b:
            pass
        with clients.use("c", "crm"):
            assert closed(b) and not closed(a)
            with clients.use("a", "crm") as again:
                assert again is a
    assert len(made) == 3
    assert list(clients.open) == [("c", "crm"), ("a", "crm")]
    clients.close()


def test_a_client_that_fails_to_close_is_logged_not_raised_to_another_user(
        caplog: pytest.LogCaptureFixture) -> None:
    clients, made = pool(kept=1)
    with clients.use("a", "crm"):
        pass

    def refuse() -> None:
        raise OSError("socket will not close")

    made[0].close = refuse  # type: ignore[method-assign]
    with clients.use("b", "crm") as b:  # pushes idle "a" out: its close fails
        assert not closed(b)
    assert "closing an idle API client failed" in caplog.text
    assert clients.in_use == 0 and list(clients.open) == [("b", "crm")]
    clients.close()
    assert closed(b)


def test_a_client_is_made_outside_the_lock_and_once_for_threads_asking_together() -> None:
    made: list[tuple[str, str]] = []
    slow_started, release = threading.Event(), threading.Event()

    def make(key: tuple[str, str]) -> RestClient:
        made.append(key)
        if key[0] == "slow":  # a secret read over the network, say
            slow_started.set()
            assert release.wait(10)
        return RestClient(builtin_specs()["crm"], {"token": "t"},
                          base_url="http://127.0.0.1:9/crm/v1", tenant=key[0])

    clients = ClientPool(make, 4)
    got: list[RestClient] = []

    def slow_user() -> None:
        with clients.use("slow", "crm") as client:
            got.append(client)

    waiting = [threading.Thread(target=slow_user) for _ in range(3)]
    waiting[0].start()
    assert slow_started.wait(10)
    for t in waiting[1:]:
        t.start()
    with clients.use("fast", "crm"):  # not held up by the slow one
        pass
    release.set()
    for t in waiting:
        t.join(10)
    assert len(got) == 3 and got[0] is got[1] is got[2]
    assert made.count(("slow", "crm")) == 1
    clients.close()


def test_a_failed_make_lets_the_next_asker_try_again() -> None:
    calls = [0]

    def make(key: tuple[str, str]) -> RestClient:
        calls[0] += 1
        if calls[0] == 1:
            raise OSError("secret store unreachable")
        return RestClient(builtin_specs()["crm"], {"token": "t"},
                          base_url="http://127.0.0.1:9/crm/v1", tenant=key[0])

    clients = ClientPool(make, 2)
    with pytest.raises(OSError), clients.use("a", "crm"):
        pass
    with clients.use("a", "crm") as a:
        assert not closed(a)
    assert calls[0] == 2 and clients.in_use == 0
    clients.close()


def test_close_leaves_a_client_in_use_to_its_user() -> None:
    clients, _ = pool(kept=4)
    with clients.use("a", "crm") as a:
        clients.close()
        assert not closed(a)
    assert closed(a)


def test_many_threads_never_see_a_closed_client_and_the_pool_stays_bounded() -> None:
    clients, made = pool(kept=3)
    seen_closed: list[str] = []

    def work(n: int) -> None:
        for i in range(200):
            with clients.use(f"t{(n * 7 + i) % 11}", "crm") as client:
                if closed(client):
                    seen_closed.append(f"t{(n * 7 + i) % 11}")
                assert clients.open[(f"t{(n * 7 + i) % 11}", "crm")] is client
    # (bounded: at most 3 open, or as many as are in use at once)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert seen_closed == []
    assert len(clients.open) == 3 and clients.in_use == 0
    open_now = set(map(id, clients.open.values()))
    assert all(closed(c) for c in made if id(c) not in open_now)
    clients.close()
    assert all(closed(c) for c in made)


def test_a_pool_keeps_at_least_one_client() -> None:
    with pytest.raises(ValueError, match="at least one"):
        ClientPool(lambda key: None, 0)  # type: ignore[arg-type, return-value]
