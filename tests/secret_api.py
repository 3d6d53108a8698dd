"""A tiny local API that authenticates every way connectors do, for the secret tests.

Three services on 127.0.0.1, ten records a page, records that carry no secret:

- ``/bearer/items?page=&per_page=``: ``Authorization: Bearer <token>``, a ``total``;
- ``/keyed/items?limit=[&after=]``: ``?api_key=<key>``, and the API echoes the key in the
  next link of every page (``links.next``), as some APIs do;
- ``/basic/items?page=&per_page=``: HTTP Basic.

``drop`` maps ``(service, page)`` pairs to how many times their request is answered by
closing the connection before it is served normally (-1: always).
"""

from __future__ import annotations

import base64
import threading
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

from tests.servers import ApiServer, JsonHandler, serve_api

PAGE = 10


@dataclass
class SecretApi:
    token: str
    api_key: str
    username: str
    password: str
    records: int = 35
    drop: dict[tuple[str, int], int] = field(default_factory=dict)
    dropped: dict[tuple[str, int], int] = field(default_factory=dict)
    requests: list[str] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def should_drop(self, service: str, page: int) -> bool:
        with self._lock:
            times = self.drop.get((service, page), 0)
            n = self.dropped.get((service, page), 0)
            if times >= 0 and n >= times:
                return False
            self.dropped[(service, page)] = n + 1
            return True


def record(service: str, i: int) -> dict[str, Any]:
    return {"id": f"{service}-{i:04d}", "name": f"item {i}", "updated_at": "2026-01-02T03:04:05Z"}


class _Handler(JsonHandler):

    def do_GET(self) -> None:
        api: SecretApi = self.server.api  # type: ignore[attr-defined]
        parts = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        service = parts.path.strip("/").split("/")[0]
        api.requests.append(self.path)
        if service == "bearer":
            ok = self.headers.get("Authorization") == f"Bearer {api.token}"
        elif service == "keyed":
            ok = query.get("api_key") == api.api_key
        elif service == "basic":
            cred = base64.b64encode(f"{api.username}:{api.password}".encode()).decode()
            ok = self.headers.get("Authorization") == f"Basic {cred}"
        else:
            self._send(404, {"error": "not found"})
            return
        if not ok:
            self._send(401, {"error": "unauthorized"})
            return
        if service == "keyed":
            start = int(query.get("after", "0"))
        else:
            start = (int(query.get("page", "1")) - 1) * PAGE
        page = start // PAGE + 1
        if api.should_drop(service, page):
            self.close_connection = True
            self.connection.shutdown(2)  # no response at all: a dropped connection
            return
        rows = [record(service, i) for i in range(start, min(start + PAGE, api.records))]
        if service == "keyed":
            more = start + PAGE < api.records
            host = self.headers.get("Host", "127.0.0.1")
            nxt = (f"http://{host}/keyed/items?"
                   + urlencode({"after": start + PAGE, "limit": PAGE, "api_key": api.api_key})
                   if more else None)
            self._send(200, {"data": rows, "links": {"next": nxt}})
        else:
            self._send(200, {"results": rows, "total": api.records})


SecretServer = ApiServer[SecretApi]


def serve_secret_api(api: SecretApi) -> AbstractContextManager[SecretServer]:
    return serve_api(api, _Handler, "secret-api")


BEARER_SPEC = """
service: {service}
base_url: http://127.0.0.1/bearer
auth: {{type: bearer, credential: token}}
max_retries: 1
tables:
  items:
    path: /items
    records_path: results
    primary_key: id
    pagination: {{type: page_number, page_param: page, size_param: per_page, page_size: 10,
                 total_path: total}}
    chunking: {{type: page_ranges, pages_per_chunk: 2}}
"""
KEYED_SPEC = """
service: {service}
base_url: http://127.0.0.1/keyed
auth: {{type: api_key, name: api_key, location: query, credential: key}}
max_retries: 1
tables:
  items:
    path: /items
    records_path: data
    primary_key: id
    pagination: {{type: next_url, next_path: links.next, size_param: limit, page_size: 10}}
    chunking: {{type: sequential}}
"""
BASIC_SPEC = """
service: {service}
base_url: http://127.0.0.1/basic
auth: {{type: basic, username_credential: user, password_credential: password}}
max_retries: 1
tables:
  items:
    path: /items
    records_path: results
    primary_key: id
    pagination: {{type: page_number, page_param: page, size_param: per_page, page_size: 10,
                 total_path: total}}
    chunking: {{type: sequential}}
"""
