"""A table version's files by tenant partition (:mod:`canonflow.transform.partitions`) give
the same files and rows as Delta's own filtered reader, on local files and on S3, and an
index never outlives the version it was read from."""

from __future__ import annotations

import shutil
from pathlib import Path

import pyarrow as pa
import pytest
from deltalake import DeltaTable, write_deltalake

from canonflow.stores.obstore_backend import ObstoreObjectStore
from canonflow.transform.partitions import partition_index


@pytest.fixture(params=["file", "s3"])
def table_place(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, dict[str, str]]:
    url = f"file://{tmp_path}/store" if request.param == "file" else request.getfixturevalue(
        "s3_url")
    return ObstoreObjectStore(url).delta_uri("canonical/contact")


def rows(tenant: str, ids: range) -> pa.Table:
    return pa.table({"_tenant_id": [tenant] * len(ids), "id": [f"{tenant}-{i}" for i in ids],
                     "n": list(ids)})


def delta_rows(table: DeltaTable, tenant: str) -> list[dict[str, object]]:
    got = table.to_pyarrow_dataset(
        file_pruning_predicate=[("_tenant_id", "=", tenant)]).to_table()
    return sorted(got.to_pylist(), key=lambda r: str(r["id"]))


def test_a_tenants_files_and_rows_are_the_ones_delta_lists(
        table_place: tuple[str, dict[str, str]]) -> None:
    uri, options = table_place
    opts = options or None
    for tenant, ids in (("acme", range(3)), ("globex", range(5)), ("acme", range(3, 7))):
        write_deltalake(uri, rows(tenant, ids), mode="append", partition_by=["_tenant_id"],
                        storage_options=opts)
    table = DeltaTable(uri, storage_options=opts)
    index = partition_index(table, options)
    assert len(index.files("acme")) == 2 and len(index.files("globex")) == 1
    assert index.files("initech") == [] and index.dataset("initech") is None
    for tenant in ("acme", "globex"):
        dataset = index.dataset(tenant)
        assert dataset is not None
        got = sorted(dataset.to_table().to_pylist(), key=lambda r: str(r["id"]))
        assert got == delta_rows(table, tenant)
        assert {r["_tenant_id"] for r in got} == {tenant}
    # the same version: the same index; a new version: its own, the old one unchanged
    assert partition_index(DeltaTable(uri, storage_options=opts), options) is index
    write_deltalake(uri, rows("initech", range(2)), mode="append",
                    partition_by=["_tenant_id"], storage_options=opts)
    table.update_incremental()
    newer = partition_index(table, options)
    assert newer is not index and len(newer.files("initech")) == 1
    assert index.files("initech") == []
    dataset = newer.dataset("initech")
    assert dataset is not None and dataset.to_table().num_rows == 2


def test_a_table_made_again_in_the_same_place_is_indexed_again(tmp_path: Path) -> None:
    uri = str(tmp_path / "contact")
    write_deltalake(uri, rows("acme", range(3)), partition_by=["_tenant_id"])
    first = partition_index(DeltaTable(uri))
    shutil.rmtree(uri)
    write_deltalake(uri, rows("globex", range(2)), partition_by=["_tenant_id"])
    again = partition_index(DeltaTable(uri))  # version 0 again, other files
    assert again is not first
    assert again.files("acme") == [] and len(again.files("globex")) == 1
