"""Check mappings: against their entities (every mapping, built-in and user), and against
one page of each table from the real API (the probe): how many records would land and
how many would be quarantined, and why. The probe uses the real connector client and the
mapping engine, and writes nothing to any store."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from canonflow.config import Settings
from canonflow.connectors.spec import TableSpec, TimeWindowChunking
from canonflow.errors import CanonflowError
from canonflow.mappings.catalog import Catalog, inspect_catalog
from canonflow.redact import redact

ISO = "%Y-%m-%dT%H:%M:%SZ"
Status = Literal["ok", "invalid", "missing"]


@dataclass(frozen=True)
class MappingStatus:
    service: str
    table: str
    entity: str
    status: Status
    problems: list[str]
    file: str


def source_tables(settings: Settings) -> list[tuple[str, str]]:
    """The (service, table) pairs a pipeline syncs."""
    return [(src.service, table) for src in settings.sources
            for table in src.tables or list(settings.spec_for(src.service).tables)]


def check_mappings(mapping_dirs: Iterable[str | Path],
                   tables: Iterable[tuple[str, str]] = ()) -> tuple[Catalog, list[MappingStatus]]:
    """Every mapping's status (ok or invalid, with its problem), plus ``tables`` (a
    pipeline's) that no mapping covers (missing); the catalog of the valid ones."""
    check = inspect_catalog(mapping_dirs)
    rows = [MappingStatus(s, t, m.entity, "ok", [], m.origin)
            for (s, t), m in check.catalog.mappings.items()]
    rows += [MappingStatus(p.service or "?", p.table or "?", p.entity or "?", "invalid",
                           [p.message], p.origin) for p in check.problems]
    known = {(r.service, r.table) for r in rows}
    rows += [MappingStatus(s, t, "", "missing", [
        f"no mapping for {s}.{t}: add a mapping YAML to a folder of mapping_dirs"], "")
        for s, t in tables if (s, t) not in known]
    rows.sort(key=lambda r: (r.service, r.table, r.file))
    return check.catalog, rows


@dataclass
class TableProbe:
    service: str
    table: str
    entity: str = ""
    fetched: int = 0
    landed: int = 0
    quarantined: int = 0
    child_rows_rejected: int = 0
    reasons: dict[str, int] = field(default_factory=dict)  # reason -> records
    examples: list[dict[str, object]] = field(default_factory=list)
    fields_nulled: dict[str, int] = field(default_factory=dict)
    error: str | None = None
    retryable: bool = False


def first_query(tspec: TableSpec, now: datetime | None = None) -> dict[str, str]:
    """The query parameters of a first (full) sync's first request, as the planner sends
    them: the incremental start, or the whole span of a time-windowed table."""
    inc = tspec.incremental
    if isinstance(tspec.chunking, TimeWindowChunking):
        tw = tspec.chunking
        since = max(inc.start or tw.start, tw.start) if inc is not None else tw.start
        until = tw.end or (now or datetime.now(UTC)).strftime(ISO)
        return {tw.since_param: since, tw.before_param: until}
    if inc is not None and inc.start is not None:
        return {inc.cursor_param: inc.render(inc.start)}
    return {}


def probe(settings: Settings, catalog: Catalog, tenant_id: str,
          examples: int = 3) -> list[TableProbe]:
    """One page of each table of ``settings`` for ``tenant_id``, mapped, nothing written."""
    from canonflow.runtime import Runtime
    from canonflow.transform.mapping import CompiledMapping
    from canonflow.transform.reader import read_raw

    rt = Runtime(settings)  # only its HTTP clients are used: no store is opened
    out: list[TableProbe] = []
    try:
        for src in settings.sources:
            spec = settings.spec_for(src.service)
            for table in src.tables or list(spec.tables):
                row = TableProbe(src.service, table)
                out.append(row)
                mspec = catalog.mappings.get((src.service, table))
                if mspec is None:
                    row.error = f"no mapping for {src.service}.{table}"
                    continue
                entity = catalog.entities[mspec.entity]
                row.entity = entity.name
                tspec = spec.table(table)
                try:
                    with rt.client(tenant_id, src.service) as client:
                        page = client.fetch_page(
                            table, 1, src.page_size or tspec.pagination.page_size,
                            first_query(tspec))
                except CanonflowError as exc:
                    row.error, row.retryable = redact(str(exc)), exc.retryable
                    continue
                mapping = CompiledMapping(mspec, entity, catalog.entities)
                raw = read_raw(f"probe/{src.service}/{table}.jsonl",
                               b"\n".join(page.records), mapping.paths, mapping.text_paths)
                mapped = mapping.apply(raw.columns, raw.raw_line)
                row.fetched = len(page.records)
                row.landed = mapped.canonical.num_rows
                row.quarantined = len(mapped.rejected) + len(raw.broken)
                row.fields_nulled = dict(mapped.nulled)
                reasons: Counter[str] = Counter()
                found: list[dict[str, object]] = []
                for line, key, why in zip(
                        [raw.line_number(r) for r in mapped.rejected.to_pylist()],
                        mapped.keys.to_pylist(), mapped.reasons.to_pylist(), strict=True):
                    reasons[why] += 1
                    found.append({"line": line + 1, "key": key, "reason": why})
                for line, _, why in raw.broken:
                    reasons[why] += 1
                    found.append({"line": line + 1, "key": None, "reason": why})
                for child in mapping.apply_children(raw.columns, mapped.kept):
                    row.child_rows_rejected += len(child.reasons)
                    for why in child.reasons.to_pylist():
                        reasons[f"{child.entity.name}: {why}"] += 1
                row.reasons = dict(reasons.most_common())
                row.examples = found[:examples]
    finally:
        rt.close()
    return out
