"""State store on DynamoDB (boto3): one table, conditional writes and transactions.

``dynamodb://TABLE?region=us-east-1&endpoint=http://127.0.0.1:8000`` names the table (the
endpoint is for DynamoDB-compatible servers). Credentials come from the standard AWS chain
(environment, profile, instance or web identity), never from the URL.

Key design (one table, ``pk`` / ``sk`` strings; docs/architecture.md says why each condition
is there):

=============================  ==============================  ============================
item                           pk                              sk
=============================  ==============================  ============================
job                            ``JOB#{job}``                   ``#JOB``
chunk spec                     ``JOB#{job}``                   ``CHUNK#{chunk}``
chunk result                   ``JOB#{job}``                   ``RESULT#{chunk}``
job event                      ``JOB#{job}``                   ``EVENT#{at}#{id}``
checkpoint                     ``JOB#{job}``                   ``CHECKPOINT#{chunk}``
large value, one part          owner's pk                      ``PART#{owner}#{digest}#{n}``
outbox row                     ``REQ#{request}``               ``#REQ``
ledger entry                   ``LEDGER#[tenant,service,tbl]`` the file key
sync cursor                    ``CURSOR#[tenant,service,tbl]`` ``#CURSOR``
lease                          ``LOCK#{name}``                 ``#LOCK``
active job of a tenant         ``ACTIVE#[pipeline,tenant]``    ``#ACTIVE``
=============================  ==============================  ============================

Two global secondary indexes, overloaded: ``gsi1`` lists jobs newest first (``JOBS``) and a
job's outbox rows (``JOBREQ#{job}``); ``gsi2`` lists unfinished jobs (``UNFINISHED``) and
open outbox rows (``OPEN``), sparse: the key is removed when the job or row finishes. Global
index reads are eventually consistent and only ever *find candidates*; every decision is a
conditional write on the item itself or a strongly consistent read of it. A local index,
``lsi1`` (sort key ``recorded_at``, on chunk results only), gives a runner's poll the
results recorded since its last look, strongly consistent, without reading the others.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import re
import time
import uuid
import zlib
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any
from urllib.parse import parse_qs, urlsplit

import boto3
import botocore.exceptions
from botocore.config import Config

from canonflow import jsonio, retry
from canonflow.errors import (
    ActiveJobExists,
    ConfigError,
    InvalidCompletion,
    StoreUnavailable,
    UnknownJob,
)
from canonflow.model import (
    TERMINAL,
    ChunkResult,
    ChunkSpec,
    JobStatus,
    TableRef,
    TransformRequest,
    TransformResult,
)
from canonflow.redact import redact
from canonflow.stores.state import (
    Activity,
    Backlog,
    Completion,
    JobEvent,
    JobRecord,
    Progress,
    RequestRecord,
    StateStore,
)

log = logging.getLogger("canonflow.stores.dynamodb")

OPEN_REQUEST = ("pending", "dispatched", "running")
RUNNING = JobStatus.RUNNING.value
AGGREGATING = JobStatus.AGGREGATING.value
ENQUEUED = JobStatus.TRANSFORMS_ENQUEUED.value
CANCELLED = JobStatus.CANCELLED.value
JOB_SK, REQ_SK = "#JOB", "#REQ"
CHECKPOINT_DAYS = 30  # an old checkpoint expires (TTL) this long after its last save
LEASE_GRACE = 86400  # an expired lease item is removed (TTL) a day after it lapsed

_TABLE_NAME = re.compile(r"[A-Za-z0-9_.\-]{3,255}")
_CREDENTIAL_OPTIONS = {"aws_access_key_id", "aws_secret_access_key", "aws_session_token",
                       "access_key", "secret_key", "access_key_id", "secret_access_key",
                       "session_token", "password", "token", "key", "secret", "profile"}
_RETRYABLE_CODES = {
    "ThrottlingException", "ProvisionedThroughputExceededException", "RequestLimitExceeded",
    "TransactionConflictException", "TransactionInProgressException", "InternalServerError",
    "InternalFailure", "ServiceUnavailable", "RequestTimeout", "RequestTimeoutException",
}
_RETRYABLE_REASONS = {"TransactionConflict", "ThrottlingError", "RequestLimitExceeded",
                      "ProvisionedThroughputExceeded", "InternalServerError"}


def _now() -> float:
    return time.time()


def _dt(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, tz=UTC)


# -- attribute values ---------------------------------------------------------------------
def _av(value: Any) -> dict[str, Any]:
    if value is None:
        return {"NULL": True}
    if isinstance(value, bool):
        return {"BOOL": value}
    if isinstance(value, str):
        return {"S": value}
    if isinstance(value, int | float | Decimal):
        return {"N": str(value)}
    if isinstance(value, bytes | bytearray):
        return {"B": bytes(value)}
    if isinstance(value, list | tuple):
        return {"L": [_av(v) for v in value]}
    if isinstance(value, dict):
        return {"M": {k: _av(v) for k, v in value.items()}}
    raise TypeError(f"cannot store {type(value).__name__} in DynamoDB")


def _py(av: dict[str, Any]) -> Any:
    kind, value = next(iter(av.items()))
    if kind == "S":
        return value
    if kind == "N":
        number = Decimal(value)
        return int(number) if number == number.to_integral_value() and "." not in value \
            else float(number)
    if kind == "B":
        return bytes(value)
    if kind == "BOOL":
        return bool(value)
    if kind == "NULL":
        return None
    if kind == "L":
        return [_py(v) for v in value]
    if kind == "M":
        return {k: _py(v) for k, v in value.items()}
    if kind == "SS":
        return set(value)
    raise TypeError(f"unexpected DynamoDB type {kind}")


def _item(av_item: dict[str, Any] | None) -> dict[str, Any] | None:
    return None if av_item is None else {k: _py(v) for k, v in av_item.items()}


def _key(pk: str, sk: str) -> dict[str, Any]:
    return {"pk": {"S": pk}, "sk": {"S": sk}}


def _job_pk(job_id: str) -> str:
    return f"JOB#{job_id}"


# a batch's unprocessed part (DynamoDB throttles by handing items back rather than failing
# the call) is sent again at most this often, after growing pauses
UNPROCESSED_TRIES = 10


def _unprocessed_pause(attempt: int) -> None:
    time.sleep(min(1.0, 0.02 * 2 ** attempt))


def _counted_in(row: dict[str, Any]) -> str | None:
    """The job whose ``open_requests`` counts this outbox row (none: no job, or a job the
    store did not know when the row was added)."""
    return None if row.get("uncounted") else row.get("job_id")


def _req_pk(request_id: str) -> str:
    return f"REQ#{request_id}"


def _composite(*parts: str) -> str:
    return jsonio.dumps_str(list(parts))


_NAME = re.compile(r"#([A-Za-z_][A-Za-z0-9_]*)")


def _expr(*expressions: str | None, values: dict[str, Any] | None = None) -> dict[str, Any]:
    """ExpressionAttributeNames for every ``#name`` in the expressions (every attribute is
    aliased: ``status``, ``total``, ``name`` and many more are reserved words) and the
    values, serialized."""
    names: dict[str, str] = {}
    for text in expressions:
        for name in _NAME.findall(text or ""):
            names[f"#{name}"] = name
    out: dict[str, Any] = {}
    if names:
        out["ExpressionAttributeNames"] = names
    if values:
        out["ExpressionAttributeValues"] = {k: _av(v) for k, v in values.items()}
    return out


def _in(attr: str, placeholder: str, options: Sequence[str]) -> tuple[str, dict[str, Any]]:
    """``#attr IN (:p0, :p1, ...)`` and its values."""
    values = {f":{placeholder}{i}": v for i, v in enumerate(options)}
    return f"#{attr} IN ({', '.join(values)})", values


# -- errors -------------------------------------------------------------------------------
class _ConditionFailed(Exception):
    """A conditional write's condition was false (the item as it is, when asked for)."""

    def __init__(self, item: dict[str, Any] | None) -> None:
        super().__init__("condition failed")
        self.item = item


class _Cancelled(Exception):
    """A transaction cancelled by a condition: one reason per action, in order."""

    def __init__(self, reasons: list[dict[str, Any]]) -> None:
        super().__init__("transaction cancelled")
        self.reasons = reasons

    def failed(self, index: int) -> bool:
        return self.reasons[index].get("Code") == "ConditionalCheckFailed"

    def item(self, index: int) -> dict[str, Any] | None:
        return _item(self.reasons[index].get("Item"))


def _code(exc: BaseException) -> str:
    if isinstance(exc, botocore.exceptions.ClientError):
        return str(exc.response.get("Error", {}).get("Code", ""))
    return ""


def _reasons(exc: botocore.exceptions.ClientError) -> list[dict[str, Any]]:
    reasons = exc.response.get("CancellationReasons")
    if reasons is None:  # some servers only put them in the message
        found = re.search(r"\[(.*)\]", str(exc.response.get("Error", {}).get("Message", "")))
        codes = [c.strip() for c in found.group(1).split(",")] if found else []
        reasons = [{"Code": c} for c in codes]
    return list(reasons)


def _transient(exc: BaseException) -> bool:
    """Worth trying the same request again: throttling, a concurrent transaction, a 5xx, a
    timeout or a dropped connection (every write here is idempotent on retry)."""
    if isinstance(exc, botocore.exceptions.HTTPClientError | botocore.exceptions.ConnectionError):
        return True
    code = _code(exc)
    if code in _RETRYABLE_CODES:
        return True
    if code == "TransactionCanceledException" and isinstance(exc, botocore.exceptions.ClientError):
        codes = {r.get("Code") for r in _reasons(exc)} - {"None", None}
        return bool(codes) and codes <= _RETRYABLE_REASONS
    return False


@dataclass(frozen=True, slots=True)
class _Location:
    table: str
    region: str | None
    endpoint: str | None


def parse_url(url: str) -> _Location:
    """``dynamodb://TABLE?region=R&endpoint=URL``; credentials in the URL are refused."""
    parts = urlsplit(url)
    if parts.scheme != "dynamodb":
        raise ConfigError("a DynamoDB state store URL starts with dynamodb://")
    if "@" in parts.netloc or parts.password or parts.username:
        raise ConfigError("dynamodb:// URL: credentials come from the standard AWS chain "
                          "(environment, profile, instance role), never from the URL")
    query = {k.lower(): v[-1] for k, v in parse_qs(parts.query).items()}
    if set(query) & _CREDENTIAL_OPTIONS:
        raise ConfigError("dynamodb:// URL: credentials come from the standard AWS chain "
                          "(environment, profile, instance role), never from the URL")
    unknown = set(query) - {"region", "endpoint"}
    if unknown:
        raise ConfigError(f"dynamodb:// URL: unknown option(s) {sorted(unknown)}; "
                          "use region= and endpoint=")
    table = parts.netloc + parts.path.rstrip("/")
    if not _TABLE_NAME.fullmatch(table):
        raise ConfigError(f"dynamodb:// URL: invalid table name {table[:60]!r} "
                          "(3-255 of letters, digits, '_', '-', '.')")
    endpoint = query.get("endpoint")
    if endpoint is not None:
        ep = urlsplit(endpoint)
        if ep.scheme not in ("http", "https") or not ep.hostname or ep.username or ep.password:
            raise ConfigError("dynamodb:// URL: endpoint= must be an http(s) URL "
                              "without credentials")
    return _Location(table, query.get("region"), endpoint)


class DynamoStateStore:
    """The protocol's atomic steps as DynamoDB conditional writes and transactions."""

    #: a compressed value larger than this is stored in parts beside its item (400 KB items)
    inline_limit = 120_000
    part_size = 300_000
    #: actions per transaction (DynamoDB: 100) and their bytes (DynamoDB: 4 MB)
    transaction_actions = 100
    transaction_bytes = 3_500_000

    def __init__(self, url: str, client: Any | None = None) -> None:
        self.url = url
        self._loc = parse_url(url)
        self.table = self._loc.table
        if client is None:
            session = boto3.session.Session()
            region = self._loc.region or session.region_name
            if not region:
                raise ConfigError("dynamodb:// needs a region: add ?region=... to the URL or "
                                  "set AWS_REGION")
            client = session.client(
                "dynamodb", region_name=region, endpoint_url=self._loc.endpoint,
                config=Config(retries={"total_max_attempts": 1}, connect_timeout=5,
                              read_timeout=20, max_pool_connections=32))
        self.client = client
        self._ready = False
        self._ensure_table()

    # -- plumbing ---------------------------------------------------------------------------
    def _safe_url(self) -> str:
        return f"dynamodb://{self.table}"

    def _call(self, operation: str, **kwargs: Any) -> dict[str, Any]:
        """One request, retried on transient errors (``retry.state_if``, logged); conditions
        that fail come back as :class:`_ConditionFailed` / :class:`_Cancelled`, anything else
        as a typed :class:`StoreUnavailable` or :class:`ConfigError` without secrets."""
        method = getattr(self.client, operation)
        try:
            response: dict[str, Any] = retry.state_if(_transient)(lambda: method(**kwargs))
            return response
        except botocore.exceptions.ClientError as exc:
            code = _code(exc)
            if code == "ConditionalCheckFailedException":
                raise _ConditionFailed(_item(exc.response.get("Item"))) from None
            if code == "TransactionCanceledException" and not _transient(exc):
                raise _Cancelled(_reasons(exc)) from None
            if code == "ResourceNotFoundException":
                raise StoreUnavailable(
                    f"state store {self._safe_url()}: the table does not exist "
                    "(canonflow db upgrade creates it)") from None
            if code in ("UnrecognizedClientException", "AccessDeniedException",
                        "InvalidSignatureException", "ExpiredTokenException"):
                raise ConfigError(f"state store {self._safe_url()}: AWS refused the "
                                  f"credentials ({code})") from None
            raise StoreUnavailable(
                f"state store {self._safe_url()} failed: {code or type(exc).__name__} "
                f"in {operation}" + (" (gave up after retries)" if _transient(exc) else "")
            ) from None
        except botocore.exceptions.NoCredentialsError:
            raise ConfigError(f"state store {self._safe_url()}: no AWS credentials found in "
                              "the standard chain") from None
        except botocore.exceptions.NoRegionError:
            raise ConfigError("dynamodb:// needs a region: add ?region=... or set AWS_REGION"
                              ) from None
        except (botocore.exceptions.HTTPClientError,
                botocore.exceptions.ConnectionError) as exc:
            raise StoreUnavailable(
                f"state store {self._safe_url()} unavailable: {type(exc).__name__} "
                f"in {operation}") from None
        except botocore.exceptions.BotoCoreError as exc:
            raise StoreUnavailable(f"state store {self._safe_url()} failed: "
                                   f"{redact(type(exc).__name__)} in {operation}") from None

    def _went_through(self, operation: str, sk: str) -> None:
        log.info("a retried write had gone through before its response was lost",
                 extra={"state_store": self._safe_url(), "operation": operation,
                        "item": sk.split("#", 1)[0] or sk})

    def _get(self, pk: str, sk: str, consistent: bool = True) -> dict[str, Any] | None:
        response = self._call("get_item", TableName=self.table, Key=_key(pk, sk),
                              ConsistentRead=consistent)
        return _item(response.get("Item"))

    def _update(self, pk: str, sk: str, update: str, condition: str | None = None,
                values: dict[str, Any] | None = None) -> None:
        """A conditional update also writes a fresh ``op`` token: when its condition fails,
        the item is read, and if it carries this token the update is the one that already
        went through (its response was lost and the retry found its own write): success.
        So every conditional update is idempotent under retries."""
        token = uuid.uuid4().hex
        values = dict(values or {})
        if condition:
            update = (update.replace("SET ", "SET #op = :op, ", 1) if update.startswith("SET ")
                      else f"{update} SET #op = :op")
            values[":op"] = token
        kwargs: dict[str, Any] = dict(
            TableName=self.table, Key=_key(pk, sk), UpdateExpression=update,
            **_expr(update, condition, values=values))
        if condition:
            kwargs["ConditionExpression"] = condition
        try:
            self._call("update_item", **kwargs)
        except _ConditionFailed:
            current = self._get(pk, sk)
            if current is not None and current.get("op") == token:
                self._went_through("update_item", sk)
                return
            raise

    def _put(self, item: dict[str, Any], condition: str | None = None,
             values: dict[str, Any] | None = None) -> None:
        kwargs: dict[str, Any] = dict(TableName=self.table,
                                      Item={k: _av(v) for k, v in item.items()})
        if condition:
            kwargs.update(ConditionExpression=condition, **_expr(condition, values=values))
        self._call("put_item", **kwargs)

    def _query(self, pk: str | None = None, prefix: str | None = None, index: str | None = None,
               index_pk: str | None = None, consistent: bool = True, forward: bool = True,
               limit: int | None = None, filter_: str | None = None,
               values: dict[str, Any] | None = None, projection: str | None = None,
               since: float | None = None) -> Iterator[dict[str, Any]]:
        """Every item of one partition (optionally of one sort-key prefix), of a global
        index partition, or (``lsi1``) a job's results recorded since ``since``; page by
        page."""
        vals = dict(values or {})
        if index == "lsi1":  # a job's results recorded since a time, strongly consistent
            cond = "#pk = :pk AND #recorded_at >= :since"
            vals.update({":pk": pk, ":since": since})
        elif index is None:
            cond = "#pk = :pk" + (" AND begins_with(#sk, :prefix)" if prefix else "")
            vals[":pk"] = pk
            if prefix:
                vals[":prefix"] = prefix
        else:
            key_attr = {"gsi1": "g1pk", "gsi2": "g2pk"}[index]
            cond = f"#{key_attr} = :pk"
            vals[":pk"] = index_pk
        kwargs: dict[str, Any] = dict(
            TableName=self.table, KeyConditionExpression=cond, ScanIndexForward=forward,
            **_expr(cond, filter_, projection, values=vals))
        if index in (None, "lsi1"):
            kwargs["ConsistentRead"] = consistent
        if index is not None:
            kwargs["IndexName"] = index
        if filter_:
            kwargs["FilterExpression"] = filter_
        if projection:
            kwargs["ProjectionExpression"] = projection
        seen = 0
        while True:
            if limit is not None:
                kwargs["Limit"] = max(1, limit - seen)
            response = self._call("query", **kwargs)
            for raw in response.get("Items", []):
                item = _item(raw)
                assert item is not None
                yield item
                seen += 1
                if limit is not None and seen >= limit:
                    return
            last = response.get("LastEvaluatedKey")
            if not last:
                return
            kwargs["ExclusiveStartKey"] = last

    def _transact(self, actions: Sequence[dict[str, Any]]) -> None:
        """One TransactWriteItems; each action's expressions are aliased here. Raises
        :class:`_Cancelled` with the reasons when a condition failed."""
        items = []
        for action in actions:
            ((kind, body),) = action.items()
            body = dict(body)
            values = body.pop("values", None)
            exprs = [body.get("ConditionExpression"), body.get("UpdateExpression")]
            body.update(_expr(*exprs, values=values))
            body["TableName"] = self.table
            if "Item" in body:
                body["Item"] = {k: _av(v) for k, v in body["Item"].items()}
            items.append({kind: body})
        self._call("transact_write_items", TransactItems=items)

    def _batch_write(self, requests: Sequence[dict[str, Any]]) -> None:
        """Unconditional puts/deletes, 25 per request, unprocessed ones sent again."""
        for start in range(0, len(requests), 25):
            pending: list[dict[str, Any]] = list(requests[start:start + 25])
            for attempt in range(UNPROCESSED_TRIES):
                response = self._call("batch_write_item",
                                      RequestItems={self.table: pending})
                pending = response.get("UnprocessedItems", {}).get(self.table, [])
                if not pending:
                    break
                _unprocessed_pause(attempt)
            if pending:
                raise StoreUnavailable(f"state store {self._safe_url()}: writes stayed "
                                       "unprocessed (throttled)")

    def _put_request(self, item: dict[str, Any]) -> dict[str, Any]:
        return {"PutRequest": {"Item": {k: _av(v) for k, v in item.items()}}}

    # -- values larger than an item holds ---------------------------------------------------
    def _blob(self, pk: str, owner: str, data: bytes) -> dict[str, Any]:
        """Attributes holding ``data`` compressed: inline when small, else in parts (items
        ``PART#{owner}#{digest}#{n}`` written first: content-addressed, so a retry or a
        concurrent writer of the same value writes the same items)."""
        packed = zlib.compress(data, 6)
        if len(packed) <= self.inline_limit:
            return {"blob": packed}
        digest = hashlib.sha256(packed).hexdigest()[:24]
        chunks = [packed[i:i + self.part_size] for i in range(0, len(packed), self.part_size)]
        self._batch_write([self._put_request({
            "pk": pk, "sk": f"PART#{owner}#{digest}#{n:05d}", "data": part})
            for n, part in enumerate(chunks)])
        return {"digest": digest, "parts": len(chunks)}

    def _unblob(self, pk: str, owner: str, item: dict[str, Any]) -> bytes:
        if "blob" in item:
            return zlib.decompress(item["blob"])
        parts = list(self._query(pk, prefix=f"PART#{owner}#{item['digest']}#"))
        if len(parts) != item["parts"]:
            raise StoreUnavailable(f"state store {self._safe_url()}: a stored value lost "
                                   f"{item['parts'] - len(parts)} of its parts")
        return zlib.decompress(b"".join(p["data"] for p in parts))

    # -- schema -----------------------------------------------------------------------------
    def _ensure_table(self) -> None:
        if self._ready:
            return
        try:
            self._call("describe_table", TableName=self.table)
        except StoreUnavailable as exc:
            if "does not exist" not in str(exc):
                raise
            self.upgrade()
        self._ready = True

    def upgrade(self) -> None:
        """Create the table (on-demand billing, two GSIs, one LSI) and wait for it; turn TTL on
        (attribute ``expires``: leases, old checkpoints). Safe to run again."""
        gsi = [{
            "IndexName": name,
            "KeySchema": [{"AttributeName": f"{p}pk", "KeyType": "HASH"},
                          {"AttributeName": f"{p}sk", "KeyType": "RANGE"}],
            "Projection": {"ProjectionType": "ALL"},
        } for name, p in (("gsi1", "g1"), ("gsi2", "g2"))]
        try:
            self._call(
                "create_table", TableName=self.table, BillingMode="PAY_PER_REQUEST",
                AttributeDefinitions=[
                    {"AttributeName": "pk", "AttributeType": "S"},
                    {"AttributeName": "sk", "AttributeType": "S"},
                    {"AttributeName": "g1pk", "AttributeType": "S"},
                    {"AttributeName": "g1sk", "AttributeType": "N"},
                    {"AttributeName": "g2pk", "AttributeType": "S"},
                    {"AttributeName": "g2sk", "AttributeType": "N"},
                    {"AttributeName": "recorded_at", "AttributeType": "N"},
                ],
                KeySchema=[{"AttributeName": "pk", "KeyType": "HASH"},
                           {"AttributeName": "sk", "KeyType": "RANGE"}],
                GlobalSecondaryIndexes=gsi,
                LocalSecondaryIndexes=[{
                    "IndexName": "lsi1",
                    "KeySchema": [{"AttributeName": "pk", "KeyType": "HASH"},
                                  {"AttributeName": "recorded_at", "KeyType": "RANGE"}],
                    "Projection": {"ProjectionType": "ALL"}}])
        except StoreUnavailable as exc:
            if "ResourceInUseException" not in str(exc):  # created already (or meanwhile)
                raise
        deadline = time.monotonic() + 300
        while True:
            status = self._call("describe_table", TableName=self.table)["Table"]
            gsis = status.get("GlobalSecondaryIndexes", [])
            if status.get("TableStatus") == "ACTIVE" and all(
                    g.get("IndexStatus", "ACTIVE") == "ACTIVE" for g in gsis):
                break
            if time.monotonic() > deadline:
                raise StoreUnavailable(f"state store {self._safe_url()}: the table did not "
                                       "become active within 5 minutes")
            time.sleep(1.0)
        ttl = self._call("describe_time_to_live", TableName=self.table).get(
            "TimeToLiveDescription", {})
        if ttl.get("TimeToLiveStatus") not in ("ENABLED", "ENABLING"):
            self._call("update_time_to_live", TableName=self.table,
                       TimeToLiveSpecification={"Enabled": True, "AttributeName": "expires"})
        self._ready = True

    def close(self) -> None:
        close = getattr(self.client, "close", None)
        if close is not None:
            close()

    # -- jobs and chunks --------------------------------------------------------------------
    def _job_item(self, job_id: str, tenant_id: str, pipeline: str, trigger_mode: str,
                  status: str, total: int, now: float, runner: str | None,
                  exclusive: bool) -> dict[str, Any]:
        item: dict[str, Any] = {
            "pk": _job_pk(job_id), "sk": JOB_SK, "job_id": job_id, "tenant_id": tenant_id,
            "pipeline": pipeline, "trigger_mode": trigger_mode, "status": status,
            "total": total, "completed": 0, "failed": 0, "open_requests": 0,
            "failed_requests": 0, "created_at": now, "updated_at": now,
            "exclusive": exclusive, "g1pk": "JOBS", "g1sk": now,
        }
        if status not in TERMINAL:
            item.update(g2pk="UNFINISHED", g2sk=now)
        if runner is not None:
            item["runner"] = runner
        return item

    def create_job(
        self, job_id: str, tenant_id: str, pipeline: str, trigger_mode: str,
        chunks: Sequence[ChunkSpec], runner: str | None = None, exclusive: bool = False,
    ) -> None:
        """Chunk specs first (plain puts: a job that never appears leaves only them), then
        the job item and, when ``exclusive``, the tenant's active-job item in one
        transaction: the item's ``attribute_not_exists`` is the check and the insert."""
        now = _now()
        active_pk = f"ACTIVE#{_composite(pipeline, tenant_id)}"
        if exclusive:
            current = self._get(active_pk, "#ACTIVE")
            if current is not None and current["job_id"] != job_id:
                raise self._active_exists(current["job_id"], tenant_id, pipeline)
        self._batch_write([self._put_request({
            "pk": _job_pk(job_id), "sk": f"CHUNK#{c.chunk_id}", "spec": c.model_dump_json(),
            "table": c.table.label}) for c in chunks])
        job = self._job_item(job_id, tenant_id, pipeline, trigger_mode, RUNNING, len(chunks),
                             now, runner, exclusive)
        token = uuid.uuid4().hex
        job["token"] = token
        actions: list[dict[str, Any]] = [{"Put": {
            "Item": job, "ConditionExpression": "attribute_not_exists(#pk)"}}]
        if exclusive:
            actions.append({"Put": {
                "Item": {"pk": active_pk, "sk": "#ACTIVE", "job_id": job_id, "created_at": now},
                "ConditionExpression": "attribute_not_exists(#pk)",
                "ReturnValuesOnConditionCheckFailure": "ALL_OLD"}})
        try:
            self._transact(actions)
        except _Cancelled as cancelled:
            existing = self._get(_job_pk(job_id), JOB_SK)
            if existing is not None and existing.get("token") == token:
                return  # our own write, committed before a timeout
            if exclusive and cancelled.failed(1):
                other = (cancelled.item(1) or {}).get("job_id", "?")
                self._batch_write([{"DeleteRequest": {"Key": _key(_job_pk(job_id),
                                                                  f"CHUNK#{c.chunk_id}")}}
                                   for c in chunks])
                raise self._active_exists(other, tenant_id, pipeline) from None
            raise StoreUnavailable(f"state store {self._safe_url()}: job {job_id!r} "
                                   "exists already") from None

    @staticmethod
    def _active_exists(other: str, tenant_id: str, pipeline: str) -> ActiveJobExists:
        return ActiveJobExists(other, f"tenant {tenant_id!r} of pipeline {pipeline!r} "
                                      f"already has an unfinished job {other}")

    def record_failed_job(self, job_id: str, tenant_id: str, pipeline: str,
                          trigger_mode: str, error: str) -> None:
        now = _now()
        item = self._job_item(job_id, tenant_id, pipeline, trigger_mode,
                              JobStatus.FAILED.value, 0, now, None, False)
        item["outcome"] = "failed"
        item.update(self._blob(_job_pk(job_id), "report", jsonio.dumps(
            {"tables": {}, "error": redact(error)})))
        with contextlib.suppress(_ConditionFailed):  # recorded already (a retry)
            self._put(item, "attribute_not_exists(#pk)")

    def active_job(self, pipeline: str, tenant_id: str) -> str | None:
        item = self._get(f"ACTIVE#{_composite(pipeline, tenant_id)}", "#ACTIVE")
        return None if item is None else str(item["job_id"])

    def adopt_job(self, job_id: str, runner: str, previous: str | None) -> bool:
        """``runner = :previous`` (or no runner): of several adopters, one wins."""
        terminal, values = _in("status", "t", sorted(TERMINAL))
        cond = ("attribute_not_exists(#runner)" if previous is None
                else "#runner = :previous")
        if previous is not None:
            values[":previous"] = previous
        values.update({":runner": runner, ":now": _now()})
        try:
            self._update(_job_pk(job_id), JOB_SK, "SET #runner = :runner, #updated_at = :now",
                         f"attribute_exists(#pk) AND {cond} AND NOT ({terminal})", values)
        except _ConditionFailed:
            job = self._get(_job_pk(job_id), JOB_SK)
            return job is not None and job.get("runner") == runner
        return True

    def complete_chunks(self, results: Sequence[ChunkResult]) -> list[Completion]:
        """Each as :meth:`complete_chunk` (one transaction each: a chunk is counted by the
        transaction that records it, and one transaction holds at most 100 actions)."""
        return [self.complete_chunk(result) for result in results]

    def complete_chunk(self, result: ChunkResult) -> Completion:
        """One transaction of three actions (docs/architecture.md, DynamoDB):

        1. ConditionCheck on the chunk's spec: it exists and names the result's table
           (a completion is accepted only for a chunk of its job);
        2. Put of the result under (job, chunk), ``attribute_not_exists``: only the first
           result of a chunk is recorded;
        3. Update of the job: ``ADD completed 1`` (and ``failed``), only if the job exists.

        All three or none: a chunk is counted exactly once. Then a strongly consistent read
        of the job, and the completer that sees ``completed >= total`` claims it. ``token``
        tells a retry after a timeout that the first attempt committed (then it is new)."""
        now = _now()
        token = uuid.uuid4().hex
        pk = _job_pk(result.job_id)
        stored = self._blob(pk, f"RESULT#{result.chunk_id}", result.model_dump_json().encode())
        item = {"pk": pk, "sk": f"RESULT#{result.chunk_id}", "chunk_id": result.chunk_id,
                "completed": result.completed, "recorded_at": now, "token": token, **stored}
        new = True
        try:
            self._transact([
                {"ConditionCheck": {
                    "Key": _key(pk, f"CHUNK#{result.chunk_id}"),
                    "ConditionExpression": "attribute_exists(#pk) AND #table = :table",
                    "values": {":table": result.table_metadata.label},
                    "ReturnValuesOnConditionCheckFailure": "ALL_OLD"}},
                {"Put": {"Item": item, "ConditionExpression": "attribute_not_exists(#pk)",
                         "ReturnValuesOnConditionCheckFailure": "ALL_OLD"}},
                {"Update": {
                    "Key": _key(pk, JOB_SK),
                    "UpdateExpression": "SET #updated_at = :now ADD #completed :one, #failed :f",
                    "ConditionExpression": "attribute_exists(#pk)",
                    "values": {":now": now, ":one": 1, ":f": 0 if result.completed else 1}}},
            ])
        except _Cancelled as cancelled:
            if cancelled.failed(2):
                raise UnknownJob(f"unknown job {result.job_id!r}") from None
            if cancelled.failed(0):
                spec = cancelled.item(0)
                if spec is None:
                    raise InvalidCompletion(f"chunk {result.chunk_id!r} is not part of job "
                                            f"{result.job_id!r}") from None
                raise InvalidCompletion(
                    f"chunk {result.chunk_id!r} of job {result.job_id!r} belongs to "
                    f"{spec['table']}, not {result.table_metadata.label}") from None
            recorded = cancelled.item(1)
            if recorded is None:
                recorded = self._get(pk, f"RESULT#{result.chunk_id}")
            if recorded is None or recorded.get("token") != token:
                return self._repeat_completion(result, recorded, now)
            self._went_through("complete_chunk", "RESULT")  # this very call committed
        job = self._get(pk, JOB_SK)
        assert job is not None
        claimed = self._claim_if_last(job, token, now)
        return Completion(new, int(job["completed"]), int(job["total"]), claimed)

    def _claim_if_last(self, job: dict[str, Any], token: str, now: float) -> bool:
        """The claim: ``SET status = aggregating`` only while ``status = running AND
        completed >= total``; of all completers that saw the last count, one wins. The
        winner's token stays on the job, so a retry after a lost response knows it won."""
        if job["status"] != RUNNING or job["completed"] < job["total"]:
            return False
        try:
            self._update(job["pk"], JOB_SK,
                         "SET #status = :aggregating, #claim = :token, #updated_at = :now",
                         "#status = :running AND #completed >= #total",
                         {":aggregating": AGGREGATING, ":token": token, ":now": now,
                          ":running": RUNNING})
        except _ConditionFailed:
            again = self._get(job["pk"], JOB_SK)
            return again is not None and again.get("claim") == token
        return True

    def _result(self, pk: str, item: dict[str, Any]) -> ChunkResult:
        return ChunkResult.model_validate_json(self._unblob(pk, item["sk"], item))

    def _repeat_completion(self, result: ChunkResult, recorded_item: dict[str, Any] | None,
                           now: float) -> Completion:
        """A second result for a recorded chunk: the rule of docs/architecture.md. A
        superseding result replaces the recorded one in a transaction conditioned on the
        recorded version (``token``) and on the job still ``running`` (the claim has not
        happened), so it can never change a job after its aggregation read the results."""
        pk = _job_pk(result.job_id)
        for _ in range(20):
            if recorded_item is None:
                recorded_item = self._get(pk, f"RESULT#{result.chunk_id}")
                assert recorded_item is not None
            recorded = self._result(pk, recorded_item)
            job = self._get(pk, JOB_SK)
            if job is None:
                raise UnknownJob(f"unknown job {result.job_id!r}")
            same = Completion(False, int(job["completed"]), int(job["total"]), False)
            if not result.completed or (
                    recorded.completed and recorded.s3_files_written == result.s3_files_written):
                # a plain duplicate: if it finds the job complete but unclaimed (the first
                # completer died before its claim), it claims; one claimer wins anyway
                claimed = self._claim_if_last(job, uuid.uuid4().hex, now)
                return Completion(False, same.completed, same.total, claimed)
            kind = "retry_succeeded" if not recorded.completed else "conflicting_success"
            detail = (f"a failed result ({recorded.error.message if recorded.error else '?'}) "
                      "superseded by a successful retry" if not recorded.completed else
                      f"a second success with {result.s3_files_count} file(s) "
                      f"({result.records_processed} records) instead of "
                      f"{recorded.s3_files_count} ({recorded.records_processed} records)")
            if job["status"] != RUNNING:
                self._event(result.job_id, f"late_{kind}",
                            f"{detail}, after the job was aggregated: not used",
                            result.chunk_id, now)
                return same
            token = uuid.uuid4().hex
            stored = self._blob(pk, f"RESULT#{result.chunk_id}",
                                result.model_dump_json().encode())
            removes = [k for k in ("blob", "digest", "parts")
                       if k not in stored and k in recorded_item]
            update = "SET #completed = :true, #recorded_at = :now, #token = :token" + "".join(
                f", #{k} = :{k}" for k in stored) + (
                f" REMOVE {', '.join('#' + k for k in removes)}" if removes else "")
            job_update = "SET #updated_at = :now" + (
                "" if recorded.completed else " ADD #failed :minus")
            try:
                self._transact([
                    {"Update": {"Key": _key(pk, f"RESULT#{result.chunk_id}"),
                                "UpdateExpression": update,
                                "ConditionExpression": "#token = :seen",
                                "values": {":true": True, ":now": now, ":token": token,
                                           ":seen": recorded_item.get("token"),
                                           **{f":{k}": v for k, v in stored.items()}}}},
                    {"Update": {"Key": _key(pk, JOB_SK), "UpdateExpression": job_update,
                                "ConditionExpression": "#status = :running",
                                "values": {":now": now, ":running": RUNNING,
                                           **({} if recorded.completed else {":minus": -1})}}},
                    {"Put": {"Item": self._event_item(result.job_id, kind, detail,
                                                      result.chunk_id, now)}},
                ])
            except _Cancelled:
                recorded_item = self._get(pk, f"RESULT#{result.chunk_id}")
                if recorded_item is not None and recorded_item.get("token") == token:
                    # this very supersede went through; its response was lost
                    return Completion(False, same.completed, same.total, False,
                                      superseded=True)
                recorded_item = None  # claimed meanwhile, or another result won: look again
                continue
            return Completion(False, same.completed, same.total, False, superseded=True)
        raise StoreUnavailable(f"state store {self._safe_url()}: chunk {result.chunk_id!r} "
                               "kept changing under a repeated result")

    def _event_item(self, job_id: str, kind: str, detail: str, chunk_id: str | None,
                    now: float) -> dict[str, Any]:
        item: dict[str, Any] = {
            "pk": _job_pk(job_id), "sk": f"EVENT#{now:017.6f}#{uuid.uuid4().hex[:8]}",
            "at": now, "kind": kind, "detail": redact(detail)}
        if chunk_id is not None:
            item["chunk_id"] = chunk_id
        return item

    def _event(self, job_id: str, kind: str, detail: str, chunk_id: str | None = None,
               now: float | None = None) -> None:
        self._put(self._event_item(job_id, kind, detail, chunk_id, now or _now()))

    def events(self, job_id: str) -> list[JobEvent]:
        return [JobEvent(at=_dt(i["at"]), kind=i["kind"], chunk_id=i.get("chunk_id"),
                         detail=i["detail"])
                for i in self._query(_job_pk(job_id), prefix="EVENT#")]

    def cancel_job(self, job_id: str, reason: str) -> bool:
        """The job's status change (not from a terminal one), its event and the release of
        the tenant's active-job item in one transaction; then its unstarted outbox rows
        are cancelled one by one (each conditional on still being unstarted). A row that
        an aggregation writes meanwhile is cancelled by that aggregation, whose commit
        fails on the job's status, or by the relay, which never sends a cancelled job's
        rows."""
        now = _now()
        token = uuid.uuid4().hex
        terminal, values = _in("status", "t", sorted(TERMINAL))
        values[":token"] = token
        job = self._get(_job_pk(job_id), JOB_SK)
        if job is None:
            raise UnknownJob(f"unknown job {job_id!r}")
        release: list[dict[str, Any]] = [] if not job.get("exclusive") else [{"Delete": {
            "Key": _key(f"ACTIVE#{_composite(job['pipeline'], job['tenant_id'])}", "#ACTIVE"),
            "ConditionExpression": "attribute_not_exists(#pk) OR #job_id = :j",
            "values": {":j": job_id}}}]
        try:
            self._transact([
                {"Update": {"Key": _key(_job_pk(job_id), JOB_SK),
                            "UpdateExpression": "SET #status = :cancelled, #outcome = "
                            "if_not_exists(#outcome, :cancelled), #updated_at = :now, "
                            "#cancel_token = :token REMOVE #g2pk, #g2sk",
                            "ConditionExpression": f"attribute_exists(#pk) AND NOT ({terminal})",
                            "values": {**values, ":cancelled": CANCELLED, ":now": now}}},
                {"Put": {"Item": self._event_item(job_id, "cancelled", reason, None, now)}},
                *release,
            ])
        except _Cancelled:
            job = self._get(_job_pk(job_id), JOB_SK)
            if job is None:
                raise UnknownJob(f"unknown job {job_id!r}") from None
            if job.get("cancel_token") != token:
                return False  # finished or cancelled already (else: our retry committed)
        self._cancel_rows(job_id, reason, now)
        return True

    def _cancel_rows(self, job_id: str, reason: str, now: float) -> None:
        for row in self._query(index="gsi1", index_pk=f"JOBREQ#{job_id}"):
            if row["status"] in ("pending", "dispatched"):
                self._end_row(row, "cancelled", now, {":error": redact(reason)},
                              "#error = :error", allowed=("pending", "dispatched"),
                              drop_holder=False)

    def settle_jobs(self, job_ids: Collection[str] | None = None) -> list[str]:
        candidates = [j for j in self._unfinished_items(job_ids) if j["status"] == ENQUEUED]
        return [j["job_id"] for j in candidates if self._settle(j["job_id"], _now())]

    def chunk_specs(self, job_id: str) -> list[ChunkSpec]:
        return [ChunkSpec.model_validate_json(i["spec"])
                for i in self._query(_job_pk(job_id), prefix="CHUNK#")]

    def chunk_results(self, job_id: str) -> list[ChunkResult]:
        pk = _job_pk(job_id)
        return [self._result(pk, i) for i in self._query(pk, prefix="RESULT#")]

    def _row_item(self, request: TransformRequest, pipeline: str | None,
                  now: float) -> dict[str, Any]:
        pk = _req_pk(request.request_id)
        item: dict[str, Any] = {
            "pk": pk, "sk": REQ_SK, "request_id": request.request_id,
            "trigger": request.trigger, "status": "pending", "attempts": 0,
            "created_at": now, "updated_at": now,
            "g1pk": f"JOBREQ#{request.job_id or '-'}", "g1sk": now,
            "g2pk": "OPEN", "g2sk": now,
            **self._blob(pk, "payload", jsonio.dumps(request.payload())),
        }
        if request.job_id is not None:
            item["job_id"] = request.job_id
        if pipeline is not None:
            item["pipeline"] = pipeline
        return item

    @staticmethod
    def _item_bytes(item: dict[str, Any]) -> int:
        return sum(len(k) + len(v) if isinstance(v, bytes | str) else len(k) + 16
                   for k, v in item.items())

    def _batches(self, rows: list[dict[str, Any]]) -> Iterator[list[dict[str, Any]]]:
        """Rows in groups that fit one transaction beside one more action (the job's)."""
        batch: list[dict[str, Any]] = []
        size = 0
        for row in rows:
            row_size = self._item_bytes(row)
            if batch and (len(batch) + 1 >= self.transaction_actions
                          or size + row_size > self.transaction_bytes):
                yield batch
                batch, size = [], 0
            batch.append(row)
            size += row_size
        if batch:
            yield batch

    def finish_aggregation(
        self, job_id: str, outcome: str, requests: Sequence[TransformRequest],
        report: dict[str, Any],
    ) -> bool:
        """The outbox rows first, in transactions of up to 99 conditional puts
        (``attribute_not_exists``) plus the job's ``ADD open_requests n`` conditioned on
        ``status = aggregating``; rows written by an earlier attempt (a crash, a timeout)
        fail their condition and are left out of the next try, so the counter counts each
        row once. Then the commit point: the job's ``aggregating -> transforms_enqueued``.
        Rows of a job not yet committed are never sent or run (the relay and
        ``claim_request`` check the job), so a job of 300 tables needs no single
        transaction of 300 actions."""
        now = _now()
        pk = _job_pk(job_id)
        job = self._get(pk, JOB_SK)
        if job is None or job["status"] != AGGREGATING:
            return False
        rows = [{**self._row_item(r, job["pipeline"], now), "written_by": "aggregation"}
                for r in requests]
        for batch in self._batches(rows):
            while batch:
                try:
                    self._transact([
                        *({"Put": {"Item": row, "ConditionExpression":
                                   "attribute_not_exists(#pk)"}} for row in batch),
                        {"Update": {"Key": _key(pk, JOB_SK),
                                    "UpdateExpression": "ADD #open_requests :n",
                                    "ConditionExpression": "#status = :aggregating",
                                    "values": {":n": len(batch), ":aggregating": AGGREGATING}}},
                    ])
                    break
                except _Cancelled as cancelled:
                    if cancelled.failed(len(batch)):
                        return False  # cancelled or committed by another aggregator
                    batch = [row for i, row in enumerate(batch) if not cancelled.failed(i)]
        stored = self._blob(pk, "report", jsonio.dumps(report))
        token = uuid.uuid4().hex
        try:
            self._update(pk, JOB_SK,
                         "SET #status = :enqueued, #outcome = :outcome, #updated_at = :now, "
                         "#commit_token = :token" + "".join(f", #{k} = :{k}" for k in stored),
                         "#status = :aggregating",
                         {":enqueued": ENQUEUED, ":outcome": outcome, ":now": now,
                          ":aggregating": AGGREGATING, ":token": token,
                          **{f":{k}": v for k, v in stored.items()}})
        except _ConditionFailed:
            again = self._get(pk, JOB_SK)
            if again is not None and again.get("commit_token") == token:
                self._settle(job_id, now)  # our commit went through; its response was lost
                return True
            if again is not None and again["status"] == CANCELLED:
                self._cancel_rows(job_id, "the job was cancelled during its aggregation", now)
            return False
        self._settle(job_id, now)
        return True

    def _settle(self, job_id: str, now: float) -> bool:
        """``transforms_enqueued -> done|failed`` only while ``open_requests = 0``: every
        step that ends a row decrements the counter in the same transaction, so the count
        is exact without reading the rows, and two finishers at once both try this
        conditional update; one wins."""
        pk = _job_pk(job_id)
        job = self._get(pk, JOB_SK)
        if job is None or job["status"] != ENQUEUED or job.get("open_requests", 0) > 0:
            return False
        final = (JobStatus.FAILED if job.get("failed_requests", 0) or job.get("outcome") ==
                 "failed" else JobStatus.DONE).value
        actions: list[dict[str, Any]] = [{"Update": {
            "Key": _key(pk, JOB_SK),
            "UpdateExpression": "SET #status = :final, #updated_at = :now REMOVE #g2pk, #g2sk",
            "ConditionExpression": "#status = :enqueued AND #open_requests = :zero",
            "values": {":final": final, ":now": now, ":enqueued": ENQUEUED, ":zero": 0}}}]
        if job.get("exclusive"):
            actions.append({"Delete": {
                "Key": _key(f"ACTIVE#{_composite(job['pipeline'], job['tenant_id'])}",
                            "#ACTIVE"),
                "ConditionExpression": "attribute_not_exists(#pk) OR #job_id = :j",
                "values": {":j": job_id}}})
        try:
            self._transact(actions)
        except _Cancelled:
            return False
        return True

    def _unfinished_items(self, job_ids: Collection[str] | None) -> list[dict[str, Any]]:
        if job_ids is not None:
            items = [self._get(_job_pk(j), JOB_SK) for j in job_ids]
            found = [i for i in items if i is not None and i["status"] not in TERMINAL]
        else:
            found = [i for i in self._query(index="gsi2", index_pk="UNFINISHED")
                     if i["status"] not in TERMINAL]
        return sorted(found, key=lambda i: i["created_at"])

    def stuck_jobs(self, older_than: float) -> list[str]:
        cutoff = _now() - older_than
        return [i["job_id"] for i in self._unfinished_items(None)
                if i["updated_at"] < cutoff and (
                    i["status"] == AGGREGATING
                    or (i["status"] == RUNNING and i["completed"] >= i["total"]))]

    def reclaim_aggregation(self, job_id: str, older_than: float) -> bool:
        """The sweeper's claim: the same conditional change, one winner."""
        now = _now()
        try:
            self._update(_job_pk(job_id), JOB_SK, "SET #status = :aggregating, #updated_at = :now",
                         "#status IN (:running, :aggregating) AND #completed >= #total "
                         "AND #updated_at < :cutoff",
                         {":aggregating": AGGREGATING, ":running": RUNNING, ":now": now,
                          ":cutoff": now - older_than})
        except _ConditionFailed:
            return False
        return True

    # -- transform outbox -------------------------------------------------------------------
    def enqueue_request(self, request: TransformRequest) -> bool:
        """A conditional put (``attribute_not_exists``); with a job, in one transaction with
        the job's ``ADD open_requests 1``, so the job cannot settle while the row is open."""
        now = _now()
        job = self._get(_job_pk(request.job_id), JOB_SK) if request.job_id else None
        row = self._row_item(request, job["pipeline"] if job else None, now)
        if job is None:
            if request.job_id is not None:  # a job this store does not know: none to count
                row["uncounted"] = True  # it in (nor, when the row ends, out of)
            try:
                self._put(row, "attribute_not_exists(#pk)")
            except _ConditionFailed:
                return self._written_by(row)
            return True
        try:
            self._transact([
                {"Put": {"Item": row, "ConditionExpression": "attribute_not_exists(#pk)"}},
                {"Update": {"Key": _key(job["pk"], JOB_SK),
                            "UpdateExpression": "ADD #open_requests :one",
                            "ConditionExpression": "attribute_exists(#pk)",
                            "values": {":one": 1}}},
            ])
        except _Cancelled:
            return self._written_by(row)
        return True

    def _written_by(self, row: dict[str, Any]) -> bool:
        """After a failed ``attribute_not_exists``: True only if the existing row is this
        very write (it committed, then its response was lost)."""
        current = self._get(row["pk"], REQ_SK)
        return current is not None and current.get("created_at") == row["created_at"] and \
            current.get("attempts") == 0 and current.get("blob") == row.get("blob")

    @staticmethod
    def _runnable_in(row: dict[str, Any]) -> tuple[str, ...]:
        """The job states in which a row may be sent and run: a row an aggregation wrote
        only once that aggregation committed; a row enqueued on its own (per-batch) while
        its job is not finished."""
        if row.get("written_by") == "aggregation":
            return (ENQUEUED,)
        return (RUNNING, AGGREGATING, ENQUEUED)

    def _job_states(self, job_ids: Collection[str]) -> dict[str, str | None]:
        return {j: (item["status"] if (item := self._get(_job_pk(j), JOB_SK)) else None)
                for j in job_ids}

    def claim_for_dispatch(
        self, limit: int = 100, redispatch_after: float | None = None,
        lease_seconds: float | None = None, job_ids: Collection[str] | None = None,
        max_attempts: int | None = None, pipeline: str | None = None,
    ) -> list[TransformRequest]:
        """Candidates from the open-rows index (or each job's rows); each one is taken with
        a conditional update on what was read (``status`` and ``updated_at``, or
        ``sent_at`` for a stale running row), so two relays never both send a row. Rows of
        a job whose aggregation has not committed are skipped, rows of a cancelled job are
        cancelled."""
        now = _now()
        if job_ids is not None:
            candidates = [r for j in job_ids
                          for r in self._query(index="gsi1", index_pk=f"JOBREQ#{j}")
                          if r["status"] in OPEN_REQUEST]
            candidates.sort(key=lambda r: r["created_at"])
        else:
            candidates = list(self._query(index="gsi2", index_pk="OPEN"))
        if pipeline is not None:
            candidates = [r for r in candidates if r.get("pipeline") in (None, pipeline)]

        def due(row: dict[str, Any]) -> bool:
            if row["status"] == "pending":
                return True
            if row["status"] == "dispatched":
                return redispatch_after is not None and row["updated_at"] < now - redispatch_after
            return (row["status"] == "running" and lease_seconds is not None
                    and row["updated_at"] < now - lease_seconds)

        candidates = [r for r in candidates if due(r)]
        states = self._job_states({r["job_id"] for r in candidates if "pipeline" in r})
        claimed: list[TransformRequest] = []
        for row in candidates:
            if len(claimed) >= limit:
                break
            job_status = states.get(row["job_id"]) if "pipeline" in row else RUNNING
            if job_status == CANCELLED:
                self._end_row(row, "cancelled", now, {":error": "the job was cancelled"},
                              "#error = :error", allowed=("pending", "dispatched"))
                continue
            if "pipeline" in row and job_status not in self._runnable_in(row):
                continue  # its aggregation has not committed (or the job is gone)
            if max_attempts is not None and row["attempts"] >= max_attempts:
                error = (f"gave up after {row['attempts']} attempt(s); last error: "
                         f"{row.get('error') or 'the worker running it was lost'}")
                self._end_row(row, "failed", now, {":error": error}, "#error = :error",
                              allowed=(row["status"],), seen=row)
                continue
            try:
                if row["status"] == "running":
                    self._update(row["pk"], REQ_SK, "SET #sent_at = :now",
                                 "#status = :running AND #updated_at = :seen AND "
                                 "(attribute_not_exists(#sent_at) OR #sent_at < :stale)",
                                 {":now": now, ":running": "running",
                                  ":seen": row["updated_at"], ":stale": now - (
                                      lease_seconds or 0)})
                else:
                    self._update(row["pk"], REQ_SK,
                                 "SET #status = :dispatched, #updated_at = :now",
                                 "#status = :status AND #updated_at = :seen",
                                 {":dispatched": "dispatched", ":now": now,
                                  ":status": row["status"], ":seen": row["updated_at"]})
            except _ConditionFailed:
                continue  # another relay took it, or it moved on
            claimed.append(self._payload(row))
        return claimed

    def _payload(self, row: dict[str, Any]) -> TransformRequest:
        return TransformRequest.model_validate_json(self._unblob(row["pk"], "payload", row))

    def outbox_backlog(self, pipeline: str | None = None) -> Backlog:
        now = _now()
        rows = [r for r in self._query(index="gsi2", index_pk="OPEN",
                                       projection="#status, #created_at, #pipeline")
                if r["status"] in ("pending", "dispatched")
                and (pipeline is None or r.get("pipeline") == pipeline)]
        if not rows:
            return Backlog(waiting=0, oldest_age=None)
        return Backlog(waiting=len(rows),
                       oldest_age=max(0.0, now - min(r["created_at"] for r in rows)))

    def _end_row(self, row: dict[str, Any], status: str, now: float, values: dict[str, Any],
                 sets: str, allowed: Sequence[str], seen: dict[str, Any] | None = None,
                 holder: str | None = None, drop_holder: bool = True) -> bool:
        """Move an open row to ``status`` (done, failed, cancelled) and, in the same
        transaction, take it off its job's ``open_requests`` (and count a failure), then try
        to settle the job. Conditional on the row's status being one of ``allowed`` (and, with
        ``holder``, on that holder; with ``seen``, on the attempts read), so a row is ended
        and counted once."""
        status_in, vals = _in("status", "s", allowed)
        cond = f"attribute_exists(#pk) AND {status_in}"
        if holder is not None:
            cond += " AND #holder = :holder"
            vals[":holder"] = holder
        if seen is not None:
            cond += " AND #attempts = :seen_attempts"
            vals[":seen_attempts"] = seen["attempts"]
        update = (f"SET #status = :new_status, #updated_at = :now, {sets} "
                  "REMOVE #g2pk, #g2sk" + (", #holder" if drop_holder else ""))
        vals.update(values, **{":new_status": status, ":now": now})
        row_action = {"Update": {"Key": _key(row["pk"], REQ_SK), "UpdateExpression": update,
                                 "ConditionExpression": cond, "values": vals}}
        job_id = _counted_in(row)
        try:
            if job_id is None:
                self._transact([row_action])
            else:
                self._transact([row_action, {"Update": {
                    "Key": _key(_job_pk(job_id), JOB_SK),
                    "UpdateExpression": "ADD #open_requests :minus, #failed_requests :f",
                    "ConditionExpression": "attribute_exists(#pk)",
                    "values": {":minus": -1, ":f": 1 if status == "failed" else 0}}}])
        except _Cancelled:
            return False
        if job_id is not None:
            self._settle(job_id, now)
        return True

    def claim_request(self, request_id: str, lease_seconds: float,
                      holder: str | None = None,
                      holder_dead: Callable[[str], bool] | None = None,
                      max_attempts: int | None = None,
                      enqueue: TransformRequest | None = None) -> int | None:
        """``status -> running, attempts + 1`` conditioned on the row as read (status,
        attempts, holder): of several claimers one wins, and the attempt number is exact.
        With a job, a ConditionCheck in the same transaction: the job's aggregation has
        committed and it is not cancelled."""
        if enqueue is not None:  # its own conditional put first (idempotent)
            self.enqueue_request(enqueue)
        now = _now()
        pk = _req_pk(request_id)
        row = self._get(pk, REQ_SK)
        if row is None or row["status"] not in OPEN_REQUEST:
            return None
        current_holder = row.get("holder")
        expired = row["updated_at"] < now - lease_seconds
        dead = (row["status"] == "running" and current_holder is not None
                and holder_dead is not None and holder_dead(current_holder))
        if (max_attempts is not None and row["attempts"] >= max_attempts
                and row["status"] == "running" and (expired or dead)):
            self._end_row(row, "failed", now, {":error": (
                f"gave up after {row['attempts']} attempt(s); the worker running it was "
                "lost each time")}, "#error = :error", allowed=("running",), seen=row)
            return None
        if row["status"] == "running" and not (expired or dead):
            return None
        cond = "#status = :status AND #attempts = :attempts AND #updated_at = :seen"
        values: dict[str, Any] = {":status": row["status"], ":attempts": row["attempts"],
                                  ":seen": row["updated_at"], ":running": "running",
                                  ":now": now, ":one": 1}
        update = "SET #status = :running, #updated_at = :now ADD #attempts :one"
        if holder is not None:
            update = update.replace("ADD", ", #holder = :holder ADD")
            values[":holder"] = holder
        else:
            update += " REMOVE #holder"
        actions: list[dict[str, Any]] = [{"Update": {
            "Key": _key(pk, REQ_SK), "UpdateExpression": update,
            "ConditionExpression": cond, "values": values}}]
        if "pipeline" in row:  # written for a job that existed: see _runnable_in
            states, state_values = _in("status", "j", self._runnable_in(row))
            actions.append({"ConditionCheck": {
                "Key": _key(_job_pk(row["job_id"]), JOB_SK),
                "ConditionExpression": states, "values": state_values}})
        try:
            self._transact(actions)
        except _Cancelled:
            again = self._get(pk, REQ_SK)  # a retry whose first attempt committed?
            if (again is not None and again["status"] == "running"
                    and again["updated_at"] == now and again.get("holder") == holder
                    and again["attempts"] == row["attempts"] + 1):
                return int(again["attempts"])
            return None
        return int(row["attempts"]) + 1

    def claim_group(self, request: TransformRequest, limit: int, lease_seconds: float,
                    holder: str, max_attempts: int, pipeline: str
                    ) -> list[tuple[TransformRequest, int]]:
        """No group commits on DynamoDB: finding a table's waiting requests would need an
        index of the outbox by source table and status (a GSI, eventually consistent, then
        a conditional claim of each); every request runs by itself, as Lambda delivers it."""
        return []

    def touch_request(self, request_id: str, holder: str | None = None) -> bool:
        cond = "#status = :running" + (" AND #holder = :holder" if holder is not None else "")
        values: dict[str, Any] = {":running": "running", ":now": _now()}
        if holder is not None:
            values[":holder"] = holder
        try:
            self._update(_req_pk(request_id), REQ_SK, "SET #updated_at = :now", cond, values)
        except _ConditionFailed:
            return False
        return True

    def finish_request(
        self, request_id: str, result: TransformResult | None, error: str | None = None,
        holder: str | None = None, progress: Progress | None = None,
    ) -> bool:
        """End a request; with ``holder`` only while that holder runs it (a worker whose
        lease was taken over cannot overwrite its successor's row). Its ``progress`` goes
        first, as its own idempotent writes (ledger puts, the conditional cursor update):
        a retry after a crash between them records the same again."""
        if progress is not None:
            self.record_files(progress.request, progress.files)
            if progress.high_water is not None:
                self.advance_cursor(progress.request.table, progress.high_water,
                                    progress.request.job_id)
        now = _now()
        pk = _req_pk(request_id)
        row = self._get(pk, REQ_SK)
        if row is None:
            return False
        status = "failed" if error else "done"
        values = {":result": result.model_dump_json() if result else None,
                  ":error": redact(error) if error else None}
        sets = "#result = :result, #error = :error"
        if row["status"] in OPEN_REQUEST:
            if self._end_row(row, status, now, values, sets,
                             allowed=("running",) if holder is not None else OPEN_REQUEST,
                             holder=holder, drop_holder=False):
                return True
            row = self._get(pk, REQ_SK) or row
            # a retry whose first attempt committed: the row shows this very end (whose
            # settle of the job did not run)
            if row["status"] != status or row["updated_at"] != now:
                return False
            if (job_id := _counted_in(row)) is not None:
                self._settle(job_id, now)
            return True
        if holder is not None:
            return False
        try:  # ended already, no holder given: record the end again (not counted again)
            self._update(pk, REQ_SK, f"SET #status = :new_status, #updated_at = :now, {sets}",
                         "attribute_exists(#pk)", {**values, ":new_status": status, ":now": now})
        except _ConditionFailed:
            return False
        return True

    def finish_requests(self, ends: Sequence[tuple[TransformResult, Progress]],
                        holder: str) -> list[bool]:
        """Each as :meth:`finish_request` (its writes are each idempotent; DynamoDB has no
        cheaper step for a group: a transaction would cost twice the write units)."""
        return [self.finish_request(result.request_id, result, holder=holder,
                                    progress=progress) for result, progress in ends]

    def retry_later(self, request_id: str, error: str, max_attempts: int,
                    holder: str | None = None) -> bool:
        """Back to pending (a failure before the claim, still ``dispatched``, uses up an
        attempt too) conditioned on the row as read; or failed after ``max_attempts``."""
        now = _now()
        error = redact(error)
        pk = _req_pk(request_id)
        for _ in range(20):
            row = self._get(pk, REQ_SK)
            if row is None:
                return False
            taken = row["status"] == "dispatched" or (
                row["status"] == "running" and (holder is None or row.get("holder") == holder))
            if not taken:
                return False
            attempts = row["attempts"] + (1 if row["status"] == "dispatched" else 0)
            if attempts >= max_attempts:
                if self._end_row(row, "failed", now, {
                        ":error": f"gave up after {max_attempts} attempt(s); last error: {error}",
                        ":attempts": attempts}, "#error = :error, #attempts = :attempts",
                        allowed=(row["status"],), seen=row,
                        holder=holder if row["status"] == "running" else None):
                    return False
                continue
            cond = "#status = :status AND #attempts = :seen_attempts AND #updated_at = :seen"
            values: dict[str, Any] = {":status": row["status"], ":seen": row["updated_at"],
                                      ":seen_attempts": row["attempts"], ":pending": "pending",
                                      ":error": error, ":now": now, ":attempts": attempts}
            try:
                self._update(pk, REQ_SK, "SET #status = :pending, #error = :error, "
                             "#updated_at = :now, #attempts = :attempts REMOVE #holder",
                             cond, values)
            except _ConditionFailed:
                continue
            return True
        raise StoreUnavailable(f"state store {self._safe_url()}: request {request_id!r} "
                               "kept changing")

    def _request_record(self, row: dict[str, Any]) -> RequestRecord:
        return RequestRecord(
            request=self._payload(row), status=row["status"], attempts=int(row["attempts"]),
            result=TransformResult.model_validate_json(row["result"])
            if row.get("result") else None,
            error=row.get("error"), holder=row.get("holder"))

    def request(self, request_id: str) -> RequestRecord | None:
        row = self._get(_req_pk(request_id), REQ_SK)
        return None if row is None else self._request_record(row)

    def requests(self, job_id: str) -> list[RequestRecord]:
        return [self._request_record(r)
                for r in self._query(index="gsi1", index_pk=f"JOBREQ#{job_id}")]

    # -- ledger, cursors, checkpoints ---------------------------------------------------------
    @staticmethod
    def _ledger_pk(request: TransformRequest) -> str:
        return f"LEDGER#{_composite(request.tenant_id, request.service_name, request.table_name)}"

    @staticmethod
    def _ledger_sk(key: str) -> str:
        """The file key, or its hash for a key longer than a sort key may be."""
        return key if len(key.encode()) <= 1000 else "H#" + hashlib.sha256(key.encode()).hexdigest()

    def record_files(self, request: TransformRequest, keys: Sequence[str]) -> None:
        """Plain puts (idempotent): one item per file, keyed by the file key."""
        now = _now()
        pk = self._ledger_pk(request)
        self._batch_write([self._put_request({
            "pk": pk, "sk": self._ledger_sk(k),
            "file_key": k, "request_id": request.request_id, "processed_at": now})
            for k in dict.fromkeys(keys)])

    def processed_files(self, request: TransformRequest,
                        keys: Sequence[str] | None = None) -> set[str]:
        pk = self._ledger_pk(request)
        if keys is None:
            return {i["file_key"] for i in self._query(pk, projection="#file_key")}
        wanted = list(dict.fromkeys(keys))
        return {str(i["file_key"]) for i in self._batch_get(
            [(pk, self._ledger_sk(k)) for k in wanted], "file_key")}

    def _batch_get(self, keys: Sequence[tuple[str, str]], *names: str
                   ) -> list[dict[str, Any]]:
        """The items of ``keys`` (pk, sk) that exist, with attributes ``names``:
        BatchGetItem, 100 keys a request, unprocessed keys asked again."""
        found: list[dict[str, Any]] = []
        projection = ", ".join(f"#{n}" for n in names)
        for start in range(0, len(keys), 100):
            pending: list[dict[str, Any]] = [_key(pk, sk) for pk, sk in keys[start:start + 100]]
            for attempt in range(UNPROCESSED_TRIES):
                response = self._call("batch_get_item", RequestItems={self.table: {
                    "Keys": pending, "ConsistentRead": True,
                    "ProjectionExpression": projection,
                    "ExpressionAttributeNames": {f"#{n}": n for n in names}}})
                for raw in response.get("Responses", {}).get(self.table, []):
                    item = _item(raw)
                    if item is not None:
                        found.append(item)
                pending = response.get("UnprocessedKeys", {}).get(self.table, {}).get(
                    "Keys", [])
                if not pending:
                    break
                _unprocessed_pause(attempt)
            if pending:
                raise StoreUnavailable(f"state store {self._safe_url()}: reads stayed "
                                       "unprocessed (throttled)")
        return found

    @staticmethod
    def _cursor_pk(table: TableRef) -> str:
        return f"CURSOR#{_composite(table.tenant_id, table.service_name, table.table_name)}"

    def sync_cursors(self, tables: Sequence[TableRef]) -> dict[TableRef, str]:
        wanted = {self._cursor_pk(t): t for t in tables}
        return {wanted[str(i["pk"])]: str(i["value"]) for i in self._batch_get(
            [(pk, "#CURSOR") for pk in wanted], "pk", "value")}

    def advance_cursor(self, table: TableRef, value: str, job_id: str | None) -> bool:
        """``attribute_not_exists(value) OR value < :value``: never moves back."""
        try:
            self._update(self._cursor_pk(table), "#CURSOR",
                         "SET #value = :value, #job_id = :job, #updated_at = :now",
                         "attribute_not_exists(#value) OR #value < :value",
                         {":value": value, ":job": job_id, ":now": _now()})
        except _ConditionFailed:
            return False
        return True

    def save_checkpoint(self, job_id: str, chunk_id: str, state: dict[str, Any]) -> None:
        now = _now()
        pk = _job_pk(job_id)
        stored = self._blob(pk, f"CHECKPOINT#{chunk_id}", jsonio.dumps(state))
        self._put({"pk": pk, "sk": f"CHECKPOINT#{chunk_id}", "updated_at": now,
                   "expires": int(now + CHECKPOINT_DAYS * 86400), **stored})

    def load_checkpoint(self, job_id: str, chunk_id: str) -> dict[str, Any] | None:
        pk = _job_pk(job_id)
        item = self._get(pk, f"CHECKPOINT#{chunk_id}")
        return None if item is None else dict(jsonio.loads(self._unblob(pk, item["sk"], item)))

    # -- leases -----------------------------------------------------------------------------
    def acquire_lock(self, name: str, holder: str, ttl: float,
                     steal_from: str | None = None) -> bool:
        """Take or renew: ``attribute_not_exists OR expires_at < now OR holder = me`` (or
        the dead ``steal_from``). Each take adds 1 to ``fence``, the lease's fencing
        token; a renewal or release names the holder, so a holder whose lease was taken
        over can neither extend nor drop its successor's."""
        now = _now()
        cond = "attribute_not_exists(#pk) OR #expires_at < :now OR #holder = :holder"
        values: dict[str, Any] = {":holder": holder, ":now": now, ":until": now + ttl,
                                  ":expires": int(now + ttl + LEASE_GRACE), ":one": 1}
        if steal_from is not None:
            cond += " OR #holder = :steal"
            values[":steal"] = steal_from
        try:
            self._update(f"LOCK#{name}", "#LOCK",
                         "SET #holder = :holder, #expires_at = :until, #expires = :expires "
                         "ADD #fence :one", cond, values)
        except _ConditionFailed:
            return False
        return True

    def renew_lock(self, name: str, holder: str, ttl: float) -> bool:
        now = _now()
        try:
            self._update(f"LOCK#{name}", "#LOCK",  # held, and not lapsed (as in SQL)
                         "SET #expires_at = :until, #expires = :expires",
                         "#holder = :holder AND #expires_at >= :now",
                         {":holder": holder, ":until": now + ttl, ":now": now,
                          ":expires": int(now + ttl + LEASE_GRACE)})
        except _ConditionFailed:
            return False
        return True

    def lock_holder(self, name: str) -> tuple[str, float] | None:
        item = self._get(f"LOCK#{name}", "#LOCK")
        return None if item is None else (str(item["holder"]), float(item["expires_at"]))

    def live_locks(self, names: Collection[str]) -> dict[str, str]:
        now = _now()
        out = {}
        for name in names:
            item = self._get(f"LOCK#{name}", "#LOCK")
            if item is not None and item["expires_at"] >= now:
                out[name] = str(item["holder"])
        return out

    def release_lock(self, name: str, holder: str) -> None:
        with contextlib.suppress(_ConditionFailed):  # not this holder's (any more)
            self._call("delete_item", TableName=self.table, Key=_key(f"LOCK#{name}", "#LOCK"),
                       ConditionExpression="#holder = :holder",
                       **_expr("#holder", values={":holder": holder}))

    # -- reading jobs -------------------------------------------------------------------------

    def acquire_locks(self, names: Collection[str], holder: str, ttl: float) -> set[str]:
        """One conditional write per name (this store runs no group commits)."""
        return {n for n in sorted(set(names)) if self.acquire_lock(n, holder, ttl)}

    def release_locks(self, names: Collection[str], holder: str) -> None:
        for name in sorted(names):
            self.release_lock(name, holder)

    def _job_record(self, item: dict[str, Any]) -> JobRecord:
        report: dict[str, Any] = {}
        if "blob" in item or "digest" in item:
            report = dict(jsonio.loads(self._unblob(item["pk"], "report", item)))
        return JobRecord(
            job_id=item["job_id"], tenant_id=item["tenant_id"], pipeline=item["pipeline"],
            trigger_mode=item["trigger_mode"], status=item["status"],
            outcome=item.get("outcome"), total_chunks=int(item["total"]),
            completed_chunks=int(item["completed"]), failed_chunks=int(item["failed"]),
            created_at=_dt(item["created_at"]), updated_at=_dt(item["updated_at"]),
            report=report, runner=item.get("runner"))

    def job(self, job_id: str) -> JobRecord | None:
        item = self._get(_job_pk(job_id), JOB_SK)
        return None if item is None else self._job_record(item)

    def jobs(self, limit: int = 20) -> list[JobRecord]:
        return [self._job_record(i) for i in self._query(
            index="gsi1", index_pk="JOBS", forward=False, limit=limit)]

    def unfinished_jobs(self, job_ids: Collection[str] | None = None) -> list[JobRecord]:
        return [self._job_record(i) for i in self._unfinished_items(job_ids)]

    def activity(self, job_ids: Collection[str], since: float) -> Activity:
        """Per job: its item and its results recorded since (strongly consistent), and its
        outbox rows moved since (the job's rows index)."""
        now = _now()
        results: list[ChunkResult] = []
        requests: list[RequestRecord] = []
        moved: list[JobRecord] = []
        for job_id in job_ids:
            pk = _job_pk(job_id)
            item = self._get(pk, JOB_SK)
            if item is None:
                continue
            if item["updated_at"] >= since:
                moved.append(self._job_record(item))
            results += [self._result(pk, i) for i in self._query(
                pk, index="lsi1", since=since)]
            requests += [self._request_record(r) for r in self._query(
                index="gsi1", index_pk=f"JOBREQ#{job_id}", filter_="#updated_at >= :since",
                values={":since": since})]
        return Activity(now, results, requests, moved)


def _implements_the_port(store: DynamoStateStore) -> StateStore:
    return store  # mypy checks here that every operation of the port is implemented


def open_dynamodb(url: str) -> DynamoStateStore:
    try:
        return DynamoStateStore(url)
    except ConfigError:
        raise
    except ValueError as exc:  # e.g. an endpoint botocore refuses
        raise ConfigError(f"dynamodb:// URL: {redact(str(exc))}") from None


def item_size(item: dict[str, Any]) -> int:
    """An item's size as DynamoDB counts it (names + values), for tests and benchmarks."""
    def value_size(av: dict[str, Any]) -> int:
        kind, value = next(iter(av.items()))
        if kind == "S":
            return len(value.encode())
        if kind == "B":
            return len(value)
        if kind == "N":
            return len(str(value).lstrip("-").replace(".", "")) // 2 + 2
        if kind in ("BOOL", "NULL"):
            return 1
        if kind == "L":
            return 3 + sum(1 + value_size(v) for v in value)
        if kind == "M":
            return 3 + sum(1 + len(k.encode()) + value_size(v) for k, v in value.items())
        return sum(len(str(v)) for v in value)

    return sum(len(k.encode()) + value_size(v) for k, v in item.items())


__all__ = ["DynamoStateStore", "item_size", "open_dynamodb", "parse_url"]
