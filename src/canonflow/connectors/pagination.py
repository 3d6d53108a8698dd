"""Pagination strategies: how to ask for the first page and, from a response, the next.

One small class per style APIs really use: page numbers, offset/limit, a cursor in the body,
a next URL in the body, and RFC 8288 ``Link: <...>; rel="next"`` headers. The REST engine
refuses a request it has already made (a repeated cursor, page or URL) instead of looping.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Protocol

import httpx

from canonflow import jsonio
from canonflow.connectors.spec import (
    CursorPagination,
    LinkHeaderPagination,
    NextUrlPagination,
    OffsetPagination,
    PageNumberPagination,
    Pagination,
)


@dataclass(frozen=True)
class PageRequest:
    index: int  # 1-based position of the page in the table
    params: dict[str, Any] = field(default_factory=dict)
    url: str | None = None  # a full URL handed out by the API (next URL, Link header)

    def identity(self) -> tuple[Any, ...]:
        return (self.url, tuple(sorted((k, str(v)) for k, v in self.params.items())))


class Paginator(Protocol):
    def first(self, start_page: int, page_size: int) -> PageRequest: ...

    def next(self, prev: PageRequest, records: list[bytes], page_size: int, body: bytes,
             response: httpx.Response) -> PageRequest | None: ...


def _true(body: bytes, path: str) -> bool:
    """True when the value at ``path`` in the body is the boolean true."""
    raw = jsonio.raw_at(body, path)
    return raw is not None and jsonio.decode(raw) is True


def _ended(body: bytes, path: str | None) -> bool:
    """True when the body says this is the last page (``path`` is a true boolean)."""
    return path is not None and _true(body, path)


def _full(records: int, page_size: int) -> bool:
    return records >= page_size and records > 0


class _Positional(ABC):
    """Pages addressed by position (page number or offset): the next one follows a full
    page, or, when the API says so (``has_more_path``), a page whose flag is true; ranges
    of them can be split into chunks."""

    spec: PageNumberPagination | OffsetPagination

    def first(self, start_page: int, page_size: int) -> PageRequest:
        return PageRequest(start_page, self.params(start_page, page_size))

    @abstractmethod
    def params(self, index: int, page_size: int) -> dict[str, Any]:
        """The query parameters that address page ``index``."""

    def next(self, prev: PageRequest, records: list[bytes], page_size: int, body: bytes,
             response: httpx.Response) -> PageRequest | None:
        flag = self.spec.has_more_path
        if not records or not (_true(body, flag) if flag else _full(len(records), page_size)):
            return None
        return self.first(prev.index + 1, page_size)


@dataclass(frozen=True)
class PageNumbers(_Positional):
    spec: PageNumberPagination

    def params(self, index: int, page_size: int) -> dict[str, Any]:
        return {self.spec.page_param: index, self.spec.size_param: page_size}


@dataclass(frozen=True)
class Offsets(_Positional):
    spec: OffsetPagination

    def params(self, index: int, page_size: int) -> dict[str, Any]:
        return {self.spec.offset_param: (index - 1) * page_size,
                self.spec.limit_param: page_size}


@dataclass(frozen=True)
class BodyCursor:
    spec: CursorPagination

    def first(self, start_page: int, page_size: int) -> PageRequest:
        return PageRequest(1, {self.spec.size_param: page_size})

    def next(self, prev: PageRequest, records: list[bytes], page_size: int, body: bytes,
             response: httpx.Response) -> PageRequest | None:
        if not records or _ended(body, self.spec.end_path):
            return None
        if self.spec.has_more_path is not None and not _true(body, self.spec.has_more_path):
            return None
        if self.spec.last_record_field is not None:  # e.g. Stripe's starting_after
            cursor = jsonio.loads(records[-1]).get(self.spec.last_record_field)
        else:
            raw = jsonio.raw_at(body, self.spec.cursor_path or "")
            cursor = jsonio.decode(raw) if raw is not None else None
        if cursor in (None, ""):
            return None
        return PageRequest(prev.index + 1, {self.spec.size_param: page_size,
                                            self.spec.cursor_param: cursor})


@dataclass(frozen=True)
class NextUrl:
    spec: NextUrlPagination

    def first(self, start_page: int, page_size: int) -> PageRequest:
        return PageRequest(1, {self.spec.size_param: page_size})

    def next(self, prev: PageRequest, records: list[bytes], page_size: int, body: bytes,
             response: httpx.Response) -> PageRequest | None:
        raw = jsonio.raw_at(body, self.spec.next_path)
        url = jsonio.decode(raw) if raw is not None else None
        if not url or not records or _ended(body, self.spec.end_path):
            return None
        return PageRequest(prev.index + 1, url=str(url))


@dataclass(frozen=True)
class LinkHeader:
    spec: LinkHeaderPagination

    def first(self, start_page: int, page_size: int) -> PageRequest:
        return PageRequest(1, {self.spec.size_param: page_size})

    def next(self, prev: PageRequest, records: list[bytes], page_size: int, body: bytes,
             response: httpx.Response) -> PageRequest | None:
        url = response.links.get("next", {}).get("url")
        if not url or not records:
            return None
        return PageRequest(prev.index + 1, url=url)


def positional(strategy: Paginator) -> bool:
    """Pages addressed by position: an API may answer any position, even past its end."""
    return isinstance(strategy, _Positional)


def paginator(spec: Pagination) -> Paginator:
    if isinstance(spec, PageNumberPagination):
        return PageNumbers(spec)
    if isinstance(spec, OffsetPagination):
        return Offsets(spec)
    if isinstance(spec, CursorPagination):
        return BodyCursor(spec)
    if isinstance(spec, NextUrlPagination):
        return NextUrl(spec)
    return LinkHeader(spec)
