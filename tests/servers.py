"""Local HTTP stand-ins for APIs (the secret-testing API, the real-API mocks): one server
class on 127.0.0.1 with a free port, serving an API object to its request handler."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Generic, TypeVar

import orjson

from canonflow.connectors.demo_api import running

A = TypeVar("A")


class JsonHandler(BaseHTTPRequestHandler):
    """Quiet, keep-alive, and ``_send`` answers a JSON document."""

    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # a small body does not wait 40 ms for a delayed ACK

    def log_message(self, format: str, *args: Any) -> None:
        return

    def _send(self, status: int, doc: Any) -> None:
        body = orjson.dumps(doc)
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class ApiServer(ThreadingHTTPServer, Generic[A]):
    daemon_threads = True

    def __init__(self, api: A, handler: type[BaseHTTPRequestHandler]) -> None:
        self.api = api
        super().__init__(("127.0.0.1", 0), handler)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


@contextmanager
def serve_api(api: A, handler: type[BaseHTTPRequestHandler],
              name: str) -> Iterator[ApiServer[A]]:
    """Serve ``api`` on a background thread for the duration of the block."""
    with running(ApiServer(api, handler), name) as server:
        yield server
