"""Which raw files a transform reads: the listed ones, or the table's recent ones."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from canonflow import jsonio
from canonflow.errors import RequestRejected
from canonflow.model import ProcessingMode, TransformRequest
from canonflow.stores.object_store import ObjectStore
from canonflow.transform.request import check_manifest_key, check_source_files


def resolve_files(request: TransformRequest, objects: ObjectStore) -> list[str]:
    """file_specific: exactly the listed keys, validated before any raw read.
    time_based: every file under the table's raw prefix modified within the lookback."""
    table = request.table
    if request.processing_mode is ProcessingMode.FILE_SPECIFIC:
        keys: list[object] = list(request.source_files or [])
        if request.source_files_manifest is not None:
            manifest = check_manifest_key(table, request.source_files_manifest)
            try:
                listed = jsonio.loads(objects.get(manifest))
            except FileNotFoundError:
                raise RequestRejected(f"source files manifest {manifest!r} not found") from None
            except jsonio.JSONDecodeError:
                raise RequestRejected(f"source files manifest {manifest!r} is not JSON") from None
            if not isinstance(listed, list):
                raise RequestRejected(f"source files manifest {manifest!r} is not a list")
            keys += listed
        return list(dict.fromkeys(check_source_files(table, keys)))
    cutoff = datetime.now(UTC) - timedelta(hours=request.lookback_hours)
    return sorted(o.key for o in objects.list(table.raw_prefix) if o.last_modified >= cutoff)
