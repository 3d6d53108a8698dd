"""Spec features real APIs need: static query parameters, the API's maximum page size,
error bodies in HTTP errors, incremental marks in the API's format, end-of-stream paging."""

from __future__ import annotations

import json
from datetime import UTC, date, datetime
from decimal import Decimal

import httpx
import pytest

from canonflow import jsonio
from canonflow.connectors.rest import RestClient
from canonflow.connectors.spec import Incremental, parse_spec
from canonflow.errors import ConfigError, HttpRetryable, HttpTerminal

SPEC = """
service: shop
base_url: http://api.test/v1
auth: {type: bearer}
max_retries: 0
tables:
  contacts:
    path: /contacts
    records_path: results
    primary_key: id
    params: {properties: "email,phone", archived: "false"}
    pagination: {type: cursor, cursor_param: after, cursor_path: paging.next.after,
                 size_param: limit, page_size: 2, max_page_size: 100}
    chunking: {type: sequential}
  export:
    path: /export.json
    records_path: items
    primary_key: id
    pagination: {type: next_url, next_path: after_url, end_path: end_of_stream,
                 size_param: per_page, page_size: 2}
    chunking: {type: sequential}
"""


def _client(handler: object, spec: str = SPEC) -> RestClient:
    return RestClient(parse_spec(spec, "shop.yaml"), {"token": "tok-secret-123"},
                      transport=httpx.MockTransport(handler))  # type: ignore[arg-type]


def test_static_params_are_sent_on_every_page_beside_the_paging_ones() -> None:
    seen: list[dict[str, str]] = []

    def handler(req: httpx.Request) -> httpx.Response:
        seen.append(dict(req.url.params))
        after = req.url.params.get("after")
        nxt = {"paging": {"next": {"after": "c2"}}} if after is None else {}
        return httpx.Response(200, json={"results": [{"id": after or "a"}], **nxt})

    records = [r for page in _client(handler).pages("contacts") for r in page.records]
    assert len(records) == 2
    assert seen == [{"properties": "email,phone", "archived": "false", "limit": "2"},
                    {"properties": "email,phone", "archived": "false", "limit": "2",
                     "after": "c2"}]


def test_a_page_size_above_the_apis_maximum_is_refused_at_load() -> None:
    with pytest.raises(ConfigError, match=r"shop.yaml: at tables.contacts: .*page_size 500 "
                                          r"is above the API's maximum max_page_size 100"):
        parse_spec(SPEC.replace("page_size: 2, max", "page_size: 500, max"), "shop.yaml")


def test_http_errors_show_a_short_redacted_excerpt_of_the_body() -> None:
    body = {"status": "error", "message": "limit must be <= 100",
            "token": "tok-secret-123", "detail": "x" * 500}

    def handler(req: httpx.Request) -> httpx.Response:
        return httpx.Response(400, json=body)

    with pytest.raises(HttpTerminal) as info:
        next(_client(handler).pages("contacts"))
    text = str(info.value)
    assert text.startswith("GET http://api.test/v1/contacts: HTTP 400: {")
    assert "limit must be <= 100" in text and "tok-secret-123" not in text
    assert text.endswith("...") and len(text) < 300

    def busy(req: httpx.Request) -> httpx.Response:
        return httpx.Response(503, text="upstream\n  overloaded")

    with pytest.raises(HttpRetryable, match=r"HTTP 503: upstream overloaded$"):
        next(_client(busy).pages("contacts"))


def test_next_url_pagination_stops_at_end_of_stream_even_with_a_next_url() -> None:
    seen: list[str] = []

    def handler(req: httpx.Request) -> httpx.Response:
        seen.append(str(req.url))
        n = int(req.url.params.get("cursor", "0"))
        return httpx.Response(200, json={
            "items": [{"id": n}], "after_url": f"http://api.test/v1/export.json?cursor={n + 1}",
            "end_of_stream": n == 1})

    pages = list(_client(handler).pages("export"))
    assert [p.records for p in pages] == [[b'{"id":0}'], [b'{"id":1}']]
    assert seen == ["http://api.test/v1/export.json?per_page=2",
                    "http://api.test/v1/export.json?cursor=1"]


@pytest.mark.parametrize(("fmt", "expected"), [
    ("iso", "2024-03-01T12:00:05Z"), ("epoch_s", "1709294405"), ("epoch_ms", "1709294405000")])
def test_incremental_marks_are_rendered_in_the_apis_format(fmt: str, expected: str) -> None:
    inc = Incremental(cursor_param="since", format=fmt)  # type: ignore[arg-type]
    assert inc.render("2024-03-01T12:00:05Z") == expected


def test_an_incremental_start_must_be_iso() -> None:
    with pytest.raises(ValueError, match="expected ISO UTC time"):
        Incremental(cursor_param="since", start="yesterday")


def test_query_rows_as_json_keep_decimals_exact_and_times_iso() -> None:
    rows = [{"amount": Decimal("2237.570000"), "day": date(2024, 1, 2),
             "at": datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC), "n": None}]
    assert json.loads(jsonio.dumps_rows(rows)) == [
        {"amount": "2237.570000", "day": "2024-01-02", "at": "2024-01-02T03:04:05+00:00",
         "n": None}]


def test_connectors_check_flags_a_mapped_field_the_request_never_asks_for() -> None:
    from canonflow.connectors.spec import builtin_specs, unrequested_fields

    hubspot = builtin_specs()["hubspot"]
    assert all(unrequested_fields(spec) == [] for spec in builtin_specs().values())
    contacts = hubspot.tables["contacts"]
    narrowed = hubspot.model_copy(update={"tables": {"contacts": contacts.model_copy(
        update={"params": {**contacts.params, "properties": "email,firstname,lastname"}})}})
    assert unrequested_fields(narrowed) == [
        "tables.contacts: the mapping of hubspot.contacts reads properties.associatedcompanyid, "
        "properties.lifecyclestage, properties.phone, which the request never asks for "
        "(add to params.properties)"]
