"""A built-in demo SaaS API: deterministic data for any tenant, served on 127.0.0.1.

Three services shaped like real ones, bearer-token auth (``demo-<tenant>`` selects the
tenant's account):

- ``crm`` (contacts, companies, deals): ``?page=&per_page=``, ``results`` + ``total``;
- ``helpdesk`` (tickets, users): ``?page=&limit=`` with ``data`` + ``meta.total``, or, without
  ``page``, cursor pagination: ``?limit=&cursor=`` with ``meta.next_cursor``; pages filter
  by ``updated_since`` (inclusive), and :meth:`DemoApi.touch` changes 1% of the records;
- ``billing`` (customers, invoices): ``?offset=&limit=`` with ``data``, an RFC 8288 ``Link``
  header and ``links.next`` in the body.

A few records are deliberately bad (a deal amount of ``"n/a"``, a ticket without an id) so
quarantine is visible in every demo run. :class:`DemoFaults` injects 429s (with
``Retry-After``), 500s, malformed pages, totals that lie and capped page sizes, for tests.
"""

from __future__ import annotations

import base64
import errno
import threading
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, TypeVar
from urllib.parse import parse_qs, urlsplit

from canonflow import jsonio
from canonflow.errors import ConfigError

_EPOCH = datetime(2026, 1, 1, tzinfo=UTC)
FIRST = ["Ada", "Grace", "Alan", "Edsger", "Barbara", "Donald", "Margaret", "Ken", "Frances"]
LAST = ["Lovelace", "Hopper", "Turing", "Dijkstra", "Liskov", "Knuth", "Hamilton", "Thompson"]
INDUSTRY = ["software", "retail", "finance", "health", "energy", "logistics"]
STAGES = ["lead", "qualified", "proposal", "won", "lost"]
TICKET_STATUS = ["new", "open", "pending", "solved", "closed"]
PRIORITY = ["low", "normal", "high", "urgent"]
BAD_EVERY = 499  # every 499th deal / ticket is deliberately malformed


def tenant_token(tenant_id: str) -> str:
    return f"demo-{tenant_id}"


def _ts(seed: int, i: int) -> str:
    return (_EPOCH + timedelta(minutes=(seed + i * 37) % 500_000)).strftime("%Y-%m-%dT%H:%M:%SZ")


def _seed(tenant: str, table: str) -> int:
    return zlib.crc32(f"{tenant}:{table}".encode())


def contact(tenant: str, i: int) -> dict[str, Any]:
    s = _seed(tenant, "contacts")
    first, last = FIRST[(s + i) % len(FIRST)], LAST[(s + 3 * i) % len(LAST)]
    return {
        "id": str(100000 + i),
        "properties": {
            "email": f"{first.lower()}.{last.lower()}.{i}@{tenant}.example",
            "firstname": first, "lastname": last,
            "phone": f"+1-555-{(s + i) % 10000:04d}",
            "company_id": str(500000 + (i % 97)),
        },
        "lifecycle_stage": STAGES[(s + i) % len(STAGES)],
        "created_at": _ts(s, i), "updated_at": _ts(s, i + 11),
    }


def company(tenant: str, i: int) -> dict[str, Any]:
    s = _seed(tenant, "companies")
    return {
        "id": str(500000 + i),
        "properties": {
            "name": f"{LAST[(s + i) % len(LAST)]} {INDUSTRY[i % len(INDUSTRY)].title()} {i}",
            "domain": f"c{i}.{tenant}.example", "industry": INDUSTRY[(s + i) % len(INDUSTRY)],
            "employees": (s + i * 13) % 5000,
        },
        "updated_at": _ts(s, i),
    }


def deal(tenant: str, i: int) -> dict[str, Any]:
    s = _seed(tenant, "deals")
    amount = "n/a" if i % BAD_EVERY == BAD_EVERY - 1 else f"{(s + i * 7919) % 1_000_000 / 100:.2f}"
    return {
        "id": str(900000 + i),
        "properties": {"dealname": f"Deal {i}", "amount": amount,
                       "dealstage": STAGES[(s + i) % len(STAGES)],
                       "closedate": _ts(s, i + 1000)},
        "associations": {"companies": [str(500000 + (i % 97))]},
        "updated_at": _ts(s, i),
    }


def ticket(tenant: str, i: int) -> dict[str, Any]:
    s = _seed(tenant, "tickets")
    rec: dict[str, Any] = {
        "id": 7000 + i,
        "subject": f"Ticket {i}: cannot sync",
        "status": TICKET_STATUS[(s + i) % len(TICKET_STATUS)],
        "priority": PRIORITY[(s + i) % len(PRIORITY)],
        "requester_id": 3000 + (i % 211),
        "tags": ["sync", PRIORITY[i % len(PRIORITY)]],
        "created_at": _ts(s, i), "updated_at": _ts(s, i + 5),
    }
    if i % BAD_EVERY == BAD_EVERY - 1:
        del rec["id"]
    return rec


def user(tenant: str, i: int) -> dict[str, Any]:
    s = _seed(tenant, "users")
    first, last = FIRST[(s + 2 * i) % len(FIRST)], LAST[(s + i) % len(LAST)]
    return {
        "id": 3000 + i, "name": f"{first} {last}", "email": f"agent{i}@{tenant}.example",
        "role": "agent" if i % 5 else "admin", "active": i % 17 != 0, "updated_at": _ts(s, i),
    }


def customer(tenant: str, i: int) -> dict[str, Any]:
    s = _seed(tenant, "customers")
    return {
        "id": f"cus_{i:06d}", "object": "customer",
        "name": f"{LAST[(s + i) % len(LAST)]} Holdings {i}",
        "email": f"billing{i}@{tenant}.example",
        "created": 1_767_225_600 + (s + i * 61) % 10_000_000, "updated_at": _ts(s, i),
    }


INVOICE_STATUS = ["draft", "open", "paid", "void", "uncollectible"]


def invoice(tenant: str, i: int) -> dict[str, Any]:
    s = _seed(tenant, "invoices")
    due = (s + i * 7919) % 500_000
    return {
        "id": f"in_{i:06d}", "object": "invoice", "number": f"INV-{i:06d}",
        "customer": f"cus_{i % 211:06d}", "status": INVOICE_STATUS[(s + i) % 5],
        "currency": "eur", "amount_due": due, "amount_paid": due if (s + i) % 5 == 2 else 0,
        "created": 1_767_225_600 + (s + i * 97) % 10_000_000, "updated_at": _ts(s, i),
    }


Generator = Callable[[str, int], dict[str, Any]]
TABLES: dict[tuple[str, str], tuple[Generator, str]] = {
    ("crm", "contacts"): (contact, "crm"),
    ("crm", "companies"): (company, "crm"),
    ("crm", "deals"): (deal, "crm"),
    ("helpdesk", "tickets"): (ticket, "helpdesk"),
    ("helpdesk", "users"): (user, "helpdesk"),
    ("billing", "customers"): (customer, "billing"),
    ("billing", "invoices"): (invoice, "billing"),
}


@dataclass
class DemoFaults:
    """Misbehaviour on demand: every ``rate_limit_every``-th request is a 429 with
    ``Retry-After: retry_after``, every ``error_every``-th a 500, and the pages listed in
    ``malformed`` (``(table, page)``, 1-based) are truncated JSON. ``total_skew`` is added to
    every announced total (negative: the API undercounts, positive: it announces records it
    never serves), and ``page_size_cap`` silently caps the page size a client asks for."""

    rate_limit_every: int = 0
    error_every: int = 0
    retry_after: str = "0"
    malformed: set[tuple[str, int]] = field(default_factory=set)
    total_skew: int = 0
    page_size_cap: int = 0
    requests: int = 0
    injected: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def next_status(self) -> int:
        with self._lock:
            self.requests += 1
            n = self.requests
            status = 200
            if self.rate_limit_every and n % self.rate_limit_every == 0:
                status = 429
            elif self.error_every and n % self.error_every == 0:
                status = 500
            self.injected += status != 200
        return status


def expected_bad(table: tuple[str, str], records: int) -> int:
    """How many deliberately bad records the demo serves for a table of this size."""
    if table not in {("crm", "deals"), ("helpdesk", "tickets")}:
        return 0
    return records // BAD_EVERY


class DemoApi:
    """Holds the data sizes; :meth:`page` renders one response body."""

    def __init__(self, records_per_table: int = 2000, sizes: dict[str, int] | None = None,
                 cache_pages: int = 2048, page_delay: float = 0.0,
                 faults: DemoFaults | None = None) -> None:
        self.faults = faults or DemoFaults()
        self.revision = 0
        self.touch_every = 100
        self._since: dict[tuple[str, str, str, str, int], list[int]] = {}
        self.records_per_table = records_per_table
        self.page_delay = page_delay  # seconds each response waits: slow APIs, for tests
        self.sizes = dict(sizes or {})
        self._render = (lru_cache(maxsize=cache_pages)(self._render_uncached)
                        if cache_pages else self._render_uncached)

    def prerender(self, tenants: list[str], page_sizes: dict[str, int]) -> int:
        """Render every page of every table for these tenants now (benchmarks measure the
        client, not the generator); returns the bytes held."""
        held = 0
        for (service, table), _ in TABLES.items():
            if service == "billing":  # offset-paged: rendered per request
                continue
            per_page = page_sizes.get(table, 100)
            pages = max(1, -(-self.size(table) // per_page))
            for tenant in tenants:
                for page in range(1, pages + 1):
                    held += len(self.page(service, table, tenant, page, per_page))
        return held

    def size(self, table: str) -> int:
        return self.sizes.get(table, self.records_per_table)

    def touch(self, every: int = 100) -> None:
        """A new revision: every ``every``-th record of every table changes (its name or
        subject, and an ``updated_at`` later than any before)."""
        self.revision += 1
        self.touch_every = every

    def record(self, service: str, table: str, tenant: str, i: int) -> dict[str, Any]:
        gen, _ = TABLES[(service, table)]
        rec = gen(tenant, i)
        if self.revision and i % self.touch_every == 0:
            rec["updated_at"] = (_EPOCH + timedelta(minutes=600_000 + self.revision)).strftime(
                "%Y-%m-%dT%H:%M:%SZ")
            for key in ("subject", "name"):
                if key in rec:
                    rec[key] = f"{rec[key]} (rev {self.revision})"
        return rec

    def _matching(self, service: str, table: str, tenant: str, since: str,
                  before: str | None = None) -> list[int]:
        """Indices of records with ``since <= updated_at`` (and ``< before``)."""
        key = (service, table, tenant, f"{since}|{before}", self.revision)
        if key not in self._since:
            stamps = (self.record(service, table, tenant, i)["updated_at"]
                      for i in range(self.size(table)))
            self._since[key] = [i for i, at in enumerate(stamps)
                                if since <= at and (before is None or at < before)]
        return self._since[key]

    def page(self, service: str, table: str, tenant: str, page: int, per_page: int,
             since: str | None = None, before: str | None = None) -> bytes:
        return self._render(service, table, tenant, page, per_page, since, before,
                            self.revision, self.faults.total_skew)

    def rows(self, service: str, table: str, tenant: str, offset: int,
             limit: int) -> list[dict[str, Any]]:
        return [self.record(service, table, tenant, i)
                for i in range(offset, min(offset + limit, self.size(table)))]

    def _render_uncached(self, service: str, table: str, tenant: str, page: int,
                         per_page: int, since: str | None = None, before: str | None = None,
                         revision: int = 0, total_skew: int = 0) -> bytes:
        _, shape = TABLES[(service, table)]
        start = (page - 1) * per_page
        indices: Sequence[int]
        if since is None and before is None:
            total = self.size(table)
            indices = range(start, min(start + per_page, total))
        else:
            matching = self._matching(service, table, tenant, since or "", before)
            total, indices = len(matching), matching[start:start + per_page]
        rows = [self.record(service, table, tenant, i) for i in indices]
        total = max(0, total + total_skew)  # a fault switch: an API whose count is wrong
        if shape == "crm":
            body = {"results": rows, "total": total, "page": page, "per_page": per_page}
        else:
            body = {"data": rows, "meta": {"total": total, "page": page, "limit": per_page}}
        return jsonio.dumps(body)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # TCP_NODELAY, as HTTP servers set it: the headers and the body go out in two writes,
    # and with Nagle's algorithm a small body (an empty last page) waited for the client's
    # delayed ACK of the headers, 40 ms on Linux
    disable_nagle_algorithm = True
    api: DemoApi

    def log_message(self, format: str, *args: Any) -> None:
        return

    def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        parts = urlsplit(self.path)
        segments = [s for s in parts.path.split("/") if s]
        if len(segments) != 3 or segments[1] != "v1" or (segments[0], segments[2]) not in TABLES:
            self._send(404, b'{"error":"not found"}')
            return
        auth = self.headers.get("Authorization", "")
        if not auth.startswith("Bearer demo-") or len(auth) <= len("Bearer demo-"):
            self._send(401, b'{"error":"missing or invalid bearer token"}')
            return
        tenant = auth[len("Bearer demo-"):]
        query = parse_qs(parts.query)
        api: DemoApi = self.server.api  # type: ignore[attr-defined]
        status = api.faults.next_status()
        if status != 200:
            self._send(status, b'{"error":"try again"}', {"Retry-After": api.faults.retry_after}
                       if status == 429 else None)
            return
        service, table = segments[0], segments[2]
        if service == "billing" or (service == "helpdesk" and "page" not in query):
            self._serve_stream(api, service, table, tenant, query, parts.path)
            return
        size_param = "per_page" if segments[0] == "crm" else "limit"
        try:
            page = int(query.get("page", ["1"])[0])
            per_page = int(query.get(size_param, ["100"])[0])
        except ValueError:
            self._send(400, b'{"error":"page and page size must be integers"}')
            return
        if page < 1 or not 1 <= per_page <= 10_000:
            self._send(400, b'{"error":"page must be >= 1 and page size 1..10000"}')
            return
        if api.faults.page_size_cap:
            per_page = min(per_page, api.faults.page_size_cap)
        if api.page_delay:
            time.sleep(api.page_delay)
        since = query.get("updated_since", [None])[0] if service == "helpdesk" else None
        before = query.get("updated_before", [None])[0] if service == "helpdesk" else None
        body = api.page(service, table, tenant, page, per_page, since, before)
        self._send(200, body[:-7] if (table, page) in api.faults.malformed else body)

    def _serve_stream(self, api: DemoApi, service: str, table: str, tenant: str,
                      query: dict[str, list[str]], path: str) -> None:
        """Offset (billing) and cursor (helpdesk) pagination over the same data."""
        try:
            limit = int(query.get("limit", ["100"])[0])
            if service == "billing":
                offset = int(query.get("offset", ["0"])[0])
            else:
                cursor = query.get("cursor", [""])[0]
                offset = int(base64.urlsafe_b64decode(cursor.encode()).decode()[2:]) \
                    if cursor else 0
        except ValueError:
            self._send(400, b'{"error":"bad offset, cursor or limit"}')
            return
        if offset < 0 or not 1 <= limit <= 10_000:
            self._send(400, b'{"error":"offset must be >= 0 and limit 1..10000"}')
            return
        if api.faults.page_size_cap:
            limit = min(limit, api.faults.page_size_cap)
        if api.page_delay:
            time.sleep(api.page_delay)
        rows = api.rows(service, table, tenant, offset, limit)
        more = offset + len(rows) < api.size(table)
        headers = None
        if service == "billing":
            host = self.headers.get("Host", "127.0.0.1")
            nxt = f"http://{host}{path}?offset={offset + limit}&limit={limit}" if more else None
            body: dict[str, Any] = {"data": rows, "links": {"next": nxt}}
            if nxt:
                headers = {"Link": f'<{nxt}>; rel="next"'}
        else:
            token = base64.urlsafe_b64encode(f"o:{offset + limit}".encode()).decode()
            body = {"data": rows, "meta": {"next_cursor": token if more else None}}
        page_no = offset // limit + 1
        text = jsonio.dumps(body)
        if (table, page_no) in api.faults.malformed:
            text = text[:-7]
        self._send(200, text, headers)


class DemoServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, api: DemoApi, port: int = 0) -> None:
        self.api = api
        if not 0 <= port <= 65535:
            raise ConfigError(f"port {port} is not a TCP port: use 1-65535, or 0 for any "
                              "free port")
        try:
            super().__init__(("127.0.0.1", port), _Handler)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise ConfigError(f"port {port} on 127.0.0.1 is in use: stop what listens "
                                  "there, or choose another --port (0: any free port)"
                                  ) from None
            raise ConfigError(f"cannot listen on 127.0.0.1:{port}: {exc.strerror}; choose "
                              "another --port (0: any free port)") from None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


S = TypeVar("S", bound=ThreadingHTTPServer)


@contextmanager
def running(server: S, name: str = "demo-api") -> Iterator[S]:
    """Serve ``server`` on a background thread for the duration of the block."""
    thread = threading.Thread(target=server.serve_forever, name=name, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@contextmanager
def serve(api: DemoApi | None = None, port: int = 0) -> Iterator[DemoServer]:
    """Run the demo API on a background thread for the duration of the block."""
    with running(DemoServer(api or DemoApi(), port)) as server:
        yield server
