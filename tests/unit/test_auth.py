"""Every auth type of the spec, against a mock API (no network)."""

from __future__ import annotations

import base64

import httpx
import pytest

from canonflow.connectors.rest import RestClient
from canonflow.connectors.spec import parse_spec
from canonflow.errors import ConfigError, HttpTerminal

PAGE = {"items": [{"id": 1}], "total": 1}


def spec(auth: str) -> object:
    return parse_spec(f"""
service: svc
base_url: http://api.test/v1
auth: {auth}
tables:
  things:
    path: /things
    records_path: items
    primary_key: id
    pagination: {{type: page_number, total_path: total}}
""", "test")


def test_api_key_in_a_header() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json=PAGE)

    rest = RestClient(spec("{type: api_key, name: X-API-Key}"), {"api_key": "k-123"},
                      transport=httpx.MockTransport(handler))
    rest.fetch_page("things", 1)
    assert seen[0].headers["X-API-Key"] == "k-123"
    assert "authorization" not in seen[0].headers


def test_api_key_in_the_query_never_reaches_a_message() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        assert request.url.params["key"] == "k-secret"
        return httpx.Response(200, content=b'{"items": [}')

    rest = RestClient(spec("{type: api_key, name: key, location: query}"),
                      {"api_key": "k-secret"}, transport=httpx.MockTransport(handler))
    from canonflow.errors import MalformedPage

    with pytest.raises(MalformedPage) as info:
        rest.fetch_page("things", 1)
    assert "k-secret" not in str(info.value) and "page=1" in str(info.value)


def test_basic_auth() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        expected = base64.b64encode(b"ada:pw").decode()
        assert request.headers["Authorization"] == f"Basic {expected}"
        return httpx.Response(200, json=PAGE)

    rest = RestClient(spec("{type: basic}"), {"username": "ada", "password": "pw"},
                      transport=httpx.MockTransport(handler))
    assert rest.fetch_page("things", 1).total == 1


OAUTH = "{type: oauth2_client_credentials, token_url: 'http://auth.test/token', scope: read}"


def test_oauth2_client_credentials_fetches_reuses_and_refreshes_the_token() -> None:
    issued: list[str] = []
    revoked: set[str] = set()

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.host == "auth.test":
            form = dict(x.split("=") for x in request.content.decode().split("&"))
            assert form == {"grant_type": "client_credentials", "client_id": "cid",
                            "client_secret": "csecret", "scope": "read"}
            issued.append(f"tok{len(issued)}")
            return httpx.Response(200, json={"access_token": issued[-1], "expires_in": 3600})
        token = request.headers["Authorization"].removeprefix("Bearer ")
        if token in revoked or token not in issued:
            return httpx.Response(401)
        return httpx.Response(200, json=PAGE)

    transport = httpx.MockTransport(handler)
    rest = RestClient(spec(OAUTH), {"client_id": "cid", "client_secret": "csecret"},
                      transport=transport)
    rest.fetch_page("things", 1)
    rest.fetch_page("things", 2)
    assert issued == ["tok0"]  # one token for both pages
    revoked.add("tok0")  # the API stops accepting it before it expires
    rest.fetch_page("things", 3)
    assert issued == ["tok0", "tok1"]


def test_oauth2_bad_client_credentials_are_terminal() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(401 if request.url.host == "auth.test" else 200, json=PAGE)

    rest = RestClient(spec(OAUTH), {"client_id": "cid", "client_secret": "wrong"},
                      transport=httpx.MockTransport(handler))
    with pytest.raises(HttpTerminal, match="check the client credentials") as info:
        rest.fetch_page("things", 1)
    assert "wrong" not in str(info.value)


def test_a_missing_credential_names_the_key_not_a_value() -> None:
    with pytest.raises(ConfigError, match="no credential 'client_secret' for service 'svc'"):
        RestClient(spec(OAUTH), {"client_id": "cid"})


def test_the_rate_limit_spaces_requests_on_one_connection() -> None:
    import time

    limited = parse_spec("""
service: svc
base_url: http://api.test/v1
rate_limit_per_second: 20
tables:
  things: {path: /things, records_path: items, primary_key: id,
           pagination: {type: page_number, total_path: total}}
""", "test")
    rest = RestClient(limited, {"token": "t"},
                      transport=httpx.MockTransport(lambda r: httpx.Response(200, json=PAGE)))
    started = time.monotonic()
    for page in range(1, 11):
        rest.fetch_page("things", page)
    assert time.monotonic() - started >= 9 / 20 - 0.01
