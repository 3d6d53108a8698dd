"""Object store port: put/get/list by key, chosen by URL.

Schemes come from the shared registry (:mod:`canonflow.schemes`) with lazy imports, so a
backend's library loads only when used: ``file://`` (default ``file://./canonflow-data``),
``memory://`` and ``s3://`` are built in on obstore.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from canonflow.schemes import OBJECT_STORES


@dataclass(frozen=True, slots=True)
class ObjectInfo:
    key: str
    size: int
    last_modified: datetime  # timezone-aware UTC


@dataclass(frozen=True, slots=True)
class ObjectStoreCapabilities:
    create_only_writes: bool
    shared_between_processes: bool


class ObjectStore(Protocol):
    url: str
    capabilities: ObjectStoreCapabilities

    def put(self, key: str, data: bytes, *, create_only: bool = False) -> None:
        """Write ``data`` at ``key``; ``create_only``: an existing key raises FileExistsError."""

    def get(self, key: str) -> bytes:
        """Read a whole object; a missing key raises FileNotFoundError."""

    def get_object(self, key: str) -> tuple[bytes, datetime]:
        """Read a whole object and its last-modified time (UTC)."""

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        """Objects whose key starts with ``prefix``, with sizes and modification times."""

    def exists(self, key: str) -> bool: ...

    def delete(self, keys: Iterable[str]) -> None:
        """Delete these objects (in batches); a key that is not there is no error."""

    def delta_uri(self, name: str) -> tuple[str, dict[str, str]]:
        """Where a Delta table called ``name`` lives, and deltalake storage options."""


def open_object_store(url: str) -> ObjectStore:
    """Open the object store a URL names (see :data:`canonflow.schemes.OBJECT_STORES`)."""
    store: ObjectStore = OBJECT_STORES.open(url)
    return store
