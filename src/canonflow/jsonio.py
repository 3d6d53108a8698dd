"""All JSON goes through here: orjson for documents, msgspec ``Raw`` for pages.

Pages are never turned into Python objects on the extraction hot path: :func:`raw_at` walks a
dotted path over raw JSON text (validating what it skips) and :func:`raw_items` splits an
array into its items' own text.
"""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal
from typing import Any

import msgspec
import orjson


def dumps(value: Any) -> bytes:
    return orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS)


def dumps_str(value: Any) -> str:
    return dumps(value).decode()


def _plain(value: Any) -> Any:
    """Values orjson has no encoding for, as JSON: a decimal as its exact text (a float
    would round it), a duration in seconds, bytes as hex, anything else as its text."""
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, timedelta):
        return value.total_seconds()
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).hex()
    return str(value)


def dumps_rows(value: Any) -> str:
    """Query results: datetimes and dates as ISO text, decimals as exact text."""
    return orjson.dumps(value, default=_plain, option=orjson.OPT_NON_STR_KEYS).decode()


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
