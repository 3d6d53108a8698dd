"""Structured logs: stdlib logging, one JSON object per line, extras included, every string
in it redacted (:func:`canonflow.redact.redact`): a secret never reaches a log line."""

from __future__ import annotations

import logging
import sys
from datetime import UTC, datetime
from typing import Any

from canonflow import jsonio
from canonflow.redact import redact_value

_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


def _plain(value: Any) -> Any:
    """JSON-compatible: containers walked, any other object as its text (to be redacted)."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_plain(v) for v in value]
    return str(value)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": record.getMessage(),
        }
        doc.update({k: _plain(v) for k, v in vars(record).items() if k not in _STANDARD})
        if record.exc_info and record.exc_info[1] is not None:
            doc["exception"] = repr(record.exc_info[1])
        if record.stack_info:
            doc["stack"] = record.stack_info
        return jsonio.dumps(redact_value(doc)).decode()


def configure(level: int = logging.WARNING) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger("canonflow")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False
