"""The REST clients of one process: one per (tenant, service), at most ``kept`` open.

Each client holds a keep-alive connection (a socket, its buffers, a thread of a threaded
server at the other end). A worker or a runner that serves thousands of tenants would
otherwise hold one per (tenant, service) for its whole life: 3,000 sockets at 1,000
tenants of three services, past a default limit of 1,024 open files. The least recently
used idle client is closed when another is opened; a client in use is never closed under
its user (one pushed out while in use is closed when its last user is done).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from canonflow.connectors.rest import RestClient

Key = tuple[str, str]  # (tenant, service)
KEPT = 64  # clients a process keeps open: a runner plans 8 tenants of a few services at once


class ClientPool:
    def __init__(self, make: Callable[[Key], RestClient], kept: int = KEPT) -> None:
        if kept < 1:
            raise ValueError("a client pool keeps at least one client")
        self._make = make
        self._kept = kept
        self._open: OrderedDict[Key, RestClient] = OrderedDict()
        self._users: dict[int, int] = {}  # id(client) -> users now
        self._lock = threading.Lock()

    @property
    def open(self) -> dict[Key, RestClient]:
        """The clients open now, least recently used first (a copy)."""
        with self._lock:
            return dict(self._open)

    @contextmanager
    def use(self, tenant_id: str, service: str) -> Iterator[RestClient]:
        """The (tenant, service) client for this block, opened if it is not open."""
        key = (tenant_id, service)
        with self._lock:
            client = self._open.get(key)
            if client is None:
                client = self._open[key] = self._make(key)
            self._open.move_to_end(key)
            self._users[id(client)] = self._users.get(id(client), 0) + 1
            idle = self._trim()
        for old in idle:
            old.close()
        try:
            yield client
        finally:
            with self._lock:
                left = self._users.pop(id(client)) - 1
                if left:
                    self._users[id(client)] = left
                pushed_out = not left and self._open.get(key) is not client
            if pushed_out:
                client.close()

    def _trim(self) -> list[RestClient]:
        """Take clients out, least recently used first, until at most ``kept`` are open;
        return the idle ones to close (one in use is closed by its last user)."""
        idle: list[RestClient] = []
        while len(self._open) > self._kept:
            _, client = self._open.popitem(last=False)
            if id(client) not in self._users:
                idle.append(client)
        return idle

    def close(self) -> None:
        """Close every idle client (one in use is closed by its last user)."""
        with self._lock:
            idle = [c for c in self._open.values() if id(c) not in self._users]
            self._open.clear()
        for client in idle:
            client.close()
