"""All JSON goes through here: orjson for documents, msgspec ``Raw`` for pages.

Pages are never turned into Python objects on the extraction hot path: :func:`raw_at` walks a
dotted path over raw JSON text (validating what it skips) and :func:`raw_items` splits an
array into its items' own text.
"""

from __future__ import annotations

from typing import Any

import msgspec
import orjson


def dumps(value: Any) -> bytes:
    return orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS)


def dumps_str(value: Any) -> str:
    return dumps(value).decode()


def loads(data: bytes | bytearray | memoryview | str) -> Any:
    return orjson.loads(data)


JSONDecodeError = orjson.JSONDecodeError
MalformedJSON = msgspec.DecodeError  # raised by raw_at/raw_items for text that is not JSON

_OBJECT = dict[str, msgspec.Raw]
_ARRAY = list[msgspec.Raw]


def raw_at(text: bytes, path: str) -> bytes | None:
    """The JSON text at a dotted path; None when a step is missing or not an object."""
    node: bytes | msgspec.Raw = text
    for part in path.split("."):
        try:
            obj = msgspec.json.decode(node, type=_OBJECT)
        except msgspec.ValidationError:
            return None
        if part not in obj:
            return None
        node = obj[part]
    return bytes(node)


def raw_items(text: bytes) -> list[bytes] | None:
    """Each item's JSON text if ``text`` is an array; None otherwise."""
    try:
        return [bytes(item) for item in msgspec.json.decode(text, type=_ARRAY)]
    except msgspec.ValidationError:
        return None


def decode(text: bytes) -> Any:
    return msgspec.json.decode(text)
