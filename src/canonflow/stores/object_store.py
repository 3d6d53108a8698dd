"""Object store port: put/get/list by key, chosen by URL.

Schemes are a small registry with lazy imports, so a backend's library loads only when used:
``file://`` (default ``file://./canonflow-data``) and ``memory://`` are built in on obstore.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from canonflow.errors import ConfigError


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

    def delta_uri(self, name: str) -> tuple[str, dict[str, str]]:
        """Where a Delta table called ``name`` lives, and deltalake storage options."""


_SCHEMES: dict[str, str] = {
    "file": "canonflow.stores.obstore_backend:open_obstore",
    "memory": "canonflow.stores.obstore_backend:open_obstore",
    "s3": "canonflow.stores.obstore_backend:open_obstore",
}


def open_object_store(url: str) -> ObjectStore:
    scheme = url.split("://", 1)[0] if "://" in url else ""
    target = _SCHEMES.get(scheme)
    if target is None:
        known = ", ".join(f"{s}://" for s in sorted(_SCHEMES))
        raise ConfigError(f"unsupported object store URL {url!r}: use one of {known}")
    module_name, func = target.split(":")
    module = importlib.import_module(module_name)
    store: ObjectStore = getattr(module, func)(url)
    return store
