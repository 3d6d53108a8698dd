"""A canonical table version's data files by tenant partition.

Finding one tenant's files with a filtered ``file_uris`` or ``to_pyarrow_dataset`` reads the
entry of every file of the table on each call: a cost that grows with the number of tenants
and syncs the table has seen, paid several times by every request a transform writes. The
index reads a version's add actions once; after that a tenant's files, and a dataset of
them, cost a dictionary look-up. A version's files never change, so an index is kept for
the few versions a process used last.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from urllib.parse import unquote, urlparse

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.fs as pafs
from deltalake import DeltaTable
from deltalake.fs import DeltaStorageHandler

PARTITION = "_tenant_id"
KEPT = 16  # indexes kept per process: a worker writes a handful of tables at a time

_FORMAT = pads.ParquetFileFormat(
    default_fragment_scan_options=pads.ParquetFragmentScanOptions(pre_buffer=True))


class PartitionIndex:
    """One table version's data files (paths relative to the table) per tenant."""

    def __init__(self, table: DeltaTable, storage_options: dict[str, str] | None) -> None:
        actions = pa.table(table.get_add_actions(flatten=True))
        paths = actions.column("path").to_pylist()
        tenants = (actions.column(f"partition.{PARTITION}").to_pylist()
                   if f"partition.{PARTITION}" in actions.column_names else [None] * len(paths))
        self._files: dict[str | None, list[str]] = {}
        for path, tenant in zip(paths, tenants, strict=True):
            self._files.setdefault(tenant, []).append(path)
        self._sizes = dict(zip(paths, actions.column("size_bytes").to_pylist(), strict=True))
        self._uri = table.table_uri
        self._options = storage_options
        self._schema = pa.schema(table.schema().to_arrow())
        self._filesystem: pafs.FileSystem | None = None

    def files(self, tenant_id: str) -> list[str]:
        """The tenant partition's files (none: the tenant has no rows in this version)."""
        return list(self._files.get(tenant_id, ()))

    def dataset(self, tenant_id: str) -> pads.Dataset | None:
        """The tenant's partition as a dataset (its ``_tenant_id`` column from the partition
        value, as Delta's own reader gives it); None when it has no files."""
        files = self._files.get(tenant_id)
        if not files:
            return None
        filesystem = self._fs()
        value = pc.field(PARTITION) == pa.scalar(tenant_id, pa.string())
        fragments = [_FORMAT.make_fragment(path, filesystem=filesystem,
                                           partition_expression=value) for path in files]
        return pads.FileSystemDataset(fragments, self._schema, _FORMAT, filesystem)

    def _fs(self) -> pafs.FileSystem:
        if self._filesystem is None:
            parsed = urlparse(self._uri)
            if parsed.scheme == "file":  # read directly, not through Python callbacks
                self._filesystem = pafs.SubTreeFileSystem(unquote(parsed.path),
                                                          pafs.LocalFileSystem())
            else:
                self._filesystem = pafs.PyFileSystem(DeltaStorageHandler(
                    self._uri, self._options, self._sizes))
        return self._filesystem


_kept: OrderedDict[tuple[str, str, int], PartitionIndex] = OrderedDict()
_lock = threading.Lock()


def partition_index(table: DeltaTable,
                    storage_options: dict[str, str] | None = None) -> PartitionIndex:
    """The index of ``table``'s version (the table's id is part of the key: a table dropped
    and made again at the same place starts again at version 0 with other files)."""
    key = (table.table_uri, str(table.metadata().id), table.version())
    with _lock:
        index = _kept.get(key)
        if index is not None:
            _kept.move_to_end(key)
            return index
    index = PartitionIndex(table, storage_options)
    with _lock:
        _kept[key] = index
        while len(_kept) > KEPT:
            _kept.popitem(last=False)
    return index
