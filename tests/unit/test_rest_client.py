import httpx
import pytest

from canonflow.connectors.rest import RestClient
from canonflow.connectors.spec import builtin_specs
from canonflow.errors import ConfigError, HttpRetryable, HttpTerminal, MalformedPage

SPEC = builtin_specs()["crm"]
OK = b'{"results": [{"id": "1"}], "total": 1}'


def client(handler, **kw) -> RestClient:
    return RestClient(SPEC, {"token": "s3cret-token"}, base_url="http://api.test/crm/v1",
                      transport=httpx.MockTransport(handler), backoff_base=0.001, **kw)


def test_sends_bearer_token_and_page_params() -> None:
    seen = []

    def handler(req: httpx.Request) -> httpx.Response:
        seen.append(req)
        return httpx.Response(200, content=OK)

    page = client(handler).fetch_page("contacts", 3, 50)
    assert page.records == [b'{"id": "1"}'] and page.total == 1
    assert seen[0].headers["Authorization"] == "Bearer s3cret-token"
    assert seen[0].url.params["page"] == "3" and seen[0].url.params["per_page"] == "50"


def test_retries_429_honouring_retry_after_then_5xx() -> None:
    statuses = iter([429, 503, 200])

    def handler(req: httpx.Request) -> httpx.Response:
        code = next(statuses)
        body = OK if code == 200 else b""
        return httpx.Response(code, headers={"Retry-After": "0"}, content=body)

    assert client(handler).fetch_page("contacts", 1).total == 1


def test_gives_up_after_max_retries_with_a_retryable_error() -> None:
    with pytest.raises(HttpRetryable, match="HTTP 500"):
        client(lambda r: httpx.Response(500)).fetch_page("contacts", 1)


def test_other_4xx_is_terminal_and_never_shows_the_token() -> None:
    with pytest.raises(HttpTerminal, match="HTTP 403") as info:
        client(lambda r: httpx.Response(403)).fetch_page("contacts", 1)
    assert "s3cret" not in str(info.value)


def test_malformed_json_names_url_and_byte_offset() -> None:
    with pytest.raises(MalformedPage, match=r"contacts\?page=1.*invalid JSON.*\(byte 13\)"):
        client(lambda r: httpx.Response(200, content=b'{"results": [}')).fetch_page(
            "contacts", 1)


def test_records_must_be_a_list_of_objects() -> None:
    with pytest.raises(MalformedPage, match="expected a list of objects at 'results'"):
        client(lambda r: httpx.Response(200, content=b'{"results": 5, "total": 1}')).fetch_page(
            "contacts", 1)


def test_missing_credential_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="no credential 'token'"):
        RestClient(SPEC, {})


def test_unknown_table_lists_known_ones() -> None:
    with pytest.raises(ConfigError, match="known: companies, contacts, deals"):
        client(lambda r: httpx.Response(200, content=OK)).fetch_page("nope", 1)


def test_pretty_printed_records_become_one_line_each() -> None:
    body = b'{"results": [\n  {"id": "1",\n   "n": 2}\n], "total": 1}'
    page = client(lambda r: httpx.Response(200, content=body)).fetch_page("contacts", 1)
    assert page.records == [b'{"id":"1","n":2}']


def test_a_total_of_the_wrong_type_is_malformed() -> None:
    body = b'{"results": [], "total": "many"}'
    with pytest.raises(MalformedPage, match="expected a record count at 'total'"):
        client(lambda r: httpx.Response(200, content=body)).fetch_page("contacts", 1)
