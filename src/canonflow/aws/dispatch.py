"""Dispatchers on AWS, by URL:

``sqs://HOST/ACCOUNT/CHUNK_QUEUE?transforms=TRANSFORM_QUEUE`` sends chunk specs and transform
requests as messages to two SQS queues (each the event source of its function; their
dead-letter queues take a message after N receives). ``lambda://CHUNK_FUNCTION?transforms=
TRANSFORM_FUNCTION`` invokes the functions asynchronously (Lambda retries twice, then its
on-failure destination takes the event). Options: ``region``, ``endpoint`` (an
AWS-compatible server, e.g. ``http://127.0.0.1:5000``).

Like Celery, these transports hand nothing back: ``submit_*`` returns None and whoever
needs to know follows the state store. The chunk function that aggregates a job relays its
outbox rows (:func:`canonflow.aws.handlers.chunk`); the sweeper re-sends what was left.

A message or event is at most 256 KB: a transform request whose file list would not fit
travels with its list in a manifest object (claim check), the same
``source_files_manifest`` the aggregator writes for long lists.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from typing import Any
from urllib.parse import urlsplit

from canonflow import jsonio
from canonflow.config import Settings
from canonflow.dispatch.base import url_options
from canonflow.errors import ConfigError
from canonflow.model import ChunkSpec, TransformRequest
from canonflow.stores import ObjectStore, open_object_store
from canonflow.transform.request import manifest_prefix

MAX_EVENT_BYTES = 256 * 1024
HEADROOM = 4 * 1024  # SQS attributes, the envelope of an invoke


def claim_check(request: TransformRequest, objects: ObjectStore,
                limit: int = MAX_EVENT_BYTES - HEADROOM) -> dict[str, Any]:
    """The request's event; when its inline file list makes it larger than ``limit``
    bytes, the list goes to a manifest object and the event carries its key."""
    payload = request.payload()
    if len(jsonio.dumps(payload)) <= limit or request.source_files is None:
        return payload
    digest = hashlib.sha256(request.request_id.encode()).hexdigest()[:24]
    key = f"{manifest_prefix(request.table)}{request.job_id or 'manual'}-{digest}.json"
    objects.put(key, jsonio.dumps(sorted(request.source_files)))
    payload.pop("source_files")
    payload["source_files_manifest"] = key
    return payload


def _client(service: str, options: dict[str, str]) -> Any:
    try:
        import boto3
    except ModuleNotFoundError:
        raise ConfigError(f"{service}:// needs 'boto3': pip install 'canonflow[aws]'") from None
    kwargs: dict[str, Any] = {}
    if options.get("region"):
        kwargs["region_name"] = options["region"]
    if options.get("endpoint"):
        kwargs["endpoint_url"] = options["endpoint"]
    return boto3.client(service, **kwargs)


class _AwsDispatcher(ABC):
    def __init__(self, url: str, settings: Settings) -> None:
        self.url = url
        self.settings = settings
        self.options = url_options(url)
        self._objects: ObjectStore | None = None

    @property
    def objects(self) -> ObjectStore:
        if self._objects is None:
            self._objects = open_object_store(self.settings.object_store)
        return self._objects

    @abstractmethod
    def submit_chunk(self, spec: ChunkSpec) -> None: ...

    def submit_chunks(self, specs: list[ChunkSpec]) -> None:
        """Each chunk its own message or invocation: a function's events name one chunk
        (its handler resumes, re-enqueues and times out chunk by chunk)."""
        for spec in specs:
            self.submit_chunk(spec)

    def lost_in_worker(self, key: str) -> bool:
        return True  # no pool to break: a failed task failed itself

    def close(self) -> None:  # noqa: B027 - nothing to close: clients close with the process
        pass


class SqsDispatcher(_AwsDispatcher):
    def __init__(self, url: str, settings: Settings, client: Any = None) -> None:
        super().__init__(url, settings)
        parts = urlsplit(url)
        path = parts.path.strip("/")
        if not parts.netloc or path.count("/") != 1:
            raise ConfigError(f"sqs:// URL {url!r}: use sqs://HOST/ACCOUNT/CHUNK_QUEUE"
                              "?transforms=TRANSFORM_QUEUE")
        account, chunk_queue = path.split("/")
        base = self.options.get("endpoint", "").rstrip("/") or f"https://{parts.netloc}"
        self.chunk_queue_url = f"{base}/{account}/{chunk_queue}"
        transform_queue = self.options.get("transforms", chunk_queue)
        self.transform_queue_url = f"{base}/{account}/{transform_queue}"
        if "region" not in self.options and parts.netloc.startswith("sqs."):
            self.options["region"] = parts.netloc.split(".")[1]
        self.client = client or _client("sqs", self.options)

    def submit_chunk(self, spec: ChunkSpec) -> None:
        self.client.send_message(QueueUrl=self.chunk_queue_url,
                                 MessageBody=spec.model_dump_json())

    def submit_transform(self, request: TransformRequest) -> None:
        body = jsonio.dumps(claim_check(request, self.objects)).decode()
        self.client.send_message(QueueUrl=self.transform_queue_url, MessageBody=body)


class LambdaDispatcher(_AwsDispatcher):
    def __init__(self, url: str, settings: Settings, client: Any = None) -> None:
        super().__init__(url, settings)
        parts = urlsplit(url)
        if not parts.netloc:
            raise ConfigError(f"lambda:// URL {url!r}: use lambda://CHUNK_FUNCTION"
                              "?transforms=TRANSFORM_FUNCTION")
        self.chunk_function = parts.netloc
        self.transform_function = self.options.get("transforms", parts.netloc)
        self.client = client or _client("lambda", self.options)

    def _invoke(self, function: str, payload: bytes) -> None:
        self.client.invoke(FunctionName=function, InvocationType="Event", Payload=payload)

    def submit_chunk(self, spec: ChunkSpec) -> None:
        self._invoke(self.chunk_function, spec.model_dump_json().encode())

    def submit_transform(self, request: TransformRequest) -> None:
        self._invoke(self.transform_function,
                     jsonio.dumps(claim_check(request, self.objects)))
