"""Connector spec: one YAML file per service, validated with a clear error on bad input."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)

from canonflow import yamlio
from canonflow.errors import ConfigError
from canonflow.model import ServiceName

_HOST = re.compile(r"[a-z0-9._\-:\[\]]+|[a-z0-9._\-]*\{tenant\.[a-z0-9_]+\}[a-z0-9._\-{}]*",
                   re.IGNORECASE)  # a host name, an IP address, or a tenant placeholder


def check_base_url(url: str) -> str:
    """An API's base URL is http(s) with a host: anything else is a configuration mistake
    (exit 2), not a connection error worth retrying."""
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not _HOST.fullmatch(parts.hostname or "") \
            or any(c.isspace() for c in url.strip()):
        raise ValueError(f"base_url {url!r} is not an http(s) URL "
                         "(expected e.g. https://api.example.com/v2)")
    return url


BaseUrl = Annotated[str, AfterValidator(check_base_url)]


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BearerAuth(_Spec):
    type: Literal["bearer"] = "bearer"
    credential: str = Field(default="token", description="key in the tenant's credentials")


class ApiKeyAuth(_Spec):
    type: Literal["api_key"]
    name: str = Field(description="header or query parameter name, e.g. X-API-Key")
    location: Literal["header", "query"] = "header"
    credential: str = "api_key"


class BasicAuth(_Spec):
    type: Literal["basic"]
    username_credential: str = "username"
    password_credential: str = "password"


class OAuth2ClientCredentials(_Spec):
    type: Literal["oauth2_client_credentials"]
    token_url: str
    client_id_credential: str = "client_id"
    client_secret_credential: str = "client_secret"
    scope: str | None = None


Auth = Annotated[BearerAuth | ApiKeyAuth | BasicAuth | OAuth2ClientCredentials,
                 Field(discriminator="type")]


class PageNumberPagination(_Spec):
    type: Literal["page_number"] = "page_number"
    page_param: str = "page"
    size_param: str = "per_page"
    page_size: int = Field(default=100, gt=0, le=100_000)
    max_page_size: int | None = Field(default=None, gt=0, description="the API's maximum")
    total_path: str | None = Field(
        default=None, description="dotted path of the total record count in the response"
    )
    has_more_path: str | None = Field(
        default=None, description="dotted path of a boolean: false on the last page")


class OffsetPagination(_Spec):
    type: Literal["offset"]
    offset_param: str = "offset"
    limit_param: str = "limit"
    page_size: int = Field(default=100, gt=0, le=100_000)
    max_page_size: int | None = Field(default=None, gt=0, description="the API's maximum")
    total_path: str | None = None
    has_more_path: str | None = Field(
        default=None, description="dotted path of a boolean: false on the last page")


class CursorPagination(_Spec):
    """The next cursor is in the body (``cursor_path``) or is a field of the page's last
    record (``last_record_field``, e.g. Stripe's ``starting_after=<id>``)."""

    type: Literal["cursor"]
    cursor_param: str = "cursor"
    cursor_path: str | None = Field(default=None, description="dotted path of the next cursor")
    last_record_field: str | None = None
    has_more_path: str | None = Field(
        default=None, description="dotted path of a boolean: false on the last page")
    end_path: str | None = Field(
        default=None, description="dotted path of a boolean: true on the last page "
        "(e.g. Zendesk's end_of_stream)")
    size_param: str = "limit"
    page_size: int = Field(default=100, gt=0, le=100_000)
    max_page_size: int | None = Field(default=None, gt=0, description="the API's maximum")
    total_path: None = None

    @model_validator(mode="after")
    def _one_cursor_source(self) -> CursorPagination:
        if (self.cursor_path is None) == (self.last_record_field is None):
            raise ValueError("give exactly one of cursor_path and last_record_field")
        return self


class NextUrlPagination(_Spec):
    type: Literal["next_url"]
    next_path: str = Field(description="dotted path of the next page's URL in the response")
    end_path: str | None = Field(
        default=None, description="dotted path of a boolean: true on the last page (an API "
        "that hands out a next URL even there, e.g. Zendesk's end_of_stream)")
    size_param: str = "limit"
    page_size: int = Field(default=100, gt=0, le=100_000)
    max_page_size: int | None = Field(default=None, gt=0, description="the API's maximum")
    total_path: None = None


class LinkHeaderPagination(_Spec):
    type: Literal["link_header"]
    size_param: str = "limit"
    page_size: int = Field(default=100, gt=0, le=100_000)
    max_page_size: int | None = Field(default=None, gt=0, description="the API's maximum")
    total_path: None = None


Pagination = Annotated[
    PageNumberPagination | OffsetPagination | CursorPagination | NextUrlPagination
    | LinkHeaderPagination,
    Field(discriminator="type"),
]


class PageRangeChunking(_Spec):
    type: Literal["page_ranges"] = "page_ranges"
    pages_per_chunk: int = Field(default=10, gt=0)


class SequentialChunking(_Spec):
    """One chunk reads the whole table page after page (APIs without a total)."""

    type: Literal["sequential"]


class TimeWindowChunking(_Spec):
    """One chunk per time window, for APIs that filter by a time field: each chunk asks
    for ``since_param <= t < before_param`` and reads its window page after page."""

    type: Literal["time_windows"]
    since_param: str = "updated_since"
    before_param: str = "updated_before"
    start: str = Field(description="ISO UTC time of the oldest record, e.g. 2020-01-01T00:00:00Z")
    window_hours: float = Field(default=24 * 30, gt=0)
    end: str | None = Field(default=None, description="ISO UTC end of the last window; "
                            "default: now")


Chunking = Annotated[PageRangeChunking | SequentialChunking | TimeWindowChunking,
                     Field(discriminator="type")]


class Incremental(_Spec):
    """The API filters by a time: only records changed since the last synced high-water
    mark are fetched (inclusive; the upsert absorbs the boundary records)."""

    cursor_param: str = Field(description="query parameter, e.g. updated_since")
    format: Literal["iso", "epoch_s", "epoch_ms"] = Field(
        default="iso", description="how the API wants the mark: ISO UTC text, epoch "
        "seconds or epoch milliseconds")
    start: str | None = Field(
        default=None, description="ISO UTC value sent when there is no mark yet (and on a "
        "full refresh), for APIs that require the parameter, e.g. 1970-01-01T00:00:00Z")

    @model_validator(mode="after")
    def _start_is_iso(self) -> Incremental:
        if self.start is not None:
            try:
                datetime.fromisoformat(self.start.replace("Z", "+00:00"))
            except ValueError:
                raise ValueError(f"start {self.start!r}: expected ISO UTC time, e.g. "
                                 "2020-01-01T00:00:00Z") from None
        return self

    def render(self, mark: str) -> str:
        """A mark (ISO UTC text) in the API's format."""
        if self.format == "iso":
            return mark
        when = datetime.fromisoformat(mark.replace("Z", "+00:00"))
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        seconds = when.timestamp()
        return str(int(seconds)) if self.format == "epoch_s" else str(int(seconds * 1000))


class FieldSelection(_Spec):
    """The API returns only the fields a request names (HubSpot's ``properties=a,b``): the
    names listed in ``params[param]`` (comma-separated) arrive under ``prefix``."""

    param: str = Field(description="query parameter that lists the fields, e.g. properties")
    prefix: str = Field(description="dotted path the selected fields arrive under")

    def requested(self, params: dict[str, str]) -> set[str]:
        return {p.strip() for p in params.get(self.param, "").split(",") if p.strip()}


class TableSpec(_Spec):
    path: str
    records_path: str = Field(description="dotted path of the record list in the response")
    primary_key: str
    params: dict[str, str] = Field(
        default_factory=dict, description="static query parameters sent with the first "
        "request of every chunk (kept when paging parameters are added)")
    field_selection: FieldSelection | None = Field(
        default=None, description="the API returns only the fields named in a parameter: "
        "`connectors check` flags a mapping that reads one the request does not name")
    pagination: Pagination = PageNumberPagination()
    chunking: Chunking = PageRangeChunking()
    incremental: Incremental | None = None

    @model_validator(mode="after")
    def _page_size_within_maximum(self) -> TableSpec:
        p = self.pagination
        if p.max_page_size is not None and p.page_size > p.max_page_size:
            raise ValueError(f"page_size {p.page_size} is above the API's maximum "
                             f"max_page_size {p.max_page_size}")
        return self

    @model_validator(mode="after")
    def _ranges_need_a_total(self) -> TableSpec:
        if isinstance(self.chunking, PageRangeChunking) and not (
                isinstance(self.pagination, PageNumberPagination | OffsetPagination)
                and self.pagination.total_path):
            raise ValueError("page_ranges chunking needs page_number or offset pagination "
                             "with a total_path; use chunking: {type: sequential}")
        return self


class ConnectorSpec(_Spec):
    service: ServiceName
    description: str = ""
    base_url: BaseUrl = Field(description="may name tenant values: {tenant.subdomain}")
    auth: Auth = BearerAuth()
    headers: dict[str, str] = Field(default_factory=dict)
    timeout_seconds: float = Field(default=30.0, gt=0)
    rate_limit_per_second: float | None = Field(
        default=None, gt=0, description="requests per second on one connection (shared by "
        "the chunks of a job in one process)")
    max_retries: int = Field(default=5, ge=0)
    tables: dict[str, TableSpec]

    @model_validator(mode="after")
    def _has_tables(self) -> ConnectorSpec:
        if not self.tables:
            raise ValueError("no tables: list at least one under 'tables'")
        return self

    def table(self, name: str) -> TableSpec:
        try:
            return self.tables[name]
        except KeyError:
            known = ", ".join(sorted(self.tables))
            raise ConfigError(
                f"service {self.service!r} has no table {name!r} (known: {known})"
            ) from None


def unrequested_fields(spec: ConnectorSpec, mapping_dirs: list[str] | None = None) -> list[str]:
    """Problems of a spec with its mappings: a mapping that reads a field the table's
    request never asks for (``field_selection``) would be null on every row, silently."""
    from canonflow.mappings import load_catalog
    from canonflow.transform.mapping import CompiledMapping

    catalog = load_catalog(mapping_dirs or [])
    problems = []
    for name, table in spec.tables.items():
        sel = table.field_selection
        mapping = catalog.mappings.get((spec.service, name))
        if sel is None or mapping is None:
            continue
        entity = catalog.entities[mapping.entity]
        paths = CompiledMapping(mapping, entity, catalog.entities).paths
        prefix = sel.prefix + "."
        read = {p[len(prefix):].split(".")[0] for p in paths if p.startswith(prefix)}
        missing = sorted(read - sel.requested(table.params))
        if missing:
            problems.append(
                f"tables.{name}: the mapping of {spec.service}.{name} reads "
                f"{', '.join(prefix + m for m in missing)}, which the request never asks for "
                f"(add to params.{sel.param})")
    return problems


def _format_validation(source: str, exc: ValidationError) -> str:
    first = exc.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "(top level)"
    more = f" (+{exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    message = first["msg"].removeprefix("Value error, ")
    return f"{source}: at {where}: {message}{more}"


def parse_spec(text: str, source: str) -> ConnectorSpec:
    try:
        data = yamlio.load(text)
    except yamlio.YAMLError as exc:
        raise ConfigError(f"{source}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level")
    try:
        return ConnectorSpec.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_validation(source, exc)) from None


def load_spec(path: str | Path) -> ConnectorSpec:
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read connector spec {p}: {exc.strerror}") from None
    return parse_spec(text, str(p))


@cache
def builtin_specs() -> dict[str, ConnectorSpec]:
    """The specs shipped in ``canonflow/connectors/specs``, by service name."""
    folder = resources.files("canonflow.connectors") / "specs"
    specs = {}
    for entry in sorted(folder.iterdir(), key=lambda e: e.name):
        if entry.name.endswith((".yaml", ".yml")):
            spec = parse_spec(entry.read_text(), f"builtin:{entry.name}")
            specs[spec.service] = spec
    return specs
