"""One contract for every object store backend (parametrized over the URLs)."""

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from canonflow.errors import ConfigError, InvalidIdentifier
from canonflow.stores import ObjectStore, open_object_store


@pytest.fixture(params=["file", "memory", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ObjectStore]:
    if request.param == "s3":
        url = request.getfixturevalue("s3_url")
    else:
        url = {"file": f"file://{tmp_path / 'objects'}", "memory": "memory://"}[request.param]
    yield open_object_store(url)


def test_put_get_roundtrip(store: ObjectStore) -> None:
    store.put("raw/a/b/c/part-0", b"hello")
    assert store.get("raw/a/b/c/part-0") == b"hello"
    assert store.exists("raw/a/b/c/part-0")
    assert not store.exists("raw/a/b/c/part-1")


def test_overwrite_replaces_and_create_only_refuses(store: ObjectStore) -> None:
    store.put("k/1", b"one")
    store.put("k/1", b"two")
    assert store.get("k/1") == b"two"
    with pytest.raises(FileExistsError):
        store.put("k/1", b"three", create_only=True)
    assert store.get("k/1") == b"two"
    store.put("k/2", b"new", create_only=True)
    assert store.get("k/2") == b"new"


def test_missing_key_is_file_not_found(store: ObjectStore) -> None:
    with pytest.raises(FileNotFoundError):
        store.get("nope/x")


def test_list_by_prefix_with_sizes_and_times(store: ObjectStore) -> None:
    before = datetime.now(UTC) - timedelta(seconds=5)
    store.put("raw/t/s/contacts/j/c/part-00000", b"12345")
    store.put("raw/t/s/contacts/j/c/part-00001", b"1")
    store.put("raw/t/s/contactsX/j/c/part-00000", b"1")
    store.put("raw/u/s/contacts/j/c/part-00000", b"1")
    listed = sorted(store.list("raw/t/s/contacts/"), key=lambda o: o.key)
    assert [o.key for o in listed] == ["raw/t/s/contacts/j/c/part-00000",
                                       "raw/t/s/contacts/j/c/part-00001"]
    assert listed[0].size == 5
    assert all(o.last_modified.tzinfo is not None and o.last_modified >= before for o in listed)


def test_list_of_an_absent_prefix_is_empty(store: ObjectStore) -> None:
    assert list(store.list("raw/none/")) == []


def test_delete_removes_what_it_names_and_a_missing_key_is_no_error(
        store: ObjectStore) -> None:
    keys = [f"plan/t/s/contacts/job-1/c-{i}/page-00001.json" for i in range(3)]
    for key in [*keys, "plan/t/s/contacts/job-2/c-0/page-00001.json"]:
        store.put(key, b"{}")
    store.delete([*keys[:2], "plan/t/s/contacts/job-9/c-0/page-00001.json"])
    assert sorted(o.key for o in store.list("plan/")) == [
        keys[2], "plan/t/s/contacts/job-2/c-0/page-00001.json"]
    store.delete([keys[2]])
    store.delete([])
    assert [o.key for o in store.list("plan/")] == [
        "plan/t/s/contacts/job-2/c-0/page-00001.json"]
    with pytest.raises(InvalidIdentifier):
        store.delete(["plan/../../outside"])


def test_a_local_store_drops_the_job_folders_a_delete_empties(tmp_path: Path) -> None:
    store = open_object_store(f"file://{tmp_path}")
    store.put("plan/t/s/contacts/job-1/c-0/page-00001.json", b"{}")
    store.put("plan/t/s/contacts/job-1/c-1/page-00001.json", b"{}")
    store.put("plan/t/s/contacts/job-2/c-0/page-00001.json", b"{}")
    store.delete(["plan/t/s/contacts/job-1/c-0/page-00001.json",
                  "plan/t/s/contacts/job-1/c-1/page-00001.json"])
    assert sorted(p.name for p in (tmp_path / "plan/t/s/contacts").iterdir()) == ["job-2"]
    store.delete(["plan/t/s/contacts/job-2/c-0/page-00001.json"])
    assert (tmp_path / "plan/t/s/contacts").is_dir()  # the table's folder stays
    assert list((tmp_path / "plan/t/s/contacts").iterdir()) == []


def test_read_times_match_the_listing_and_a_directory_is_no_object(store: ObjectStore) -> None:
    store.put("t/a/one", b"1")
    (listed,) = store.list("t/a/")
    _, modified = store.get_object("t/a/one")
    assert abs((modified - listed.last_modified).total_seconds()) < 1
    assert modified.tzinfo is not None
    with pytest.raises(FileNotFoundError):
        store.get("t/a")  # a prefix, not an object


def test_of_writers_creating_one_key_at_once_exactly_one_wins(store: ObjectStore) -> None:
    from concurrent.futures import ThreadPoolExecutor

    def create(i: int) -> bool:
        try:
            store.put("race/key", f"writer {i}".encode(), create_only=True)
        except FileExistsError:
            return False
        return True

    with ThreadPoolExecutor(8) as pool:
        won = [i for i, ok in enumerate(pool.map(create, range(16))) if ok]
    assert len(won) == 1
    assert store.get("race/key") == f"writer {won[0]}".encode()
    assert [o.key for o in store.list("race/")] == ["race/key"]


def test_a_reader_sees_a_whole_object_or_none_while_it_is_written(
        store: ObjectStore) -> None:
    """Overwrites replace an object whole: a reader, or a listing, in between never sees a
    part of one, nor a write in progress."""
    import threading

    old, new = b"a" * 4_000_000, b"b" * 4_000_000
    store.put("big/obj", old)
    done = threading.Event()
    seen: set[bytes] = set()
    listed: set[str] = set()

    def read() -> None:
        while not done.is_set():
            data = store.get("big/obj")
            seen.add(data[:1] + data[-1:] + str(len(data)).encode())
            listed.update(o.key for o in store.list("big/"))

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for _ in range(10):
            store.put("big/obj", new)
            store.put("big/obj", old)
    finally:
        done.set()
        reader.join()
    assert seen <= {b"aa4000000", b"bb4000000"}
    assert listed == {"big/obj"}


def test_keys_that_leave_the_store_are_refused(store: ObjectStore) -> None:
    for key in ("../outside", "a/../../outside"):
        with pytest.raises(InvalidIdentifier):
            store.put(key, b"x")
        with pytest.raises(InvalidIdentifier):
            store.get(key)
    assert list(store.list("")) == []


def test_unknown_scheme_names_the_known_ones() -> None:
    with pytest.raises(ConfigError, match="file://, memory://, s3://"):
        open_object_store("ftp://x")


def test_s3_url_options_are_checked() -> None:
    with pytest.raises(ConfigError, match="unknown option"):
        open_object_store("s3://bucket/p?endpont=http://x")
    with pytest.raises(ConfigError, match="names no bucket"):
        open_object_store("s3:///p")


def test_delta_tables_on_s3_take_concurrent_commits(s3_url: str) -> None:
    """Two writers commit to one Delta table on S3 at once: put-if-absent commits, a retry
    for the loser, no commit lost."""
    from concurrent.futures import ThreadPoolExecutor

    import pyarrow as pa
    from deltalake import DeltaTable

    from canonflow.transform.writer import QUARANTINE_SCHEMA, CanonicalWriter

    writer = CanonicalWriter(open_object_store(s3_url))
    row = {name: [None] for name in QUARANTINE_SCHEMA.names} | {"_tenant_id": ["acme"]}
    batch = pa.table(row, schema=QUARANTINE_SCHEMA)
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda g: writer.quarantine(batch, "r", g), range(8)))
    uri, opts = writer.uri("quarantine")
    table = DeltaTable(uri, storage_options=opts)
    assert table.to_pyarrow_table().num_rows == 8
    assert writer.committed_groups("quarantine", "r") == {str(g) for g in range(8)}
