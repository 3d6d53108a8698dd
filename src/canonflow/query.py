"""SQL over canonical tables: DuckDB scanning the Delta tables as Arrow datasets."""

from __future__ import annotations

from typing import Any

import duckdb
from deltalake import DeltaTable
from deltalake.exceptions import TableNotFoundError

from canonflow.errors import ConfigError, TerminalError
from canonflow.mappings import load_catalog
from canonflow.stores.object_store import ObjectStore
from canonflow.transform.writer import QUARANTINE_TABLE, canonical_path


def available_tables(store: ObjectStore, mapping_dirs: list[str] | None = None) -> dict[str, Any]:
    """Delta tables that exist, by SQL name: every entity, plus ``quarantine``."""
    names = {e: canonical_path(e) for e in load_catalog(mapping_dirs or []).entities}
    names[QUARANTINE_TABLE] = QUARANTINE_TABLE
    tables = {}
    for sql_name, path in names.items():
        uri, opts = store.delta_uri(path)
        try:
            tables[sql_name] = DeltaTable(uri, storage_options=opts or None).to_pyarrow_dataset()
        except TableNotFoundError:
            continue
    return tables


def run_query(store: ObjectStore, sql: str,
              mapping_dirs: list[str] | None = None) -> tuple[list[str], list[tuple[Any, ...]]]:
    tables = available_tables(store, mapping_dirs)
    if not tables:
        raise ConfigError(f"no canonical tables in {store.url}: run a sync first")
    con = duckdb.connect()
    # Delta files written by delta-rs carry string_view columns that pyarrow's dataset
    # filters cannot compare with plain strings; filters run in DuckDB instead.
    con.execute("SET disabled_optimizers = 'filter_pushdown'")
    try:
        for name, dataset in tables.items():
            con.register(name, dataset)
        try:
            rel = con.sql(sql)
        except duckdb.Error as exc:
            raise TerminalError(f"query failed: {str(exc).splitlines()[0]}") from None
        if rel is None:
            return [], []
        return list(rel.columns), rel.fetchall()
    finally:
        con.close()
