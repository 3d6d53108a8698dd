"""The declarative REST engine: fetch one page of one table, with retries and typed errors.

httpx errors never leave this module: 429/5xx/timeouts become :class:`HttpRetryable` (retried
by the shared policy :func:`canonflow.retry.http`: exponential backoff with jitter, honouring
``Retry-After``, every retry logged), other 4xx become :class:`HttpTerminal`, and a body that
is not the JSON the spec describes is :class:`MalformedPage`.

Secrets stay inside the client: messages show URLs without userinfo or auth query parameters
(and redacted), and a next-page request handed out by :meth:`RestClient.walk` never carries
the client's own query key — the auth adds it again when the request is sent, so a
checkpoint can store the request and a resumed chunk still authenticates.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from email.utils import parsedate_to_datetime
from typing import Any

import httpx

from canonflow import jsonio, retry
from canonflow.connectors import tls
from canonflow.connectors.auth import build_auth, credential_names
from canonflow.connectors.pagination import PageRequest, paginator, positional
from canonflow.connectors.spec import ConnectorSpec, TableSpec, check_base_url
from canonflow.errors import ConfigError, HttpRetryable, HttpTerminal, MalformedPage
from canonflow.redact import redact, register_secret, register_url_secrets
from canonflow.telemetry import metrics


@dataclass(frozen=True, slots=True)
class Page:
    records: list[bytes]  # each record's own JSON text, compact, one object per item
    total: int | None  # total record count when the API reports one


def _compact(record: bytes) -> bytes:
    """One record per line: pretty-printed records are re-serialized without newlines."""
    if b"\n" in record or b"\r" in record:
        return jsonio.dumps(jsonio.loads(record))
    return record


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


EXCERPT_CHARS = 200
HTML_TYPES = {"text/html", "application/xhtml+xml"}  # a login page, a proxy's error page


def _excerpt(body: bytes) -> str:
    """A short, redacted excerpt of an error body (``: {"message": ...}``), or nothing."""
    text = " ".join(body[:EXCERPT_CHARS * 4].decode("utf-8", "replace").split())
    if not text:
        return ""
    text = redact(text)
    return ": " + (text if len(text) <= EXCERPT_CHARS else text[:EXCERPT_CHARS] + "...")


def paging_view(tspec: TableSpec, body: bytes) -> bytes:
    """A page body reduced to what the table's paging reads (its records, total and
    has_more flag, at the same paths): stored, it keeps nothing else the API sent, such as
    a next link that echoes a key."""
    pagination = tspec.pagination
    paths = [tspec.records_path, pagination.total_path,
             getattr(pagination, "has_more_path", None)]
    tree: dict[str, Any] = {}
    for path in paths:
        raw = jsonio.raw_at(body, path) if path else None
        if path is None or raw is None:
            continue
        *parents, leaf = path.split(".")
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = raw

    def text(node: dict[str, Any]) -> bytes:
        return b"{" + b",".join(jsonio.dumps(k) + b":" + (v if isinstance(v, bytes) else text(v))
                                for k, v in node.items()) + b"}"

    return text(tree)


def storable(request: PageRequest) -> bool:
    """True if a next-page request holds no secret (by name or known value), so a checkpoint
    may store it; a request the API signed with a secret of its own is not stored."""
    texts = [request.url or "", *(str(v) for v in request.params.values())]
    return all(redact(text) == text for text in texts)


class RateLimit:
    """At most ``per_second`` requests a second, across the threads sharing a client."""

    def __init__(self, per_second: float) -> None:
        self._interval = 1.0 / per_second
        self._next = 0.0
        self._lock = threading.Lock()

    def wait(self) -> None:
        with self._lock:
            now = time.monotonic()
            start = max(now, self._next)
            self._next = start + self._interval
        if start > now:
            time.sleep(start - now)


class RestClient:
    """One connection (keep-alive) to one service for one tenant."""

    def __init__(
        self,
        spec: ConnectorSpec,
        credentials: Mapping[str, str],
        *,
        base_url: str | None = None,
        transport: httpx.BaseTransport | None = None,
        backoff_base: float = 0.2,
        tenant: str | None = None,
    ) -> None:
        self.spec = spec
        self.tenant = tenant  # named when the API refuses the credentials
        register_secret(*credentials.values())  # also for clients built outside a pipeline
        url = (base_url or spec.base_url).rstrip("/")
        register_url_secrets([url])
        try:
            check_base_url(url)
        except ValueError as exc:
            raise ConfigError(f"{spec.service}: {exc}") from None
        auth, self._secret_params = build_auth(spec, credentials, transport)
        self._client = httpx.Client(
            base_url=url,
            headers={"Accept": "application/json", **spec.headers},
            auth=auth,
            timeout=spec.timeout_seconds,
            transport=transport,
            verify=tls.context(),
        )
        self._backoff_base = backoff_base
        self._limit = RateLimit(spec.rate_limit_per_second) if spec.rate_limit_per_second \
            else None

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> RestClient:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def fetch_page(self, table: str, page: int, page_size: int | None = None,
                   params: Mapping[str, str] | None = None) -> Page:
        """One page by its position (page-number and offset pagination)."""
        return next(self.walk(table, page, page, page_size, params=params))[0]

    def first_page(self, table: str, page_size: int | None = None,
                   params: Mapping[str, str] | None = None) -> tuple[Page, bytes]:
        """Page 1 and what paging reads of its body (:func:`paging_view`): planning reads
        the total from it and hands the view to the first chunk (``walk(first_body=...)``),
        which does not ask for it again."""
        tspec = self.spec.table(table)
        request = paginator(tspec.pagination).first(1, page_size or tspec.pagination.page_size)
        body, url, _ = self._get(tspec.path, self._query(tspec, request, params))
        return self._parse(tspec, body, url), paging_view(tspec, body)

    def opening(self, table: str, page_size: int | None = None,
                params: Mapping[str, str] | None = None
                ) -> tuple[bytes, PageRequest | None] | None:
        """Page 1 of a table read page after page, for its chunk: what paging reads of it
        (:func:`paging_view`) and the request for the next page as page 1 names it (None
        when it names none). None when that request holds a secret (it is never stored):
        the chunk then asks for page 1 itself."""
        tspec = self.spec.table(table)
        size = page_size or tspec.pagination.page_size
        strategy = paginator(tspec.pagination)
        request = strategy.first(1, size)
        body, url, response = self._get(tspec.path, self._query(tspec, request, params))
        page = self._parse(tspec, body, url)
        nxt = self._credentials_removed(strategy.next(request, page.records, size, body,
                                                      response))
        if nxt is not None and not storable(nxt):
            return None
        return paging_view(tspec, body), nxt

    @staticmethod
    def _query(tspec: TableSpec, request: PageRequest,
               params: Mapping[str, str] | None) -> dict[str, Any]:
        """A request's query: a next URL as the API sent it, else the table's static params,
        the paging params and the chunk's own (an incremental filter, a time window)."""
        return request.params if request.url else {
            **tspec.params, **request.params, **(params or {})}

    def pages(self, table: str, start_page: int = 1, end_page: int | None = None,
              page_size: int | None = None) -> Iterator[Page]:
        """The table's pages from ``start_page`` (to ``end_page`` inclusive), following the
        spec's pagination; a request made twice (a repeated cursor, page or next URL) is a
        MalformedPage instead of a loop."""
        for page, _ in self.walk(table, start_page, end_page, page_size):
            yield page

    def walk(self, table: str, start_page: int = 1, end_page: int | None = None,
             page_size: int | None = None, resume: PageRequest | None = None,
             params: Mapping[str, str] | None = None, first_body: bytes | None = None,
             first_next: PageRequest | None = None,
             ) -> Iterator[tuple[Page, PageRequest | None]]:
        """Each page with the request for the next one (None after the last): a checkpoint
        saves that request, and ``resume`` starts from it. The next request never carries
        the client's own credentials (see :meth:`_without_credentials`). ``first_body``
        is the first page's body when it was read already (:meth:`first_page`,
        :meth:`opening`), ``first_next`` the request for the page after it when that body no
        longer tells it (:meth:`opening`)."""
        tspec = self.spec.table(table)
        size = page_size or tspec.pagination.page_size
        strategy = paginator(tspec.pagination)
        request: PageRequest | None = resume or strategy.first(start_page, size)
        seen: set[tuple[Any, ...]] = set()
        previous: list[bytes] = []
        while request is not None and (end_page is None or request.index <= end_page):
            if request.identity() in seen:
                raise MalformedPage(f"{self.spec.service}.{table}: the API sent page "
                                    f"{request.index} again (a repeated cursor or link)")
            seen.add(request.identity())
            query = self._query(tspec, request, params)
            handed = first_body is not None
            if first_body is not None:
                target = self._client.build_request("GET", tspec.path, params=query).url
                body, url = first_body, self._shown(target)
                response = httpx.Response(200, content=body)
                first_body = None
            else:
                body, url, response = self._get(request.url or tspec.path, query)
            page = self._parse(tspec, body, url)
            if positional(strategy) and page.records and page.records == previous:
                # an API that clamps page numbers answers every page past its last with the
                # last one again: an open-ended range would never end
                raise MalformedPage(f"GET {url}: page {request.index} repeats page "
                                    f"{request.index - 1} (the API clamps page numbers?)")
            previous = page.records
            nxt = strategy.next(request, page.records, size, body, response)
            if handed and first_next is not None:
                nxt = first_next
            if nxt is not None and end_page is not None and nxt.index > end_page:
                nxt = None
            nxt = self._credentials_removed(nxt)
            yield page, nxt
            request = nxt

    def _credentials_removed(self, request: PageRequest | None) -> PageRequest | None:
        """A next-page request without the client's own credentials in its URL."""
        if request is None or request.url is None:
            return request
        return replace(request, url=str(self._without_credentials(httpx.URL(request.url))))

    def _without_credentials(self, url: httpx.URL) -> httpx.URL:
        """``url`` without userinfo and without the auth's query parameters (an API may echo
        the key in its next links): the auth adds its own again on every request."""
        if url.userinfo:
            url = url.copy_with(userinfo=b"")
        for name in self._secret_params:
            if name in url.params:
                url = url.copy_remove_param(name)
        return url

    def _shown(self, url: httpx.URL, query: bool = True) -> str:
        """A URL as a message may show it: no credentials, no query if asked, redacted."""
        url = self._without_credentials(url)
        return redact(str(url if query else url.copy_with(query=None)))

    def _get(self, path: str, params: dict[str, Any]) -> tuple[bytes, str, httpx.Response]:
        if "://" in path and httpx.URL(path).host != self._client.base_url.host:
            raise MalformedPage(f"next page URL points to another host: {httpx.URL(path).host}")
        policy = retry.http((HttpRetryable,), self.spec.max_retries, self._backoff_base,
                            context={"service": self.spec.service})
        result: tuple[bytes, str, httpx.Response] = policy(self._get_once, path, params)
        return result

    def _get_once(self, path: str, params: dict[str, Any]) -> tuple[bytes, str, httpx.Response]:
        """One try: the body, the URL to show, the response; typed errors otherwise."""
        if self._limit is not None:
            self._limit.wait()
        try:
            # no params for a full next URL: an empty mapping would drop its query
            resp = self._client.get(path, params=params or None)
        except (httpx.TimeoutException, httpx.TransportError) as exc:
            metrics.http_response(self.spec.service, None)
            target = self._client.build_request("GET", path, params=params or None).url
            raise HttpRetryable(f"GET {self._shown(target)}: {type(exc).__name__}") from None
        metrics.http_response(self.spec.service, resp.status_code)
        shown = self._shown(resp.url, query=False)
        media = resp.headers.get("Content-Type", "").split(";")[0].strip().lower()
        html = media in HTML_TYPES
        if resp.status_code < 300:
            if html:
                raise MalformedPage(f"expected JSON, got {media} from {shown}: is the "
                                    f"{self.spec.service} base URL right?")
            return resp.content, self._shown(resp.url), resp
        body = f" ({media} page)" if html else _excerpt(resp.content)
        what = f"GET {shown}: HTTP {resp.status_code}{body}"
        if resp.status_code == 429 or resp.status_code >= 500 or resp.status_code == 408:
            raise HttpRetryable(what, _retry_after(resp.headers.get("Retry-After")))
        if resp.status_code in (401, 403):
            raise HttpTerminal(f"{what}: {self._refused()}")
        raise HttpTerminal(what)

    def _refused(self) -> str:
        """What to check when the API refuses the credentials: whose, and which (names)."""
        names = " and ".join(repr(n) for n in credential_names(self.spec))
        service = self.spec.service
        if self.tenant is None:
            return f"the API refused credential {names} of service {service!r}: check it"
        return (f"the API refused credential {names} of service {service!r} for tenant "
                f"{self.tenant!r}: check or renew it (tenants.{self.tenant}.credentials."
                f"{service} in the pipeline)")

    @staticmethod
    def _parse(tspec: TableSpec, body: bytes, url: str) -> Page:
        try:
            # skipping a value still validates it: a broken record anywhere in the page
            # fails here, with its byte offset
            raw = jsonio.raw_at(body, tspec.records_path)
        except jsonio.MalformedJSON as exc:
            raise MalformedPage(f"GET {url}: invalid JSON: {exc}") from None
        items = jsonio.raw_items(raw) if raw is not None else None
        records = items or []
        if items is None or not all(rec[:1] == b"{" for rec in records):
            raise MalformedPage(
                f"GET {url}: expected a list of objects at {tspec.records_path!r}"
            )
        if b"\n" in body or b"\r" in body:
            records = [_compact(rec) for rec in records]
        total = None
        if tspec.pagination.total_path:
            raw_total = jsonio.raw_at(body, tspec.pagination.total_path)
            value = jsonio.decode(raw_total) if raw_total is not None else None
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise MalformedPage(
                    f"GET {url}: expected a record count at {tspec.pagination.total_path!r}"
                )
            total = value
        return Page(records, total)
