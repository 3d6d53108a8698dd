from canonflow.chunk import encode_batch
from canonflow.transform.reader import read_raw

KEY = "raw/acme/crm/contacts/j/c/part-00000.jsonl.zst"


def test_fast_path_reads_typed_nested_columns() -> None:
    data = encode_batch([b'{"id": "1", "p": {"e": "a@x"}}', b'{"id": "2", "p": {"e": "b@x"}}'])
    raw = read_raw(KEY, data, ["id", "p.e"])
    assert raw.broken == []
    assert raw.columns.get("p.e").to_pylist() == ["a@x", "b@x"]
    assert raw.raw_line(1) == b'{"id": "2", "p": {"e": "b@x"}}'


def test_broken_lines_are_kept_with_their_line_number() -> None:
    data = encode_batch([b'{"id": "1"}', b'{"id": ', b'[1, 2]', b'{"id": "4"}'])
    raw = read_raw(KEY, data, ["id"])
    assert [(n, why.split(" at ")[0]) for n, _, why in raw.broken] == [
        (1, "invalid JSON"), (2, "record is not a JSON object")]
    assert raw.columns.get("id").to_pylist() == ["1", "4"]
    assert raw.line_number(1) == 3 and raw.raw_line(1) == b'{"id": "4"}'


def test_a_field_whose_type_changes_is_read_as_text() -> None:
    data = encode_batch([b'{"id": 1, "n": 5}', b'{"id": "x2", "n": "five"}'])
    raw = read_raw(KEY, data, ["id", "n"])
    assert raw.columns.get("id").to_pylist() == ["1", "x2"]
    assert raw.columns.num_rows == 2
