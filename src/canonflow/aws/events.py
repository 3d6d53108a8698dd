"""The events the functions accept: canonflow's contracts, and the seed's shapes so an
existing deployment can move over one function at a time.

Transform events:

- a :class:`~canonflow.model.TransformRequest` payload (what the aggregator and the relay
  send): ``source_files`` or ``source_files_manifest`` selects file_specific mode;
- the seed's transform event: ``tenant_id``, ``service_name``, ``table_name`` and
  ``source_files`` (file_specific) or none (time_based, 72 h lookback by default); fields
  canonflow does not know are ignored (and named in the log);
- the legacy per-batch event carrying ``s3_key``: accepted, logged as legacy, processed in
  time_based mode re-reading the whole window, exactly as the legacy transform did (the
  rollback path). The key must lie under the table's raw prefix.

A seed event without a ``request_id`` gets a deterministic one (from its file list, or from
its ``s3_key``), so a redelivered event is recognised as a replay and skipped.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from canonflow import jsonio
from canonflow.errors import RequestRejected
from canonflow.model import ChunkSpec, TableRef, TransformRequest
from canonflow.transform.request import check_source_files

log = logging.getLogger("canonflow.aws")
_FIELDS = set(TransformRequest.model_fields)


@dataclass(frozen=True)
class TransformEvent:
    request: TransformRequest
    legacy: bool  # the per-batch event of the legacy trigger
    ignored: tuple[str, ...] = ()  # fields of the event canonflow does not use


def _digest(*parts: str) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()[:32]


def _document(event: Any) -> dict[str, Any]:
    if isinstance(event, str | bytes):
        try:
            event = jsonio.loads(event)
        except ValueError:
            raise RequestRejected("event is not JSON") from None
    if not isinstance(event, dict):
        raise RequestRejected(f"event is a {type(event).__name__}, not an object")
    return event


def parse_transform_event(event: Any) -> TransformEvent:
    doc = _document(event)
    try:
        table = TableRef.model_validate({k: doc.get(k) for k in (
            "tenant_id", "service_name", "table_name")})
    except ValidationError as exc:
        raise RequestRejected(f"transform event: {exc.errors()[0]['msg']}") from None
    if "s3_key" in doc and "source_files" not in doc and "source_files_manifest" not in doc:
        (key,) = check_source_files(table, [doc["s3_key"]])
        request = TransformRequest(
            tenant_id=table.tenant_id, service_name=table.service_name,
            table_name=table.table_name, job_id=doc.get("job_id"), trigger="per_batch",
            reprocess=True,  # the legacy transform re-read every file of its window
            lookback_hours=float(doc.get("lookback_hours", 72.0)),
            request_id=str(doc.get("request_id") or f"legacy:{_digest(key)}"))
        return TransformEvent(request, legacy=True,
                              ignored=tuple(sorted(set(doc) - _FIELDS - {"s3_key"})))
    fields = {k: v for k, v in doc.items() if k in _FIELDS}
    if "request_id" not in fields and fields.get("source_files") is not None:
        files: Any = fields["source_files"]
        if isinstance(files, list):
            fields["request_id"] = f"event:{_digest(table.label, *map(str, sorted(files)))}"
    try:
        request = TransformRequest.model_validate(fields)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(x) for x in first["loc"])
        raise RequestRejected(f"transform event: at {where}: {first['msg']}") from None
    return TransformEvent(request, legacy=False,
                          ignored=tuple(sorted(set(doc) - _FIELDS)))


def parse_chunk_event(event: Any) -> ChunkSpec:
    try:
        return ChunkSpec.model_validate(_document(event))
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(x) for x in first["loc"])
        raise RequestRejected(f"chunk event: at {where}: {first['msg']}") from None


def is_sqs(event: Any) -> bool:
    records = event.get("Records") if isinstance(event, dict) else None
    return isinstance(records, list) and bool(records) and all(
        isinstance(r, dict) and r.get("eventSource") == "aws:sqs" for r in records)
