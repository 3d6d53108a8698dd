"""A DynamoDB-compatible server for tests: moto's WSGI app behind one lock.

moto's server answers concurrent requests without a lock of its own: several processes doing
conditional increments and claims on one item lose updates and double-claim. Behind one
``threading.Lock`` each request runs alone, as DynamoDB's per-item serialization promises,
so the tests judge canonflow's conditions and not moto's races.
(``tests/reliability/test_locked_dynamodb_server.py`` guards this wrapper.)

moto also backs up every table a transaction touches with a deep copy, to restore it if the
transaction is cancelled: O(table size) per transaction, minutes for a job of 2,000 chunks.
Under the one lock no other request runs meanwhile, so backing up only the items the
transaction touches and putting them back on cancellation is the same rollback
(:func:`item_level_rollback`, on while the server runs).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable
from typing import Any

from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app
from werkzeug.serving import BaseWSGIServer, WSGIRequestHandler, make_server

WsgiApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]

TEST_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                    "AWS_REGION": "us-east-1"}


def serialized(app: WsgiApp) -> WsgiApp:
    """The app with every request handled under one lock, its body read inside it."""
    lock = threading.Lock()

    def handle(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        with lock:
            body = app(environ, start_response)
            try:
                data = b"".join(body)
            finally:
                close = getattr(body, "close", None)
                if close is not None:
                    close()
        return [data]

    return handle


def item_level_rollback() -> Callable[[], None]:
    """Make moto's TransactWriteItems back up only the items it touches; returns the undo."""
    from moto.dynamodb import models

    original = models.DynamoDBBackend.transact_write_items
    real_copy = models.copy

    class _NoTableCopy:
        @staticmethod
        def deepcopy(value: Any) -> Any:  # the table itself is not copied (items are)
            return value if isinstance(value, models.Table) else real_copy.deepcopy(value)

    def transact_write_items(self: Any, transact_items: list[dict[str, Any]]) -> None:
        saved: list[tuple[str, dict[str, Any], dict[str, Any] | None]] = []
        for action in transact_items:
            _, op = next(iter(action.items()))
            name = op["TableName"]
            table = self.get_table(name)
            if "Item" in op:
                key = {a: op["Item"][a] for a in (table.hash_key_attr, table.range_key_attr)
                       if a is not None}
            else:
                key = op["Key"]
            current = self.get_item(name, key)
            saved.append((name, key, None if current is None
                          else real_copy.deepcopy(current.to_json()["Attributes"])))
        models.copy = _NoTableCopy
        try:
            original(self, transact_items)
        except Exception:
            for name, key, attrs in reversed(saved):
                if attrs is None:
                    self.delete_item(name, key)
                else:
                    self.put_item(name, attrs)
            raise
        finally:
            models.copy = real_copy

    models.DynamoDBBackend.transact_write_items = transact_write_items

    def undo() -> None:
        models.DynamoDBBackend.transact_write_items = original

    return undo


class _QuietHandler(WSGIRequestHandler):
    def log_request(self, *args: Any, **kwargs: Any) -> None:  # no line per request
        pass


class LockedDynamoServer:
    """moto's DynamoDB on 127.0.0.1 at a free port, in a thread of this process; started
    and stopped by its handle."""

    def __init__(self) -> None:
        app = DomainDispatcherApplication(create_backend_app)
        self._server: BaseWSGIServer = make_server(
            "127.0.0.1", 0, serialized(app), threaded=True, request_handler=_QuietHandler)
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        name="dynamodb-test-server", daemon=True)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self._server.server_port}"

    def start(self) -> LockedDynamoServer:
        for key, value in TEST_CREDENTIALS.items():
            os.environ.setdefault(key, value)
        self._undo = item_level_rollback()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(10)
        self._undo()
