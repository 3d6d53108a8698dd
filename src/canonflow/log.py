"""Structured logs on the stdlib: one JSON object per line (or readable text on a terminal),
the context of the work on every line, every string redacted
(:func:`canonflow.redact.redact`): a secret never reaches a log line.

Context: :func:`bind` adds fields (pipeline, tenant_id, job_id, chunk_id or request_id,
service, table) to every line logged inside it, in any canonflow logger, without passing
them to each call. Every process canonflow starts configures logging the same way: the CLI
(``--log-level``, ``--log-format``), local pool workers and Celery workers (from the
settings of the process that started them).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any

from canonflow import jsonio
from canonflow.redact import redact, redact_value
from canonflow.telemetry import tracing

_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}
_context: ContextVar[dict[str, Any] | None] = ContextVar("canonflow_log_context",
                                                        default=None)
FORMATS = ("auto", "json", "text")
_current: tuple[int, str] = (logging.WARNING, "auto")


def _plain(value: Any) -> Any:
    """JSON-compatible: containers walked, any other object as its text (to be redacted)."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_plain(v) for v in value]
    return str(value)


@contextmanager
def bind(**fields: Any) -> Iterator[None]:
    """Add ``fields`` to every line logged inside this block (None values are left out)."""
    token = _context.set({**(_context.get() or {}),
                          **{k: v for k, v in fields.items() if v is not None}})
    try:
        yield
    finally:
        _context.reset(token)


def bound() -> dict[str, Any]:
    """The fields bound to the current context (see :func:`bind`)."""
    return dict(_context.get() or {})


class _ContextFilter(logging.Filter):
    """Puts the bound context on each record (and the trace and span ids inside a span);
    a call's own extras win."""

    def filter(self, record: logging.LogRecord) -> bool:
        for key, value in (_context.get() or {}).items():
            if not hasattr(record, key):
                setattr(record, key, value)
        if (ids := tracing.ids()) is not None and not hasattr(record, "trace_id"):
            record.trace_id, record.span_id = ids
        return True


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    return {k: _plain(v) for k, v in vars(record).items() if k not in _STANDARD}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": record.getMessage(),
            "pid": record.process,
        }
        doc.update(_fields(record))
        if record.exc_info and record.exc_info[1] is not None:
            doc["exception"] = repr(record.exc_info[1])
        if record.stack_info:
            doc["stack"] = record.stack_info
        return jsonio.dumps(redact_value(doc)).decode()


def _text(value: Any) -> str:
    if isinstance(value, str) and value and " " not in value:
        return value
    return jsonio.dumps(value).decode()


class TextFormatter(logging.Formatter):
    """``12:00:01.234 WARNING canonflow.chunk: chunk failed chunk_id=... error=...``"""

    def format(self, record: logging.LogRecord) -> str:
        ts = datetime.fromtimestamp(record.created).strftime("%H:%M:%S.%f")[:-3]
        fields = " ".join(f"{k}={_text(v)}" for k, v in _fields(record).items())
        line = f"{ts} {record.levelname:<7} {record.name}: {record.getMessage()}"
        if fields:
            line += f" {fields}"
        if record.exc_info and record.exc_info[1] is not None:
            line += f" exception={record.exc_info[1]!r}"
        return redact(line)


def parse_level(level: int | str) -> int:
    if isinstance(level, int):
        return level
    value = logging.getLevelName(level.upper())
    if not isinstance(value, int):
        from canonflow.errors import ConfigError
        raise ConfigError(f"unknown log level {level!r}: use debug, info, warning or error")
    return value


def configure(level: int | str = logging.WARNING, fmt: str = "auto") -> None:
    """Log canonflow's lines at ``level`` to stderr, as JSON or text (``auto``: text on a
    terminal, JSON otherwise)."""
    global _current
    if fmt not in FORMATS:
        from canonflow.errors import ConfigError
        raise ConfigError(f"unknown log format {fmt!r}: use {', '.join(FORMATS)}")
    number = parse_level(level)
    _current = (number, fmt)
    text = fmt == "text" or (fmt == "auto" and sys.stderr.isatty())
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(TextFormatter() if text else JsonFormatter())
    handler.addFilter(_ContextFilter())
    root = logging.getLogger("canonflow")
    root.handlers[:] = [handler]
    root.setLevel(number)
    root.propagate = False


def current() -> tuple[int, str]:
    """The level and format last configured: what worker processes are started with."""
    return _current


def at_least(level: int) -> None:
    """Lower the level to ``level`` if it is higher (``--verbose``), keeping the format."""
    if _current[0] > level:
        configure(level, _current[1])
