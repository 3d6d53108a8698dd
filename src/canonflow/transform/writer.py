"""Canonical tables on Delta Lake: upsert (newest wins) and quarantine appends.

Each commit carries ``canonflow.request_id`` and ``canonflow.group`` in its commit metadata,
so a replayed request can see which of its groups already landed and skip them. Concurrent
writers (two tenants' transforms into one entity table) retry on a commit conflict.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from datetime import UTC, datetime
from typing import Any, TypeVar

import pyarrow as pa
import pyarrow.compute as pc
from deltalake import CommitProperties, DeltaTable, write_deltalake
from deltalake.exceptions import CommitFailedError, DeltaError, TableNotFoundError

from canonflow.errors import CommitConflict, StoreUnavailable
from canonflow.mappings import Entity
from canonflow.stores.object_store import ObjectStore
from canonflow.transform.mapping import constant, entity_schema

QUARANTINE_TABLE = "quarantine"
QUARANTINE_SCHEMA = pa.schema([
    ("_tenant_id", pa.string()), ("_service_name", pa.string()), ("_source_table", pa.string()),
    ("entity", pa.string()), ("_source_file", pa.string()), ("line", pa.int64()),
    ("_job_id", pa.string()), ("_request_id", pa.string()), ("field", pa.string()),
    ("reason", pa.string()), ("raw", pa.string()),
    ("quarantined_at", pa.timestamp("us", tz="UTC")),
    ("resolved_at", pa.timestamp("us", tz="UTC")),
    ("resolved_by", pa.string()),
])
_REQ = "canonflow.request_id"
_GROUP = "canonflow.group"
T = TypeVar("T")


def canonical_path(entity: str) -> str:
    return f"canonical/{entity}"


TableLock = Callable[[str], AbstractContextManager[object]]


@contextmanager
def _no_lock(_name: str) -> Iterator[None]:
    yield None


def key_column(rows: pa.Table, keys: list[str]) -> pa.Array:
    """One comparable value per row for a (possibly composite) key."""
    if len(keys) == 1:
        return pc.cast(rows.column(keys[0]), pa.string()).combine_chunks()
    parts = [pc.cast(rows.column(k), pa.string()).combine_chunks() for k in keys]
    return pc.binary_join_element_wise(*parts, "\x1f")


class CanonicalWriter:
    """Upserts go in two commits under a per-(entity, tenant) lock: rows whose key is new to
    the table are appended (no file rewritten), rows whose key exists are merged (newest
    wins). The lock makes "is this key new?" and the append one step against other writers
    of the same tenant's entity, on any machine."""

    def __init__(self, store: ObjectStore, attempts: int = 12,
                 lock: TableLock | None = None) -> None:
        self._store = store
        self._attempts = attempts
        self._lock = lock or _no_lock

    def uri(self, name: str) -> tuple[str, dict[str, str]]:
        return self._store.delta_uri(name)

    def _retry(self, what: str, op: Callable[[], T]) -> T:
        delay = 0.05
        for attempt in range(self._attempts):
            try:
                return op()
            except CommitFailedError as exc:
                if attempt == self._attempts - 1:
                    raise CommitConflict(f"{what}: concurrent commits kept winning") from exc
            except DeltaError as exc:
                # creating a table races with another writer creating it
                if "already exists" not in str(exc) or attempt == self._attempts - 1:
                    raise StoreUnavailable(f"{what}: {exc}") from exc
            time.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, 2.0)
        raise AssertionError("unreachable")

    def _table(self, name: str, schema: pa.Schema) -> DeltaTable:
        uri, opts = self.uri(name)
        try:
            return DeltaTable(uri, storage_options=opts or None)
        except TableNotFoundError:
            return DeltaTable.create(
                uri, schema, partition_by=["_tenant_id"], mode="ignore",
                storage_options=opts or None,
            )

    def committed_groups(self, name: str, request_id: str, depth: int = 200) -> set[str]:
        """Commit labels (``3``, ``3/append``, ``3/merge``) of ``request_id`` already in
        table ``name`` (recent history)."""
        uri, opts = self.uri(name)
        try:
            history = DeltaTable(uri, storage_options=opts or None).history(depth)
        except TableNotFoundError:
            return set()
        return {str(h[_GROUP]) for h in history if h.get(_REQ) == request_id and _GROUP in h}

    def _existing(self, table: DeltaTable, entity: Entity, tenant_id: str, service: str,
                  rows: pa.Table, request_id: str) -> pa.Array:
        """Which rows' keys the table already holds for this tenant and service, from
        other requests (rows an earlier attempt of this request appended do not count)."""
        none = constant(False, rows.num_rows)
        if table.version() == 0 and not table.file_uris():
            return none
        dataset = table.to_pyarrow_dataset(
            file_pruning_predicate=[("_tenant_id", "=", tenant_id)])
        held = dataset.to_table(columns=[*entity.keys, "_service_name", "_request_id"])
        if held.num_rows == 0:
            return none
        same = pc.and_(
            pc.equal(pc.cast(held.column("_service_name"), pa.string()), service),
            pc.not_equal(pc.cast(held.column("_request_id"), pa.string()), request_id))
        held_keys = key_column(held.filter(same), entity.keys)
        return pc.is_in(key_column(rows, entity.keys), value_set=held_keys)

    def upsert(self, entity: Entity, tenant_id: str, service: str, rows: pa.Table,
               request_id: str, group: int, done: set[str] | None = None) -> None:
        """Append rows with new keys, merge the rest; ``done`` lists the steps of this group
        an earlier attempt already committed."""
        done = done or set()
        name = canonical_path(entity.name)
        schema = entity_schema(entity)
        rows = rows.select(schema.names).cast(schema)
        with self._lock(f"{name}/{tenant_id}"):
            table = self._retry(f"open {name}", lambda: self._table(name, schema))
            existing = self._existing(table, entity, tenant_id, service, rows, request_id)
            if not pc.any(existing).as_py():  # a first load: no copies
                fresh, known = rows, rows.slice(0, 0)
            else:
                fresh, known = rows.filter(pc.invert(existing)), rows.filter(existing)
            if fresh.num_rows and f"{group}/append" not in done:
                props = CommitProperties(
                    custom_metadata={_REQ: request_id, _GROUP: f"{group}/append"})
                self._retry(f"append to {name}", lambda: write_deltalake(
                    self._table(name, schema), fresh, mode="append", schema_mode="merge",
                    commit_properties=props))
            if known.num_rows and f"{group}/merge" not in done:
                self._merge(name, schema, entity, tenant_id, service, known,
                            f"{group}/merge", request_id)

    def _merge(self, name: str, schema: pa.Schema, entity: Entity, tenant_id: str,
               service: str, rows: pa.Table, label: str, request_id: str) -> dict[str, Any]:
        order = entity.ordering
        props = CommitProperties(custom_metadata={_REQ: request_id, _GROUP: label})
        tenant_lit = tenant_id.replace("'", "''")
        service_lit = service.replace("'", "''")
        keys = " AND ".join(f"t.{k} = s.{k}" for k in entity.keys)
        predicate = (
            f"t._tenant_id = '{tenant_lit}' AND t._service_name = '{service_lit}' "
            f"AND {keys} AND t._tenant_id = s._tenant_id "
            f"AND t._service_name = s._service_name"
        )

        def op() -> dict[str, Any]:
            table = self._table(name, schema)
            metrics: dict[str, Any] = (
                # merge_schema: a field new to the entity adds a column, history untouched
                table.merge(rows, predicate=predicate, source_alias="s", target_alias="t",
                            merge_schema=True, commit_properties=props)
                .when_matched_update_all(predicate=f"s.{order} >= t.{order} OR t.{order} IS NULL")
                .when_not_matched_insert_all()
                .execute()
            )
            return metrics

        return self._retry(f"upsert into {name}", op)

    def resolve_quarantined(self, rows: pa.Table, replay_id: str) -> int:
        """Mark quarantine rows (by request, file and line) resolved by a replay."""
        if rows.num_rows == 0:
            return 0
        now = datetime.now(UTC).isoformat()
        keys = rows.select(["_request_id", "_source_file", "line"])
        replay_lit = replay_id.replace("'", "''")

        def op() -> int:
            table = self._table(QUARANTINE_TABLE, QUARANTINE_SCHEMA)
            metrics = table.merge(
                keys, predicate="t._request_id = s._request_id AND "
                "t._source_file = s._source_file AND t.line = s.line",
                source_alias="s", target_alias="t",
            ).when_matched_update({
                "resolved_at": f"CAST('{now}' AS TIMESTAMP)",
                "resolved_by": f"'{replay_lit}'",
            }).execute()
            return int(metrics.get("num_target_rows_updated", 0))

        return self._retry("resolve quarantined rows", op)

    def quarantine(self, rows: pa.Table, request_id: str, group: int) -> None:
        props = CommitProperties(custom_metadata={_REQ: request_id, _GROUP: str(group)})

        def op() -> None:
            table = self._table(QUARANTINE_TABLE, QUARANTINE_SCHEMA)

            write_deltalake(table, rows.cast(QUARANTINE_SCHEMA), mode="append",
                            commit_properties=props)

        self._retry("append to quarantine", op)
