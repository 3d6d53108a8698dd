"""Local stand-ins for HubSpot CRM v3, Zendesk's incremental exports and Stripe lists, on
127.0.0.1, written from each API's public reference: their envelopes, cursors, limits,
filters and errors, and the shapes of archived, deleted and zero-decimal records.

- HubSpot ``/hubspot/crm/v3/objects/{contacts,companies}``: bearer token; ``limit`` at most
  100 (else 400); ``after`` an opaque cursor, the next at ``paging.next.after``; only the
  default properties unless ``properties=a,b`` names others; every property a string, ``""``
  for a cleared value; ``archived=true`` lists archived objects only (``archivedAt``).
- Zendesk ``/zendesk/api/v2/incremental/{tickets,users}/cursor.json``: basic auth; the first
  request needs ``start_time`` in epoch seconds (400 otherwise), the next ones only
  ``cursor`` (from ``after_url``); ``per_page`` at most 1000; ``end_of_stream`` true on the
  last page, which still carries an ``after_url``; deleted tickets have status ``deleted``.
- Stripe ``/stripe/v1/{customers,invoices,events}``: bearer key; newest first; ``limit`` at
  most 100; ``starting_after=<id>``; ``has_more``; ``created[gte]`` in epoch seconds (400 for
  anything else); events filter by ``type``; a deleted customer leaves the list and a
  ``customer.deleted`` event is created.
"""

from __future__ import annotations

import base64
import threading
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

from tests.servers import ApiServer, JsonHandler, serve_api

HUBSPOT_TOKEN = "pat-na1-11111111-2222"
ZENDESK_USER, ZENDESK_TOKEN = "ada@example.com/token", "zd-api-token-3333"
STRIPE_KEY = "sk_test_4444555566667777"
T0 = datetime(2024, 1, 1, tzinfo=UTC)
HS_DEFAULTS = {"contacts": ["createdate", "email", "firstname", "hs_object_id", "lastmodifieddate",
                            "lastname"],
               "companies": ["createdate", "domain", "hs_object_id", "hs_lastmodifieddate",
                             "name"]}
STAGES = ["subscriber", "lead", "marketingqualifiedlead", "customer", "", "987654321"]
# amounts in minor units: $2,237.57, ¥349, 1.234 KWD, €0.05
CURRENCIES = [("usd", 223757), ("jpy", 349), ("kwd", 1234), ("eur", 5)]


def iso(t: datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%S.") + f"{t.microsecond // 1000:03d}Z"


def hs_contact(i: int) -> dict[str, Any]:
    created = T0 + timedelta(hours=i)
    return {"id": str(1000 + i), "archived": False, "createdAt": iso(created),
            "updatedAt": iso(created + timedelta(days=1)), "properties": {
                "createdate": iso(created), "lastmodifieddate": iso(created + timedelta(days=1)),
                "hs_object_id": str(1000 + i), "email": f"person{i}@example.com",
                "firstname": f"First{i}" if i % 7 else "",  # a cleared first name
                "lastname": f"Last{i}",
                "phone": "" if i % 5 == 0 else f"+1 555 01{i:04d}",
                "associatedcompanyid": "" if i % 4 == 0 else str(5000 + i % 40),
                "lifecyclestage": STAGES[i % len(STAGES)]}}


def hs_company(i: int) -> dict[str, Any]:
    created = T0 + timedelta(hours=i)
    return {"id": str(5000 + i), "archived": False, "createdAt": iso(created),
            "updatedAt": iso(created + timedelta(days=2)), "properties": {
                "createdate": iso(created), "hs_lastmodifieddate": iso(created + timedelta(days=2)),
                "hs_object_id": str(5000 + i), "name": f"Company {i}",
                "domain": f"company{i}.example", "industry": "" if i % 3 == 0 else "SOFTWARE",
                "numberofemployees": "" if i % 10 == 0 else str(10 * (i + 1))}}


def zd_ticket(i: int, updated: datetime) -> dict[str, Any]:
    return {"id": 35000 + i, "url": f"https://example.zendesk.com/api/v2/tickets/{35000 + i}.json",
            "subject": f"Ticket {i}", "raw_subject": f"Ticket {i}",
            "status": ["new", "open", "pending", "hold", "solved", "closed"][i % 6],
            "priority": ["low", "normal", "high", "urgent", None][i % 5],
            "requester_id": 20978000 + i % 50, "tags": ["enterprise"] if i % 2 else [],
            "created_at": (T0 + timedelta(hours=i)).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "updated_at": updated.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "generated_timestamp": int(updated.timestamp())}


def stripe_customer(i: int) -> dict[str, Any]:
    return {"id": f"cus_{i:014d}", "object": "customer", "balance": 0,
            "created": int((T0 + timedelta(hours=i)).timestamp()), "currency": "usd",
            "email": f"buyer{i}@example.com", "name": f"Buyer {i}", "phone": None,
            "livemode": False, "metadata": {}, "delinquent": False}


def stripe_invoice(i: int) -> dict[str, Any]:
    currency, amount = CURRENCIES[i % len(CURRENCIES)]
    created = int((T0 + timedelta(hours=i)).timestamp())
    draft = i % 10 == 9
    return {"id": f"in_{i:014d}", "object": "invoice", "number": None if draft else f"A-{i:04d}",
            "customer": f"cus_{i % 30:014d}", "status": "draft" if draft else "paid",
            "currency": currency, "amount_due": amount, "amount_paid": 0 if draft else amount,
            "created": created, "due_date": None,
            "status_transitions": {"finalized_at": None if draft else created + 3600,
                                   "paid_at": None if draft else created + 7200,
                                   "marked_uncollectible_at": None, "voided_at": None}}


@dataclass
class RealApis:
    hs: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    zd_tickets: dict[int, dict[str, Any]] = field(default_factory=dict)
    customers: dict[str, dict[str, Any]] = field(default_factory=dict)
    invoices: dict[str, dict[str, Any]] = field(default_factory=dict)
    events: list[dict[str, Any]] = field(default_factory=list)
    requests: list[tuple[str, dict[str, str]]] = field(default_factory=list)
    fail: set[str] = field(default_factory=set)  # paths whose later pages answer 400
    lock: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    def seeded(cls, contacts: int = 250, companies: int = 120, tickets: int = 300,
               customers: int = 150, invoices: int = 40) -> RealApis:
        api = cls()
        api.hs = {"contacts": {str(1000 + i): hs_contact(i) for i in range(contacts)},
                  "companies": {str(5000 + i): hs_company(i) for i in range(companies)}}
        api.zd_tickets = {35000 + i: zd_ticket(i, T0 + timedelta(days=1, minutes=i))
                          for i in range(tickets)}
        api.customers = {c["id"]: c for c in map(stripe_customer, range(customers))}
        api.invoices = {v["id"]: v for v in map(stripe_invoice, range(invoices))}
        return api

    def seen(self, prefix: str) -> list[dict[str, str]]:
        """The query parameters of each request whose path starts with ``prefix``."""
        with self.lock:
            return [q for p, q in self.requests if p.startswith(prefix)]

    # --- changes made in the source between syncs -------------------------------------------
    def hs_archive(self, kind: str, ids: list[str], at: datetime) -> None:
        for i in ids:
            rec = self.hs[kind][i]
            rec.update(archived=True, archivedAt=iso(at), updatedAt=iso(at))

    def hs_purge(self, kind: str, ids: list[str]) -> None:
        for i in ids:
            del self.hs[kind][i]

    def zd_change(self, ids: list[int], at: datetime, status: str | None = None) -> None:
        for i in ids:
            t = self.zd_tickets[i]
            t["updated_at"] = at.strftime("%Y-%m-%dT%H:%M:%SZ")
            t["generated_timestamp"] = int(at.timestamp())
            if status is not None:
                t["status"] = status
            else:
                t["subject"] += " (edited)"

    def stripe_delete(self, ids: list[str], at: datetime) -> None:
        for n, i in enumerate(ids):
            obj = self.customers.pop(i)
            self.events.append({"id": f"evt_{len(self.events):014d}", "object": "event",
                                "type": "customer.deleted", "api_version": "2024-06-20",
                                "created": int(at.timestamp()) + n,
                                "data": {"object": obj}, "livemode": False,
                                "pending_webhooks": 0, "request": {"id": None}})

    def stripe_add(self, first: int, n: int, at: datetime) -> None:
        for i in range(first, first + n):
            c = stripe_customer(i)
            c["created"] = int(at.timestamp()) + i
            self.customers[c["id"]] = c


class _Handler(JsonHandler):

    @property
    def host(self) -> str:
        return f"http://{self.headers.get('Host', '127.0.0.1')}"

    def do_GET(self) -> None:
        api: RealApis = self.server.api  # type: ignore[attr-defined]
        parts = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        with api.lock:
            api.requests.append((parts.path, query))
            if parts.path in api.fail and "after" in query:
                self._send(400, {"status": "error", "category": "VALIDATION_ERROR",
                                 "message": "The paging cursor has expired"})
                return
            service = parts.path.strip("/").split("/")[0]
            handler = {"hubspot": self._hubspot, "zendesk": self._zendesk,
                       "stripe": self._stripe}.get(service)
            if handler is None:
                self._send(404, {"error": "not found"})
                return
            status, doc = handler(api, parts.path, query)
        self._send(status, doc)

    def _hubspot(self, api: RealApis, path: str, q: dict[str, str]) -> tuple[int, Any]:
        if self.headers.get("Authorization") != f"Bearer {HUBSPOT_TOKEN}":
            return 401, {"status": "error", "message": "Authentication credentials not found.",
                         "category": "INVALID_AUTHENTICATION"}
        kind = path.rsplit("/", 1)[-1]
        if kind not in api.hs:
            return 404, {"status": "error", "message": "Unknown object type"}
        limit = int(q.get("limit", "10"))
        if not 1 <= limit <= 100:
            return 400, {"status": "error", "category": "VALIDATION_ERROR",
                         "message": f"limit must be between 1 and 100, got {limit}"}
        archived = q.get("archived", "false") == "true"
        rows = sorted((r for r in api.hs[kind].values() if r["archived"] == archived),
                      key=lambda r: int(r["id"]))
        start = int(base64.b64decode(q["after"]).decode()) if "after" in q else 0
        page = rows[start:start + limit]
        wanted = set(HS_DEFAULTS[kind]) | set(filter(None, q.get("properties", "").split(",")))
        out = []
        for r in page:
            rec = {k: v for k, v in r.items() if k != "properties"}
            rec["properties"] = {k: v for k, v in r["properties"].items() if k in wanted}
            out.append(rec)
        doc: dict[str, Any] = {"results": out}
        if start + limit < len(rows):
            after = base64.b64encode(str(start + limit).encode()).decode()
            doc["paging"] = {"next": {"after": after, "link": f"{self.host}{path}?after={after}"}}
        return 200, doc

    def _zendesk(self, api: RealApis, path: str, q: dict[str, str]) -> tuple[int, Any]:
        cred = base64.b64encode(f"{ZENDESK_USER}:{ZENDESK_TOKEN}".encode()).decode()
        if self.headers.get("Authorization") != f"Basic {cred}":
            return 401, {"error": "Couldn't authenticate you"}
        if not path.endswith("/incremental/tickets/cursor.json"):
            return 404, {"error": "InvalidEndpoint"}
        per_page = int(q.get("per_page", "1000"))
        if not 1 <= per_page <= 1000:
            return 400, {"error": "InvalidPaginationParameter",
                         "description": "per_page must be at most 1000"}
        if "cursor" in q:
            if "start_time" in q:
                return 400, {"error": "InvalidValue",
                             "description": "give start_time or cursor, not both"}
            since, offset = (int(x) for x in base64.b64decode(q["cursor"]).decode().split(":"))
        elif "start_time" in q:
            if not q["start_time"].isdigit():
                return 400, {"error": "InvalidValue", "description":
                             "start_time must be a number of seconds since the epoch"}
            since, offset = int(q["start_time"]), 0
        else:
            return 400, {"error": "InvalidValue", "description": "start_time is required"}
        rows = sorted((t for t in api.zd_tickets.values() if t["generated_timestamp"] >= since),
                      key=lambda t: (t["generated_timestamp"], t["id"]))
        page = rows[offset:offset + per_page]
        end = offset + per_page >= len(rows)
        # at the end of the stream the cursor still points past the last ticket: the next
        # export resumes there
        cursor = base64.b64encode(f"{since}:{offset + len(page)}".encode()).decode()
        return 200, {"tickets": page, "after_cursor": cursor,
                     "after_url": f"{self.host}{path}?" + urlencode(
                         {"cursor": cursor, **({"per_page": q["per_page"]}
                                               if "per_page" in q else {})}),
                     "before_cursor": None, "before_url": None, "end_of_stream": end}

    def _stripe(self, api: RealApis, path: str, q: dict[str, str]) -> tuple[int, Any]:
        if self.headers.get("Authorization") != f"Bearer {STRIPE_KEY}":
            return 401, {"error": {"message": "Invalid API Key provided",
                                   "type": "invalid_request_error"}}
        kind = path.rsplit("/", 1)[-1]
        source = {"customers": list(api.customers.values()),
                  "invoices": list(api.invoices.values()), "events": api.events}.get(kind)
        if source is None:
            return 404, {"error": {"message": "Unrecognized request URL",
                                   "type": "invalid_request_error"}}
        limit = int(q.get("limit", "10"))
        if not 1 <= limit <= 100:
            return 400, {"error": {"message": "Invalid limit: must be between 1 and 100",
                                   "param": "limit", "type": "invalid_request_error"}}
        rows = sorted(source, key=lambda r: (r["created"], r["id"]), reverse=True)
        if "created[gte]" in q:
            if not q["created[gte]"].isdigit():
                return 400, {"error": {"message": "Invalid integer: " + q["created[gte]"],
                                       "param": "created[gte]",
                                       "type": "invalid_request_error"}}
            rows = [r for r in rows if r["created"] >= int(q["created[gte]"])]
        if kind == "events" and "type" in q:
            rows = [r for r in rows if r["type"] == q["type"]]
        if "starting_after" in q:
            ids = [r["id"] for r in rows]
            if q["starting_after"] not in ids:
                return 400, {"error": {"message": "No such object: " + q["starting_after"],
                                       "type": "invalid_request_error"}}
            rows = rows[ids.index(q["starting_after"]) + 1:]
        return 200, {"object": "list", "url": path.removeprefix("/stripe"),
                     "has_more": len(rows) > limit, "data": rows[:limit]}


RealApiServer = ApiServer[RealApis]


def serve_real_apis(api: RealApis) -> AbstractContextManager[RealApiServer]:
    return serve_api(api, _Handler, "real-apis")
