import httpx
import pytest

from canonflow import jsonio
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


def test_userinfo_in_the_base_url_never_reaches_an_http_error() -> None:
    def rest(handler) -> RestClient:
        return RestClient(SPEC, {"token": "s3cret-token"},
                          base_url="http://svc:UrlPass-404@api.test/crm/v1",
                          transport=httpx.MockTransport(handler), backoff_base=0.001)

    def drop(request: httpx.Request) -> httpx.Response:
        raise httpx.RemoteProtocolError("Server disconnected", request=request)

    for handler, error in ((lambda r: httpx.Response(403), HttpTerminal),
                           (lambda r: httpx.Response(503), HttpRetryable),
                           (drop, HttpRetryable),
                           (lambda r: httpx.Response(200, content=b"{"), MalformedPage)):
        with pytest.raises(error) as info:
            rest(handler).fetch_page("contacts", 2)
        assert "UrlPass-404" not in str(info.value) and "svc:" not in str(info.value)
        assert "api.test/crm/v1/contacts" in str(info.value)


KEYED = """
service: keyed
base_url: http://api.test/v1
auth: {type: api_key, name: api_key, location: query, credential: key}
max_retries: 1
tables:
  items:
    path: /items
    records_path: data
    primary_key: id
    pagination: {type: next_url, next_path: links.next, size_param: limit, page_size: 2}
    chunking: {type: sequential}
"""


def keyed_api(key: str, drop_after: int | None = None):
    """Pages of 2 of 6 records; the next link echoes the key; requests without it get 401."""
    seen: list[httpx.URL] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.url)
        if request.url.params.get("api_key") != key:
            return httpx.Response(401)
        after = int(request.url.params.get("after", "0"))
        if drop_after is not None and after >= drop_after:
            raise httpx.RemoteProtocolError("Server disconnected", request=request)
        rows = [{"id": i} for i in range(after, min(after + 2, 6))]
        nxt = f"http://api.test/v1/items?after={after + 2}&limit=2&api_key={key}" \
            if after + 2 < 6 else None
        return httpx.Response(200, json={"data": rows, "links": {"next": nxt}})

    return handler, seen


def test_a_key_echoed_in_next_links_stays_out_of_errors_and_next_requests() -> None:
    from canonflow.connectors.spec import parse_spec

    spec = parse_spec(KEYED, "keyed.yaml")
    handler, _ = keyed_api("EchoedKey-8080", drop_after=4)
    rest = RestClient(spec, {"key": "EchoedKey-8080"}, transport=httpx.MockTransport(handler),
                      backoff_base=0.001)
    nexts = []
    with pytest.raises(HttpRetryable, match=r"after=4.*RemoteProtocolError") as info:
        for _, nxt in rest.walk("items"):
            nexts.append(nxt)
    assert "EchoedKey-8080" not in str(info.value)
    assert nexts[0] is not None and nexts[0].url is not None
    assert "EchoedKey-8080" not in repr(nexts)  # what a checkpoint would store
    assert "after=2" in nexts[0].url


def test_a_stored_next_request_resumes_with_the_clients_own_key() -> None:
    from canonflow.connectors.spec import parse_spec

    spec = parse_spec(KEYED, "keyed.yaml")
    handler, _ = keyed_api("ResumeKey-2024", drop_after=4)
    first = RestClient(spec, {"key": "ResumeKey-2024"},
                       transport=httpx.MockTransport(handler), backoff_base=0.001)
    walked = []
    with pytest.raises(HttpRetryable):
        for page, nxt in first.walk("items"):
            walked.append((page, nxt))
    stored = walked[-1][1]  # the request a checkpoint saved: the page after=4
    assert stored is not None and "ResumeKey-2024" not in repr(stored)
    handler, seen = keyed_api("ResumeKey-2024")  # the API is back
    again = RestClient(spec, {"key": "ResumeKey-2024"},
                       transport=httpx.MockTransport(handler), backoff_base=0.001)
    pages = [p for p, _ in again.walk("items", resume=stored)]
    assert [r for p in pages for r in p.records] == [b'{"id":4}', b'{"id":5}']
    assert seen[0].params["api_key"] == "ResumeKey-2024"  # its own auth, restored


def test_http_retries_go_through_the_shared_policy_and_are_logged() -> None:
    import logging

    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    logger = logging.getLogger("canonflow.retry")
    keep = Keep(logging.DEBUG)
    logger.addHandler(keep)
    old = logger.level
    logger.setLevel(logging.DEBUG)
    try:
        statuses = iter([503, 429, 200])

        def handler(req: httpx.Request) -> httpx.Response:
            code = next(statuses)
            return httpx.Response(code, headers={"Retry-After": "0"},
                                  content=OK if code == 200 else b"")

        assert client(handler).fetch_page("contacts", 1).total == 1
    finally:
        logger.removeHandler(keep)
        logger.setLevel(old)
    retries = [r for r in records if r.getMessage() == "retrying"]
    assert [(r.retry_kind, r.attempt) for r in retries] == [("http", 1), ("http", 2)]
    assert "HTTP 503" in retries[0].error and "HTTP 429" in retries[1].error


def test_a_clamped_page_number_is_an_error_not_an_endless_walk() -> None:
    # an API that answers every page past the last with the last page again
    calls = []

    def handler(req: httpx.Request) -> httpx.Response:
        calls.append(req)
        assert len(calls) < 20, "the walk does not end"
        page = min(int(req.url.params["page"]), 3)
        rows = ",".join(f'{{"id": "{page}-{i}"}}' for i in range(2))
        return httpx.Response(200, content=f'{{"results": [{rows}], "total": 4}}'.encode())

    with pytest.raises(MalformedPage, match="page 4 repeats page 3"):
        list(client(handler).pages("contacts", 1, None, page_size=2))


def test_only_next_requests_without_secrets_are_storable() -> None:
    from canonflow.connectors.pagination import PageRequest
    from canonflow.connectors.rest import storable
    from canonflow.redact import register_secret

    register_secret("Registered-Value-1")
    assert storable(PageRequest(2, {"cursor": "abc", "limit": 10}))
    assert storable(PageRequest(2, url="http://api.test/v1/items?after=20&limit=10"))
    assert not storable(PageRequest(2, url="http://api.test/v1/items?after=2&sig=Zm9v"))
    assert not storable(PageRequest(2, url="http://u:pw@api.test/v1/items?after=2"))
    assert not storable(PageRequest(2, {"cursor": "Registered-Value-1"}))


HAS_MORE_SPEC = """
service: flagged
base_url: https://api.test
tables:
  items:
    path: /items
    records_path: data
    primary_key: id
    pagination: {type: page_number, page_size: 2, has_more_path: meta.more}
    chunking: {type: sequential}
"""


def flagged_pages(pages: dict[int, bytes], spec: str = HAS_MORE_SPEC
                  ) -> tuple[RestClient, list[int]]:
    from canonflow.connectors.spec import parse_spec

    asked: list[int] = []

    def handler(req: httpx.Request) -> httpx.Response:
        asked.append(int(req.url.params["page"]))
        return httpx.Response(200, content=pages[asked[-1]])

    return RestClient(parse_spec(spec, "flagged.yaml"), {"token": "t"},
                      transport=httpx.MockTransport(handler)), asked


def test_page_numbers_follow_has_more_not_page_fullness() -> None:
    client, asked = flagged_pages({
        1: b'{"data": [{"id": 1}], "meta": {"more": true}}',  # short, but more follow
        2: b'{"data": [{"id": 2}, {"id": 3}], "meta": {"more": true}}',
        3: b'{"data": [{"id": 4}, {"id": 5}], "meta": {"more": false}}',  # full, but last
    })
    assert sum(len(p.records) for p in client.pages("items")) == 5
    assert asked == [1, 2, 3]


def test_a_missing_has_more_flag_ends_the_table() -> None:
    client, asked = flagged_pages({1: b'{"data": [{"id": 1}, {"id": 2}], "meta": {}}'})
    assert [len(p.records) for p in client.pages("items")] == [2]
    assert asked == [1]


def test_a_first_page_read_before_is_not_asked_for_again() -> None:
    body = b'{"data": [{"id": 1}, {"id": 2}], "meta": {"more": true}}'
    client, asked = flagged_pages({2: b'{"data": [{"id": 3}], "meta": {"more": false}}'})
    walked = list(client.walk("items", first_body=body))
    assert [len(p.records) for p, _ in walked] == [2, 1] and asked == [2]
    assert walked[0][1] is not None and walked[0][1].index == 2 and walked[1][1] is None


@pytest.mark.parametrize("url", ["ftp://x", "not a url"])
def test_a_base_url_that_is_not_http_is_a_config_error_not_a_retry(url: str) -> None:
    with pytest.raises(ConfigError, match=r"crm: base_url .* is not an http\(s\) URL"):
        RestClient(SPEC, {"token": "t"}, base_url=url)


def test_the_stored_first_page_keeps_only_what_paging_reads() -> None:
    from canonflow.connectors.rest import paging_view
    from canonflow.connectors.spec import parse_spec

    text = HAS_MORE_SPEC.replace("page_size: 2,", "page_size: 2, total_path: meta.total,")
    spec = parse_spec(text, "flagged.yaml")
    body = (b'{"links": {"next": "https://api.test/items?page=2&api_key=Echoed-k3y"},\n'
            b' "data": [{"id": 1},\n {"id": 2}], "meta": {"total": 9, "more": true, "x": 1}}')
    view = paging_view(spec.tables["items"], body)
    assert b"Echoed" not in view and b"links" not in view
    assert jsonio.loads(view) == {"data": [{"id": 1}, {"id": 2}],
                                  "meta": {"total": 9, "more": True}}
    client, asked = flagged_pages({2: b'{"data": [], "meta": {"total": 9, "more": false}}'},
                                  text)
    (first, nxt), _ = list(client.walk("items", first_body=view))
    assert first.records == [b'{"id": 1}', b'{"id": 2}'] and first.total == 9
    assert nxt is not None and nxt.index == 2 and asked == [2]
