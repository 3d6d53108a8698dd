"""A test "pump" that plays Lambda and SQS for the handlers of :mod:`canonflow.aws.handlers`.

Queues are real SQS queues (moto) with dead-letter queues after ``max_receives``. The pump
receives messages, shuffles them (out of order), hands them to the handler in batches of
random size as Lambda's SQS event source does, sometimes delivers a batch twice
(duplicates without errors), and sometimes kills the invocation at a random point: the
``n``-th call into the state store or the object store raises :class:`Killed`, a
BaseException no handler code catches, so the invocation ends mid-step as a killed process
would. Messages of a killed batch, and those the handler reports as failed, become visible
again after a (short, simulated) visibility timeout; the others are deleted.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from canonflow.aws import handlers

Handler = Callable[[dict[str, Any], Any], dict[str, Any]]


class Killed(BaseException):
    """The invocation was killed (timeout, out of memory, a lost container)."""


class FakeContext:
    """A Lambda context whose remaining time is controllable."""

    function_name = "canonflow-test"
    memory_limit_in_mb = 1024
    invoked_function_arn = "arn:aws:lambda:us-east-1:123456789012:function:canonflow-test"
    aws_request_id = "00000000-0000-0000-0000-000000000000"

    def __init__(self, remaining_ms: Callable[[], int] | int = 900_000) -> None:
        self._remaining = remaining_ms

    def get_remaining_time_in_millis(self) -> int:
        return self._remaining() if callable(self._remaining) else self._remaining


class _Killer:
    """Wraps a store: the invocation's ``n``-th method call raises :class:`Killed`.

    Only calls made on the invocation's own thread count down: a killed Lambda takes its
    threads with it, so a heartbeat thread must not be the one that "dies" while the handler
    goes on (the kill would be lost)."""

    def __init__(self, inner: Any, countdown: list[int]) -> None:
        self._inner, self._countdown = inner, countdown
        self._thread = threading.get_ident()

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._inner, name)
        if not callable(value):
            return value

        def call(*args: Any, **kwargs: Any) -> Any:
            if threading.get_ident() == self._thread:
                self._countdown[0] -= 1
                if self._countdown[0] == 0:
                    raise Killed(name)
            return value(*args, **kwargs)

        return call


def _arm(rng: random.Random, kill: float, kills_so_far: int, min_kills: int) -> int | None:
    """The countdown for a killable invocation, or None to let it run. Until ``min_kills``
    kills have happened every invocation is armed with a short countdown, so a run always
    kills what its test says it kills, whatever order the queue hands messages in."""
    if kills_so_far < min_kills:
        return rng.randint(1, 4)
    if rng.random() < kill:
        return rng.randint(1, 12)
    return None


@dataclass
class Queue:
    url: str
    dlq_url: str
    handler: Handler
    arn: str


@dataclass
class Stats:
    invocations: int = 0
    messages_delivered: int = 0
    duplicates: int = 0
    kills: int = 0
    failures_reported: int = 0


class Pump:
    def __init__(self, sqs: Any, queues: list[Queue], seed: int = 7, duplicate: float = 0.3,
                 kill: float = 0.15, max_batch: int = 3, visibility_seconds: int = 1,
                 min_kills: int = 0, max_receives: int = 5) -> None:
        self.sqs, self.queues = sqs, queues
        self.max_receives = max_receives  # the queues' maxReceiveCount (make_queues)
        self.rng = random.Random(seed)
        self.duplicate, self.kill, self.max_batch = duplicate, kill, max_batch
        self.min_kills = min_kills
        self.visibility = visibility_seconds
        self.stats = Stats()
        self.context = FakeContext()

    def _event(self, queue: Queue, messages: list[dict[str, Any]]) -> dict[str, Any]:
        return {"Records": [{
            "messageId": m["MessageId"], "receiptHandle": m["ReceiptHandle"],
            "body": m["Body"], "attributes": {
                "ApproximateReceiveCount": m["Attributes"]["ApproximateReceiveCount"],
                "SentTimestamp": m["Attributes"].get("SentTimestamp", "0")},
            "messageAttributes": {}, "md5OfBody": m["MD5OfBody"], "eventSource": "aws:sqs",
            "eventSourceARN": queue.arn, "awsRegion": "us-east-1"} for m in messages]}

    def _invoke(self, queue: Queue, event: dict[str, Any], killable: bool) -> set[str] | None:
        """The ids of the messages that failed; None if the invocation was killed."""
        self.stats.invocations += 1
        c = handlers.container()
        rt = c.rt
        saved = {k: rt.__dict__[k] for k in ("state", "objects") if k in rt.__dict__}
        armed = _arm(self.rng, self.kill, self.stats.kills, self.min_kills) if killable else None
        if armed is not None:
            countdown = [armed]
            rt.__dict__["state"] = _Killer(rt.state, countdown)
            rt.__dict__["objects"] = _Killer(rt.objects, countdown)
        try:
            response = queue.handler(event, self.context)
        except Killed:
            self.stats.kills += 1
            return None
        finally:
            rt.__dict__.update(saved)
        failed = {f["itemIdentifier"] for f in response.get("batchItemFailures", [])}
        self.stats.failures_reported += len(failed)
        return failed

    def step(self) -> int:
        """One round over the queues; the number of messages received."""
        received = 0
        for queue in self.queues:
            got = self.sqs.receive_message(
                QueueUrl=queue.url, MaxNumberOfMessages=10, WaitTimeSeconds=0,
                VisibilityTimeout=30, AttributeNames=["All"]).get("Messages", [])
            received += len(got)
            self.rng.shuffle(got)
            while got:
                size = self.rng.randint(1, self.max_batch)
                batch, got = got[:size], got[size:]
                event = self._event(queue, batch)
                self.stats.messages_delivered += len(batch)
                # a message on its last receive is not killed: a kill then would send it to
                # the dead-letter queue, which is the dice's doing, not the handlers' (dead
                # letters have tests of their own); a failure the handler reports still does
                last = max(int(m["Attributes"]["ApproximateReceiveCount"]) for m in batch) \
                    >= self.max_receives
                failed = self._invoke(queue, event, killable=not last)
                if failed is not None and self.rng.random() < self.duplicate:
                    self.stats.duplicates += len(batch)  # the same events again, no error
                    again = self._invoke(queue, event, killable=False)
                    failed = failed if again is None else failed | again
                for m in batch:
                    if failed is None or m["MessageId"] in failed:
                        # visible again after the (simulated) visibility timeout
                        self.sqs.change_message_visibility(
                            QueueUrl=queue.url, ReceiptHandle=m["ReceiptHandle"],
                            VisibilityTimeout=self.visibility)
                    else:
                        self.sqs.delete_message(QueueUrl=queue.url,
                                                ReceiptHandle=m["ReceiptHandle"])
        return received

    def waiting(self) -> int:
        total = 0
        for queue in self.queues:
            attrs = self.sqs.get_queue_attributes(
                QueueUrl=queue.url, AttributeNames=["ApproximateNumberOfMessages",
                                                    "ApproximateNumberOfMessagesNotVisible"])
            total += sum(int(v) for v in attrs["Attributes"].values())
        return total

    def drain(self, deadline: float) -> None:
        """Deliver until every queue is empty (messages in flight included)."""
        while self.waiting():
            if time.monotonic() > deadline:
                raise AssertionError("the queues did not drain in time")
            if not self.step():
                time.sleep(0.2)  # only messages waiting for their visibility timeout

    def dead_letters(self) -> int:
        total = 0
        for queue in self.queues:
            attrs = self.sqs.get_queue_attributes(
                QueueUrl=queue.dlq_url, AttributeNames=["ApproximateNumberOfMessages"])
            total += int(attrs["Attributes"]["ApproximateNumberOfMessages"])
        return total


def make_queues(sqs: Any, prefix: str, max_receives: int = 5) -> dict[str, tuple[str, str,
                                                                                   str]]:
    """A queue with a dead-letter queue (after ``max_receives``) per kind: url, dlq, arn."""
    out = {}
    for kind in ("chunks", "transforms"):
        dlq = sqs.create_queue(QueueName=f"{prefix}-{kind}-dlq")["QueueUrl"]
        dlq_arn = sqs.get_queue_attributes(QueueUrl=dlq, AttributeNames=["QueueArn"])[
            "Attributes"]["QueueArn"]
        url = sqs.create_queue(QueueName=f"{prefix}-{kind}", Attributes={
            "VisibilityTimeout": "30",
            "RedrivePolicy": f'{{"deadLetterTargetArn":"{dlq_arn}",'
                             f'"maxReceiveCount":"{max_receives}"}}'})["QueueUrl"]
        arn = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])[
            "Attributes"]["QueueArn"]
        out[kind] = (url, dlq, arn)
    return out


class AsyncLambda:
    """Plays Lambda's async invokes (``lambda://``): the fake client the dispatcher invokes,
    and a delivery loop that runs the queued events out of order, some twice, kills some
    invocations at a random point and retries a failed event twice before it goes to the
    on-failure destination (``dead``)."""

    def __init__(self, functions: dict[str, Handler], seed: int = 7, duplicate: float = 0.3,
                 kill: float = 0.2, min_kills: int = 0) -> None:
        self.functions = functions
        self.rng = random.Random(seed)
        self.duplicate, self.kill, self.min_kills = duplicate, kill, min_kills
        self.queued: list[tuple[str, bytes, int]] = []  # function, payload, attempt
        self.dead: list[tuple[str, bytes]] = []
        self.stats = Stats()

    def invoke(self, FunctionName: str, InvocationType: str, Payload: bytes
               ) -> dict[str, Any]:
        assert InvocationType == "Event"
        self.queued.append((FunctionName, Payload, 0))
        return {"StatusCode": 202}

    def _run(self, function: str, payload: bytes, killable: bool) -> bool:
        self.stats.invocations += 1
        rt = handlers.container().rt
        saved = {k: rt.__dict__[k] for k in ("state", "objects") if k in rt.__dict__}
        armed = _arm(self.rng, self.kill, self.stats.kills, self.min_kills) if killable else None
        if armed is not None:
            countdown = [armed]
            rt.__dict__["state"] = _Killer(rt.state, countdown)
            rt.__dict__["objects"] = _Killer(rt.objects, countdown)
        try:
            self.functions[function](orjson_loads(payload), FakeContext())
            return True
        except Killed:
            self.stats.kills += 1
            return False
        except Exception:
            self.stats.failures_reported += 1
            return False
        finally:
            rt.__dict__.update(saved)

    def drain(self) -> None:
        while self.queued:
            self.rng.shuffle(self.queued)
            function, payload, attempt = self.queued.pop()
            self.stats.messages_delivered += 1
            ok = self._run(function, payload, killable=True)
            if ok and self.rng.random() < self.duplicate:
                self.stats.duplicates += 1
                ok = self._run(function, payload, killable=False)
            if not ok:
                if attempt < 2:
                    self.queued.append((function, payload, attempt + 1))
                else:
                    self.dead.append((function, payload))


def orjson_loads(payload: bytes) -> Any:
    from canonflow import jsonio

    return jsonio.loads(payload)


@contextmanager
def lambda_container() -> Iterator[None]:
    """Around a test that configures the handlers' container: afterwards the container is
    dropped and canonflow's logging is as it was (the handlers log JSON to stderr, as on
    Lambda)."""
    logger = logging.getLogger("canonflow")
    saved = (list(logger.handlers), logger.level, logger.propagate)
    try:
        yield
    finally:
        handlers.reset()
        logger.handlers[:], logger.level, logger.propagate = saved
