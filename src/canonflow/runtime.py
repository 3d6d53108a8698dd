"""A worker's open handles (stores, catalog, HTTP clients), built once per process from
:class:`Settings` so tasks carry only small JSON payloads."""

from __future__ import annotations

import importlib
import logging
from collections.abc import Collection, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from functools import cached_property

from canonflow import retry
from canonflow.config import Settings
from canonflow.connectors import tls
from canonflow.connectors.pool import ClientPool
from canonflow.connectors.rest import RestClient
from canonflow.errors import CommitConflict
from canonflow.lease import Heartbeat, holder_dead, holder_id
from canonflow.mappings import Catalog, load_catalog
from canonflow.stores import ObjectStore, StateStore, open_object_store, open_state_store
from canonflow.transform.writer import CanonicalWriter

log = logging.getLogger("canonflow.lease")
LOCK_TTL = 60.0  # a table lock lapses this long after its holder's last heartbeat


@dataclass
class Runtime:
    settings: Settings
    # the process's REST clients: one per (tenant, service), the least recently used idle
    # ones closed past :data:`canonflow.connectors.pool.KEPT`
    clients: ClientPool = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.clients = ClientPool(self._open_client)

    @cached_property
    def objects(self) -> ObjectStore:
        return open_object_store(self.settings.object_store)

    @cached_property
    def state(self) -> StateStore:
        return open_state_store(self.settings.state_store)

    @cached_property
    def canonical(self) -> CanonicalWriter:
        url = self.settings.canonical_store
        return CanonicalWriter(open_object_store(url) if url else self.objects,
                               lock=self.table_lock, locks=self.table_locks,
                               writes=self.settings.canonical_writes)

    @contextmanager
    def table_lock(self, name: str, ttl: float = LOCK_TTL,
                   wait: float = 600.0) -> Iterator[None]:
        """A lease in the state store, so writers on any machine take turns on ``name``.

        Renewed by a heartbeat while held; a holder known dead (a gone process of this
        host) is taken over at once, any other when its lease lapses."""
        me = holder_id()

        def take() -> bool:
            if self.state.acquire_lock(name, me, ttl):
                return True
            current = self.state.lock_holder(name)
            if current is not None and holder_dead(current[0]):
                log.warning("taking over the lock of a dead holder",
                            extra={"lock": name, "dead_holder": current[0]})
                return self.state.acquire_lock(name, me, ttl, steal_from=current[0])
            return False

        if not retry.lock(wait, {"lock": name})(take):
            raise CommitConflict(f"{name} stayed locked for {wait:.0f} s")
        try:
            with Heartbeat(ttl / 4, lambda: self.state.renew_lock(name, me, ttl),
                           name) as beat:
                yield
            if beat.lost.is_set():  # another writer may have written meanwhile: redo
                raise CommitConflict(f"{name}: the lock was lost while held")
        finally:
            self.state.release_lock(name, me)

    @contextmanager
    def table_locks(self, names: Collection[str], ttl: float = LOCK_TTL) -> Iterator[set[str]]:
        """Those of ``names`` no other holder has, taken in one step and held (one
        heartbeat renews them) for this block, then released in one step; the names taken.
        Never waits: a caller takes the others one by one (:meth:`table_lock`)."""
        me = holder_id()
        taken = self.state.acquire_locks(names, me, ttl)
        if not taken:  # every one is another holder's: nothing to renew or release
            yield taken
            return
        try:
            with Heartbeat(ttl / 4, lambda: all([self.state.renew_lock(n, me, ttl)
                                                 for n in sorted(taken)]),
                           "table locks") as beat:
                yield taken
            if beat.lost.is_set():  # another writer may have written meanwhile: redo
                raise CommitConflict(f"{len(taken)} table locks: one was lost while held")
        finally:
            self.state.release_locks(taken, me)

    @cached_property
    def holder(self) -> str:
        """This process's holder id for transform requests it runs."""
        return holder_id()

    @cached_property
    def catalog(self) -> Catalog:
        return load_catalog(self.settings.mapping_dirs)

    def warm_up(self) -> None:
        """Open stores, load the catalog and what the first HTTP client needs up front
        (worker start, while the runner plans; not the first task): the TLS context's CA
        bundle (about 30 ms) and httpcore, which httpx imports on its first client (about
        130 ms, a tenth of a small sync's wall time when the first chunk pays it)."""
        _ = self.objects, self.state, self.catalog
        tls.context()
        importlib.import_module("httpcore")

    def _open_client(self, key: tuple[str, str]) -> RestClient:
        tenant_id, service = key
        connection = self.settings.connection(tenant_id, service)
        return RestClient(connection.spec, self.settings.credentials(tenant_id, service),
                          base_url=connection.base_url, tenant=tenant_id)

    def client(self, tenant_id: str, service: str) -> AbstractContextManager[RestClient]:
        """The keep-alive client of (tenant, service) for a ``with`` block; it stays open
        for the next block unless the process opens many others meanwhile."""
        return self.clients.use(tenant_id, service)

    def close(self) -> None:
        self.clients.close()
        if "state" in self.__dict__:
            self.state.close()
