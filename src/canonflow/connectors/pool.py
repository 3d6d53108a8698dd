"""The REST clients of one process: one per (tenant, service), at most ``kept`` idle ones open.

Each client holds a keep-alive connection (a socket, its buffers, a thread of a threaded
server at the other end). A worker or a runner that serves thousands of tenants would
otherwise hold one per (tenant, service) for its whole life: 3,000 sockets at 1,000
tenants of three services, past a default limit of 1,024 open files.

When more than ``kept`` are open, the least recently used idle ones are closed; a client in
use is never closed nor replaced: a (tenant, service) has one client at a time, so its rate
limit and its OAuth token are shared by every thread that uses it. While more than ``kept``
are in use at once, the pool holds that many, and shrinks as they are given back. A client
is made outside the pool's lock (making one may read a secret over the network), once per
(tenant, service) however many threads ask for it at the same moment.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from canonflow.connectors.rest import RestClient

Key = tuple[str, str]  # (tenant, service)
KEPT = 64  # clients a process keeps open: a runner plans 8 tenants of a few services at once

logger = logging.getLogger("canonflow.connectors.pool")


class ClientPool:
    def __init__(self, make: Callable[[Key], RestClient], kept: int = KEPT) -> None:
        if kept < 1:
            raise ValueError("a client pool keeps at least one client")
        self._make = make
        self._kept = kept
        self._open: OrderedDict[Key, RestClient] = OrderedDict()  # least recently used first
        self._users: dict[int, int] = {}  # id(client) -> users now (a used one stays alive)
        self._opening: dict[Key, threading.Event] = {}  # being made by another thread
        self._lock = threading.Lock()

    @property
    def open(self) -> dict[Key, RestClient]:
        """The clients open now, least recently used first (a copy)."""
        with self._lock:
            return dict(self._open)

    @property
    def in_use(self) -> int:
        """How many clients have a user now."""
        with self._lock:
            return len(self._users)

    @contextmanager
    def use(self, tenant_id: str, service: str) -> Iterator[RestClient]:
        """The (tenant, service) client for this block, opened if it is not open."""
        key = (tenant_id, service)
        client = self._take(key)
        try:
            yield client
        finally:
            self._give_back(key, client)

    def _take(self, key: Key) -> RestClient:
        while True:
            with self._lock:
                client = self._open.get(key)
                if client is not None:
                    self._open.move_to_end(key)
                    self._users[id(client)] = self._users.get(id(client), 0) + 1
                    return client
                opening = self._opening.get(key)
                if opening is None:  # this thread makes it
                    opening = self._opening[key] = threading.Event()
                    break
            opening.wait()  # another thread makes it: then take it (or make it, if it failed)
        try:
            client = self._make(key)
        except BaseException:
            with self._lock:
                del self._opening[key]
            opening.set()
            raise
        with self._lock:
            del self._opening[key]
            self._open[key] = client
            self._users[id(client)] = 1
            idle = self._trim()
        opening.set()
        _close(idle)
        return client

    def _give_back(self, key: Key, client: RestClient) -> None:
        with self._lock:
            left = self._users.pop(id(client)) - 1
            if left:
                self._users[id(client)] = left
            idle = self._trim()
            if not left and self._open.get(key) is not client:  # the pool was closed
                idle.append(client)
        _close(idle)

    def _trim(self) -> list[RestClient]:
        """Take idle clients out, least recently used first, until at most ``kept`` are open
        (or none idle is left); return them, to be closed outside the lock."""
        idle: list[RestClient] = []
        if len(self._open) > self._kept:
            for key, client in list(self._open.items()):
                if len(self._open) <= self._kept:
                    break
                if id(client) not in self._users:
                    del self._open[key]
                    idle.append(client)
        return idle

    def close(self) -> None:
        """Close every idle client; one in use is closed by its last user. A client asked
        for afterwards is opened anew."""
        with self._lock:
            idle = [c for c in self._open.values() if id(c) not in self._users]
            self._open.clear()
        _close(idle)


def _close(clients: list[RestClient]) -> None:
    """Close clients no one uses; a failure to close one is logged, never the caller's."""
    for client in clients:
        try:
            client.close()
        except Exception as exc:  # a socket that will not close cleanly: it is dropped
            logger.warning("closing an idle API client failed: %r", exc)
