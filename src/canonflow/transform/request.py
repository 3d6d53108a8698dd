"""Validate a transform request before anything is read (tenant isolation, invariant 4)."""

from __future__ import annotations

from collections.abc import Sequence

from canonflow.errors import RequestRejected
from canonflow.model import TableRef

MANIFEST_ROOT = "manifests"


def manifest_prefix(table: TableRef) -> str:
    return f"{MANIFEST_ROOT}/{table.tenant_id}/{table.service_name}/{table.table_name}/"


def _check_key(key: object, prefix: str, what: str) -> str:
    if not isinstance(key, str) or not key:
        raise RequestRejected(f"{what} {key!r} is not an object key")
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in key) or "\\" in key:
        raise RequestRejected(f"{what} {key!r} contains control characters or backslashes")
    parts = key.split("/")
    if key.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise RequestRejected(f"{what} {key!r} is not a normalized relative key")
    if not key.startswith(prefix):
        raise RequestRejected(f"{what} {key!r} lies outside {prefix!r}")
    return key


def check_source_files(table: TableRef, keys: Sequence[object]) -> list[str]:
    """Every key must lie under ``raw/{tenant}/{service}/{table}/``; reject the whole request
    on the first one that does not."""
    prefix = table.raw_prefix
    return [_check_key(k, prefix, "source file") for k in keys]


def check_manifest_key(table: TableRef, key: str) -> str:
    return _check_key(key, manifest_prefix(table), "source files manifest")
