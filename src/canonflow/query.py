"""SQL over canonical tables: DuckDB scanning the current version of each Delta table as an
Arrow dataset, with its filters pushed down: a query for one tenant opens only that
tenant's files, and files whose Delta statistics rule a filter out are never opened.

Why the dataset is wrapped (:class:`_PushdownDataset`): files written by a Delta merge carry
``string_view`` columns, others plain ``string``. DuckDB pushes no filter at all into a
dataset whose schema has view types, and pyarrow cannot compare a pushed-down string filter
with the ``string_view`` statistics or arrays of such a file ("no kernel matching (string,
string_view)"). So the dataset keeps plain strings; its scanner prunes files by their
partition values and Delta statistics (the fragments' expressions, compared in plain
strings), reads the survivors without the filter, casts views back to plain strings, and only
then applies the filter.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.dataset as pds
import pyarrow.fs as pa_fs
from deltalake import DeltaTable
from deltalake.exceptions import TableNotFoundError
from deltalake.fs import DeltaStorageHandler

from canonflow.errors import ConfigError, TerminalError
from canonflow.mappings.catalog import inspect_catalog
from canonflow.stores.object_store import ObjectStore
from canonflow.transform.versions import VERSIONS_SUFFIX, Versioning, ident
from canonflow.transform.writer import QUARANTINE_TABLE, canonical_path

_PLAIN = {pa.string_view(): pa.string(), pa.binary_view(): pa.binary()}

TableUris = dict[str, tuple[str, dict[str, str]]]  # SQL name -> (uri, storage options)


@dataclass
class Scan:
    """The data files a query opened, of those its tables hold."""

    total: int = 0
    opened: set[str] = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def files_read(self) -> int:
        return len(self.opened)


class _Counting(pa_fs.FileSystemHandler):  # type: ignore[misc]
    """Delegates to delta-rs's handler; records which files are opened."""

    def __init__(self, inner: Any, scan: Scan, root: str) -> None:
        self.inner, self.scan, self.root = inner, scan, root

    def _opened(self, path: str) -> None:
        with self.scan.lock:
            self.scan.opened.add(self.root + path)

    def open_input_file(self, path: str) -> Any:
        self._opened(path)
        return self.inner.open_input_file(path)

    def open_input_stream(self, path: str) -> Any:
        self._opened(path)
        return self.inner.open_input_stream(path)

    def get_type_name(self) -> str:
        return f"counting+{self.inner.get_type_name()}"

    def equals(self, other: Any) -> bool:
        return self is other

    def normalize_path(self, path: str) -> str:
        return str(self.inner.normalize_path(path))

    def get_file_info(self, paths: list[str]) -> Any:
        return self.inner.get_file_info(paths)

    def get_file_info_selector(self, selector: Any) -> Any:
        return self.inner.get_file_info_selector(selector)

    def _read_only(self, *_: Any) -> Any:
        raise OSError("canonical tables are read-only here")

    create_dir = delete_dir = delete_dir_contents = delete_root_dir_contents = _read_only
    delete_file = move = copy_file = open_output_stream = open_append_stream = _read_only


class _PushdownDataset(pds.FileSystemDataset):  # type: ignore[misc]
    """A Delta table's dataset whose scanner tolerates ``string_view`` files (see above)."""

    def scanner(self, columns: list[str] | None = None, filter: pds.Expression | None = None,
                **options: Any) -> pds.Scanner:
        if filter is None:
            fragments = list(self.get_fragments())
            needed = list(columns) if columns is not None else self.schema.names
        else:  # files pruned by partition values and statistics; the filter's columns read
            fragments = list(self.get_fragments(filter=filter))
            text = str(filter)
            needed = list(columns) if columns is not None else list(self.schema.names)
            needed += [n for n in self.schema.names if n not in needed
                       and re.search(rf"(?<![\w.]){re.escape(n)}(?!\w)", text)]
        inner = pds.FileSystemDataset(fragments, self.schema, self.format,
                                      self.filesystem).scanner(columns=needed, **options)
        plain = pa.schema([f.with_type(_PLAIN.get(f.type, f.type))
                           for f in inner.projected_schema])
        batches = (b.cast(plain) for b in inner.to_batches())
        return pds.Scanner.from_batches(batches, schema=plain, filter=filter, columns=columns)


def delta_dataset(table: DeltaTable, storage_options: dict[str, str] | None,
                  scan: Scan | None = None) -> pds.Dataset:
    """The table's current version as a dataset DuckDB pushes filters into; with
    ``scan``, the files it opens are recorded there."""
    filesystem = None
    if scan is not None:
        adds = pa.table(table.get_add_actions(flatten=True))
        sizes = dict(zip(adds.column("path").to_pylist(), adds.column("size_bytes").to_pylist(),
                         strict=True))
        scan.total += len(sizes)
        filesystem = pa_fs.PyFileSystem(_Counting(
            DeltaStorageHandler(table.table_uri, storage_options or None, sizes), scan,
            table.table_uri))
    base = table.to_pyarrow_dataset(filesystem=filesystem)
    return _PushdownDataset(list(base.get_fragments()), base.schema, base.format,
                            base.filesystem)


def quote(text: str) -> str:
    """``text`` as a SQL string literal."""
    return "'" + text.replace("'", "''") + "'"


def register(con: duckdb.DuckDBPyConnection, tables: TableUris,
             scan: Scan | None = None) -> list[str]:
    """Register each existing Delta table (SQL name -> (uri, storage options)) on ``con``;
    the names registered. A merge-on-read table is a view of each key's current version
    (its versions are ``<name>__versions``); a tenant filter still reaches the scan, as the
    tenant is one of the view's window partitions."""
    registered = []
    for sql_name, (uri, opts) in tables.items():
        try:
            table = DeltaTable(uri, storage_options=opts or None)
        except TableNotFoundError:
            continue
        dataset = delta_dataset(table, opts, scan)
        versioning = Versioning.from_properties(table.metadata().configuration)
        if versioning is None:
            con.register(sql_name, dataset)
        else:
            versions = sql_name + VERSIONS_SUFFIX
            con.register(versions, dataset)
            con.execute(f"CREATE OR REPLACE TEMP VIEW {ident(sql_name)} AS "
                        + versioning.current_sql(ident(versions)))
        registered.append(sql_name)
    return registered


def canonical_tables(store: ObjectStore, mapping_dirs: list[str] | None = None) -> TableUris:
    """Every entity's table (the user's entities of ``mapping_dirs`` too), plus
    ``quarantine``, by SQL name (whether it exists or not). A mapping that cannot work does
    not keep the tables from being read."""
    entities = inspect_catalog(mapping_dirs or []).catalog.entities
    names = {e: canonical_path(e) for e in entities}
    names[QUARANTINE_TABLE] = QUARANTINE_TABLE
    return {sql_name: store.delta_uri(path) for sql_name, path in names.items()}


def existing_tables(store: ObjectStore, mapping_dirs: list[str] | None = None) -> list[str]:
    """The SQL names of the canonical tables (and ``quarantine``) that exist."""
    with connect() as con:
        return register(con, canonical_tables(store, mapping_dirs))


@contextmanager
def connect() -> Iterator[duckdb.DuckDBPyConnection]:
    con = duckdb.connect()
    try:
        yield con
    finally:
        con.close()


def fetch(con: duckdb.DuckDBPyConnection, sql: str,
          params: list[Any] | None = None) -> tuple[list[str], list[tuple[Any, ...]]]:
    """Run ``sql``; any DuckDB error is one terminal line."""
    try:
        rel = con.execute(sql, params) if params is not None else con.sql(sql)
        if rel is None:
            return [], []
        return [d[0] for d in rel.description or []], rel.fetchall()
    except duckdb.Error as exc:
        raise TerminalError(f"query failed: {str(exc).splitlines()[0]} (DuckDB SQL over the "
                            "tables `canonflow entities` lists)") from None


def run_query(store: ObjectStore, sql: str, mapping_dirs: list[str] | None = None,
              scan: Scan | None = None) -> tuple[list[str], list[tuple[Any, ...]]]:
    """Run ``sql`` over the tables it names (only those are opened, and ``scan`` counts
    their files only); when it names none that exists, over all of them."""
    tables = canonical_tables(store, mapping_dirs)
    with connect() as con:
        named = referenced(con, sql)
        used = {name: where for name, where in tables.items()
                if name in named or name + VERSIONS_SUFFIX in named}
        if not register(con, used, scan) and not register(con, tables, scan):
            raise ConfigError(f"no canonical tables in {store.url}: run a sync first")
        return fetch(con, sql)


def referenced(con: duckdb.DuckDBPyConnection, sql: str) -> set[str]:
    """The table names ``sql`` reads (empty when DuckDB cannot parse it: running it then
    reports the error)."""
    try:
        return set(con.get_table_names(sql))
    except duckdb.Error:
        return set()
