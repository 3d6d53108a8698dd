"""A process keeps at most ``kept`` REST clients open, closes the least recently used idle
one first, and never closes a client under its user."""

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


def test_a_client_in_use_is_closed_by_its_last_user_not_under_it() -> None:
    clients, _ = pool(kept=1)
    with clients.use("a", "crm") as a:
        with clients.use("a", "crm") as again:  # a second user of the same client
            assert again is a
            with clients.use("b", "crm"):  # pushes "a" out while it is used twice
                assert not closed(a)
            assert not closed(a)
        assert not closed(a)  # one user left
    assert closed(a)
    with clients.use("a", "crm") as fresh:  # asked again: a new one
        assert fresh is not a and not closed(fresh)
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
                assert len(clients.open) <= 3

    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert seen_closed == []
    open_now = set(map(id, clients.open.values()))
    assert all(closed(c) for c in made if id(c) not in open_now)
    clients.close()
    assert all(closed(c) for c in made)


def test_a_pool_keeps_at_least_one_client() -> None:
    with pytest.raises(ValueError, match="at least one"):
        ClientPool(lambda key: None, 0)  # type: ignore[arg-type, return-value]
