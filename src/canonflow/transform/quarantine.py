"""The quarantine: list what was rejected, and replay it through the current mappings.

An entry is one bad record (or one bad child row of a record): its identity is (tenant,
service, source table, entity, ``record_key``), ``record_key`` being the record's key, or a
hash of its raw text when it has none. Meeting the record again updates the open entry
(last seen, request, occurrences). A replay re-maps the raw text of open entries. Records
that now pass are upserted (keyed, newest wins: a repeated replay cannot duplicate them)
and their entries resolved, kept as history; those that still fail stay open, with their
original reason.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.compute as pc

from canonflow.query import Scan, connect, quote, register
from canonflow.transform.mapping import CompiledMapping, constant, key_column, sequence
from canonflow.transform.reader import read_raw
from canonflow.transform.run import (
    _PARENT,
    _SEQ,
    child_record_keys,
    record_keys,
    write_family,
)
from canonflow.transform.writer import QUARANTINE_TABLE

if TYPE_CHECKING:
    from canonflow.runtime import Runtime


def _select(rt: Runtime, select: str, tenant: str | None, service: str | None,
            table: str | None, include_resolved: bool, tail: str = "",
            scan: Scan | None = None) -> pa.Table:
    """``SELECT {select} FROM quarantine WHERE <the filters> {tail}`` in DuckDB, filters
    pushed down: one tenant's listing opens that tenant's files only."""
    with connect() as con:
        if not register(con, {"quarantine": rt.canonical.uri(QUARANTINE_TABLE)}, scan):
            return pa.table({})
        where = [f"{column} = {quote(value)}" for column, value in (
            ("_tenant_id", tenant), ("_service_name", service), ("_source_table", table))
            if value is not None]
        if not include_resolved:
            where.append("resolved_at IS NULL")
        sql = f"SELECT {select} FROM quarantine"
        if where:
            sql += " WHERE " + " AND ".join(where)
        return con.sql(f"{sql} {tail}").arrow().read_all()


def quarantined(rt: Runtime, tenant: str | None = None, service: str | None = None,
                table: str | None = None, include_resolved: bool = False,
                columns: list[str] | None = None, limit: int | None = None,
                scan: Scan | None = None) -> pa.Table:
    """Quarantine entries (open ones unless ``include_resolved``), optionally only some
    columns and at most ``limit`` rows."""
    select = ", ".join(f'"{c}"' for c in columns) if columns else "*"
    tail = f"ORDER BY _tenant_id, _service_name, _source_table, line LIMIT {int(limit)}" \
        if limit is not None else ""
    return _select(rt, select, tenant, service, table, include_resolved, tail, scan)


def summary(rt: Runtime, tenant: str | None = None, service: str | None = None,
            table: str | None = None, scan: Scan | None = None) -> list[dict[str, Any]]:
    """Open entries counted by table, field and reason, the largest groups first."""
    keys = "_tenant_id, _service_name, _source_table, field, reason"
    rows = _select(rt, f"{keys}, count(*) AS records", tenant, service, table, False,
                   f"GROUP BY {keys} ORDER BY records DESC, _tenant_id, _source_table", scan)
    return rows.to_pylist() if rows.num_rows else []


@dataclass
class ReplayResult:
    replay_id: str
    records: int = 0
    landed: int = 0
    still_quarantined: int = 0
    tables: list[str] = field(default_factory=list)


def replay(rt: Runtime, tenant: str | None = None, service: str | None = None,
           table: str | None = None) -> ReplayResult:
    rows = quarantined(rt, tenant, service, table)
    result = ReplayResult(replay_id=f"replay-{uuid.uuid4().hex[:12]}")
    if rows.num_rows == 0:
        return result
    groups = rows.select(["_tenant_id", "_service_name", "_source_table"]).group_by(
        ["_tenant_id", "_service_name", "_source_table"]).aggregate([]).to_pylist()
    for g in groups:
        part = rows.filter(pc.and_(pc.and_(
            pc.equal(rows.column("_tenant_id"), g["_tenant_id"]),
            pc.equal(rows.column("_service_name"), g["_service_name"])),
            pc.equal(rows.column("_source_table"), g["_source_table"])))
        landed = _replay_table(rt, part, g["_tenant_id"], g["_service_name"],
                               g["_source_table"], result.replay_id)
        result.records += part.num_rows
        result.landed += landed
        result.tables.append(f"{g['_tenant_id']}/{g['_service_name']}.{g['_source_table']}")
    result.still_quarantined = result.records - result.landed
    return result


def _replay_table(rt: Runtime, part: pa.Table, tenant: str, service: str, table: str,
                  replay_id: str) -> int:
    """Re-map ``part`` (one source table's open entries), write what passes the way a
    transform does (newest wins, children replaced per parent), resolve what landed: a
    record entry once its record maps, a child-row entry once its parent maps and that
    child row no longer fails."""
    spec = rt.catalog.mapping_for(service, table)
    entity = rt.catalog.entities[spec.entity]
    mapping = CompiledMapping(spec, entity, rt.catalog.entities)
    data = "\n".join(part.column("raw").to_pylist()).encode()
    raw = read_raw("replay.jsonl", data, mapping.paths, mapping.text_paths)
    # rows of the raw file that parse: their positions in ``part``
    parsed = raw.good_lines if raw.good_lines is not None else list(range(raw.columns.num_rows))
    mapped = mapping.apply(raw.columns, raw.raw_line)
    origin = pa.array(parsed, pa.int64())
    landed_positions = pc.take(origin, mapped.kept)

    def lineage(rows: pa.Table, positions: pa.Array, first: int,
                deleted: pa.Array | None = None, deleted_at: pa.Array | None = None,
                ) -> pa.Table:
        n = rows.num_rows
        src = part.take(positions)
        rows = rows.append_column("_tenant_id", constant(tenant, n, pa.string()))
        rows = rows.append_column("_service_name", constant(service, n, pa.string()))
        rows = rows.append_column("_source_table", constant(table, n, pa.string()))
        rows = rows.append_column("_source_file", src.column("_source_file"))
        rows = rows.append_column("_job_id", src.column("_job_id"))
        rows = rows.append_column("_request_id", constant(replay_id, n, pa.string()))
        at = src.column("quarantined_at").combine_chunks()
        rows = rows.append_column("_extracted_at", at)
        gone = pa.nulls(n, at.type) if deleted is None or deleted_at is None else pc.if_else(
            deleted, pc.coalesce(deleted_at, at), None)
        rows = rows.append_column("_deleted_at", gone)
        return rows.append_column(_SEQ, sequence(first, n))

    still_failing: set[str] = set()
    children: dict[str, list[pa.Table]] = {}
    if mapped.canonical.num_rows:
        parents = lineage(mapped.canonical, landed_positions, 0, mapped.deleted,
                          mapped.deleted_at)
        parent_keys = key_column(mapped.canonical, entity.keys)
        first = parents.num_rows
        for child in mapping.apply_children(raw.columns, mapped.kept):
            position = pc.cast(pc.index_in(child.parents, value_set=mapped.kept), pa.int64())
            rows = lineage(child.rows, pc.take(origin, child.parents), first)
            children.setdefault(child.entity.name, []).append(
                rows.append_column(_PARENT, position))
            first += rows.num_rows
            of = pc.take(parent_keys, pc.index_in(child.rejected_parents,
                                                  value_set=mapped.kept))
            still_failing |= {f"{child.entity.name}\x1f{k}" for k in child_record_keys(
                record_keys(of, [""] * len(of)), child)}
        write_family(rt.canonical, mapping, tenant, service, parents, children, replay_id, 0,
                     lambda _table: set())
    maps = pc.is_in(pa.array(range(part.num_rows), pa.int64()), value_set=landed_positions)
    names = part.column("entity").to_pylist()
    idents = (part.column("record_key").to_pylist() if "record_key" in part.column_names
              else [None] * part.num_rows)
    ok = [bool(m) and (name == entity.name or f"{name}\x1f{ident}" not in still_failing)
          for m, name, ident in zip(maps.to_pylist(), names, idents, strict=True)]
    landed = part.filter(pa.array(ok, pa.bool_()))
    rt.canonical.resolve_quarantined(landed, replay_id)
    return int(landed.num_rows)
