"""Merge-on-read canonical tables: a changed record is appended as a new version of its key
instead of rewriting the files that hold the old one, and readers keep the current version.

Copy-on-write (the default) keeps one row per key: an upsert of changed keys rewrites every
file holding one of them, so a small sync spread across a large tenant rewrites the whole
partition. Delta's own answer, deletion vectors, is not written by delta-rs; so a table
written with ``canonical_writes: merge_on_read`` holds versions, says so in its table
properties (with its key and ordering columns), and:

- ``canonflow query`` shows one row per key (the view :func:`current_sql` builds; the
  versions stay readable as ``<entity>__versions``);
- compaction (after a transform, and ``canonflow maintain``) folds a tenant's partition back
  to one row per key, so versions never pile up;
- writers decide "new key or newer version?" against every held version (newest wins).

The current version of a key is the same one a copy-on-write merge would have kept: the
greatest ordering value, a non-null one before nulls; on a tie, the later extraction.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from canonflow.mappings import Entity

CanonicalWrites = Literal["copy_on_write", "merge_on_read"]
WRITES = "canonflow.writes"
KEYS = "canonflow.keys"
ORDERING = "canonflow.ordering"
MERGE_ON_READ = "merge_on_read"
VERSIONS_SUFFIX = "__versions"


@dataclass(frozen=True)
class Versioning:
    """How to tell a key's current version in a merge-on-read table."""

    keys: tuple[str, ...]
    ordering: str

    @classmethod
    def of(cls, entity: Entity) -> Versioning:
        return cls(tuple(entity.keys), entity.ordering)

    @classmethod
    def from_properties(cls, configuration: Mapping[str, str]) -> Versioning | None:
        """The versioning a table's properties declare; None for a copy-on-write table."""
        if configuration.get(WRITES) != MERGE_ON_READ:
            return None
        return cls(tuple(configuration[KEYS].split(",")), configuration[ORDERING])

    def properties(self) -> dict[str, str]:
        return {WRITES: MERGE_ON_READ, KEYS: ",".join(self.keys), ORDERING: self.ordering}

    def current_sql(self, source: str, where: str = "") -> str:
        """DuckDB SQL selecting the current version of each key from ``source`` (rows
        filtered by ``where`` first, if given)."""
        partition = ", ".join(ident(c) for c in ("_tenant_id", "_service_name", *self.keys))
        rank = (f"row_number() OVER (PARTITION BY {partition} ORDER BY "
                f"{ident(self.ordering)} DESC NULLS LAST, _extracted_at DESC NULLS LAST, "
                "_request_id DESC NULLS LAST)")
        condition = f" WHERE {where}" if where else ""
        return f"SELECT * FROM {source}{condition} QUALIFY {rank} = 1"


def ident(name: str) -> str:
    """``name`` as a quoted SQL identifier."""
    return '"' + name.replace('"', '""') + '"'
