"""Pipeline configuration (YAML), typed; credentials are secrets and never printed.

``${NAME}`` in any string value is read from the environment when the file is loaded
(:mod:`canonflow.interpolation`), and relative paths (``spec:``, ``mapping_dirs``,
``file://./`` and ``sqlite:///./`` stores) are relative to the file.
Validating settings — from a file, in code, or from a worker's JSON in another process —
registers every secret they hold with :mod:`canonflow.redact`: each credential value, the
passwords (and secret query parameters) of the store, dispatcher and source base URLs.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from canonflow import jsonio, yamlio
from canonflow.connectors.spec import BaseUrl, ConnectorSpec, builtin_specs, load_spec
from canonflow.connectors.tenancy import Connection, connect
from canonflow.errors import ConfigError
from canonflow.interpolation import expand_env
from canonflow.model import ServiceName, TableName, TenantId, TriggerMode
from canonflow.redact import register_secret, register_url_secrets
from canonflow.transform.versions import CanonicalWrites

DEFAULT_DATA = "./canonflow-data"
_VALUE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _repeated(names: Iterable[str]) -> str | None:
    """The first name listed a second time, if any."""
    seen: set[str] = set()
    for name in names:
        if name in seen:
            return name
        seen.add(name)
    return None


class _Cfg(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SourceConfig(_Cfg):
    service: ServiceName
    spec: str | None = Field(default=None, description="spec file; default: the built-in one")
    base_url: BaseUrl | None = Field(
        default=None, description="the spec's base_url for this pipeline; may name tenant "
        "values: https://{tenant.subdomain}.zendesk.com/api/v2")
    tables: list[TableName] | None = None
    page_size: int | None = Field(default=None, gt=0)
    pages_per_chunk: int | None = Field(default=None, gt=0)

    @model_validator(mode="after")
    def _register_secrets(self) -> SourceConfig:
        register_url_secrets([self.base_url])
        return self


class TenantConfig(_Cfg):
    tenant_id: TenantId
    values: dict[str, str] = Field(
        default_factory=dict, description="not secrets: what a source's base_url, paths and "
        "params name as {tenant.NAME}, e.g. the tenant's subdomain")
    credentials: dict[str, dict[str, SecretStr]] = Field(default_factory=dict)

    @field_validator("values")
    @classmethod
    def _value_names(cls, values: dict[str, str]) -> dict[str, str]:
        for name in values:
            if name == "tenant_id":
                raise ValueError("tenant_id is not a value: {tenant.tenant_id} is the "
                                 "tenant's own id")
            if not _VALUE_NAME.fullmatch(name):
                raise ValueError(f"value name {name!r}: use letters, digits and _")
        return values

    @model_validator(mode="after")
    def _register_secrets(self) -> TenantConfig:
        self.register_secrets()
        return self

    def register_secrets(self) -> None:
        """Every credential value becomes a known secret of :mod:`canonflow.redact`."""
        register_secret(*(value.get_secret_value() for creds in self.credentials.values()
                          for value in creds.values()))


class Settings(_Cfg):
    """Everything a worker needs, whichever process or machine it runs on."""

    name: str = "pipeline"
    object_store: str = f"file://{DEFAULT_DATA}"
    state_store: str = f"sqlite:///{DEFAULT_DATA}/state.db"
    canonical_store: str | None = Field(
        default=None, description="where Delta tables live; default: the object store"
    )
    dispatcher: str = "local://?workers=2"
    trigger_mode: TriggerMode = TriggerMode.AGGREGATED
    batch_records: int = Field(default=5000, gt=0)
    max_inline_files: int = Field(
        default=1000, gt=0, description="larger file lists travel as a manifest object"
    )
    transform_group_records: int = Field(
        default=150_000, gt=0,
        description="records per transform commit: bounds the transform's memory")
    group_commit_requests: int = Field(
        default=16, ge=1,
        description="a transform worker takes up to this many waiting requests of the same "
        "source table (other tenants' small jobs) and writes them in one Delta commit per "
        "table, each request still claimed, accounted and finished on its own (1: every "
        "request commits by itself)")
    plan_concurrency: int = Field(
        default=8, ge=1, description="tenants planned at once by a run (planning waits on "
        "each API's first page)")
    canonical_writes: CanonicalWrites = Field(
        default="copy_on_write",
        description="copy_on_write: a changed record rewrites the files holding its key (one "
        "row per key in the Delta table); merge_on_read: it is appended as a new version, "
        "`canonflow query` shows the current one and compaction folds the versions — writes "
        "cost what changed, not what the tenant holds")
    compact_after_files: int = Field(
        default=8, ge=0,
        description="after a transform, a tenant's partition of a canonical table holding "
        "more data files than this is compacted (0: never)")
    transform_lease_seconds: float = Field(
        default=120.0, gt=0,
        description="a running transform's lease; its heartbeat renews it; a lapsed lease "
        "(or a holder known dead) lets another worker take the request over")
    transform_max_attempts: int = Field(
        default=3, ge=1, description="attempts of a transform request before it fails")
    chunk_attempts: int = Field(
        default=3, ge=1, description="attempts of a chunk whose error is retryable")
    runner_lease_seconds: float = Field(
        default=30.0, gt=0,
        description="a runner's lease; when it lapses its jobs are resumable by another run")
    run_wait_limit_seconds: float = Field(
        default=86_400.0, gt=0,
        description="`canonflow run` stops waiting after this long (exit code 3)")
    celery_queue: str | None = Field(
        default=None, description="Celery queue of this pipeline; default canonflow.NAME, so "
        "pipelines sharing a broker never take each other's tasks")
    celery_visibility_timeout: float = Field(
        default=3600.0, gt=0,
        description="Redis broker: seconds before an unacknowledged task is redelivered")
    mapping_dirs: list[str] = Field(default_factory=list)
    sources: list[SourceConfig] = Field(default_factory=list)
    tenants: list[TenantConfig] = Field(default_factory=list)

    @model_validator(mode="after")
    def _register_secrets(self) -> Settings:
        """In every process that validates settings (workers too), before any message."""
        register_url_secrets([self.object_store, self.state_store, self.canonical_store,
                              self.dispatcher, *(src.base_url for src in self.sources)])
        for tenant in self.tenants:  # instances passed in are not validated again
            tenant.register_secrets()
        return self

    @model_validator(mode="after")
    def _listed_once(self) -> Settings:
        if (service := _repeated(src.service for src in self.sources)) is not None:
            raise ValueError(f"duplicate source service {service}: each service is listed "
                             "once under sources (tenant values tell its tenants apart)")
        if (tenant := _repeated(t.tenant_id for t in self.tenants)) is not None:
            raise ValueError(f"duplicate tenant_id {tenant}: each tenant is listed once (one "
                             "job per tenant and run)")
        return self

    @property
    def queue(self) -> str:
        """The Celery queue of this pipeline's tasks."""
        return self.celery_queue or f"canonflow.{self.name}"

    def to_worker_data(self) -> dict[str, Any]:
        """The settings for a worker process: secrets revealed (they travel only to the
        worker's initializer, never to a log, the state store or a task payload)."""
        data = self.model_dump(mode="json")
        data["tenants"] = [
            {**tenant, "credentials": {
                svc: {k: v.get_secret_value() for k, v in creds.items()}
                for svc, creds in t.credentials.items()}}
            for tenant, t in zip(data["tenants"], self.tenants, strict=True)
        ]
        return data

    def to_worker_json(self) -> str:
        """:meth:`to_worker_data` as JSON."""
        return jsonio.dumps_str(self.to_worker_data())

    def spec_for(self, service: str) -> ConnectorSpec:
        for src in self.sources:
            if src.service == service:
                if src.spec:
                    return load_spec(src.spec)
                break
        spec = builtin_specs().get(service)
        if spec is None:
            raise ConfigError(f"no connector spec for service {service!r}")
        return spec

    def source(self, service: str) -> SourceConfig:
        for src in self.sources:
            if src.service == service:
                return src
        raise ConfigError(f"service {service!r} is not a source of pipeline {self.name!r}")

    def tenant(self, tenant_id: str) -> TenantConfig:
        for tenant in self.tenants:
            if tenant.tenant_id == tenant_id:
                return tenant
        raise ConfigError(f"tenant {tenant_id!r} is not in pipeline {self.name!r}")

    def connection(self, tenant_id: str, service: str) -> Connection:
        """The tenant's connection to the service: base URL and spec with its values."""
        return connect(self.spec_for(service), self.source(service).base_url, tenant_id,
                       self.tenant(tenant_id).values)

    def check_connections(self) -> None:
        """Every tenant has the values its sources name (before any job starts)."""
        for src in self.sources:
            spec = self.spec_for(src.service)
            for tenant in self.tenants:
                connect(spec, src.base_url, tenant.tenant_id, tenant.values)

    def credentials(self, tenant_id: str, service: str) -> dict[str, str]:
        creds = self.tenant(tenant_id).credentials.get(service, {})
        values = {k: v.get_secret_value() for k, v in creds.items()}
        if any(v.startswith("secretsmanager://") for v in values.values()):
            from canonflow.aws.secrets import resolve  # the aws extra

            values = {k: resolve(v) for k, v in values.items()}
        return values


def _locate(text: str, base: Path) -> str:
    """A store URL or file path as written in a pipeline file at ``base``: relative
    file://, sqlite:/// and plain paths are relative to that file."""
    for scheme in ("file://", "sqlite:///"):
        if text.startswith(scheme):
            rest = text[len(scheme):]
            return scheme + str((base / rest).resolve()) if rest.startswith(("./", "../")) \
                else text
    return str((base / Path(text).expanduser()).resolve()) if "://" not in text else text


def _locate_paths(data: dict[str, Any], base: Path) -> None:
    """Every relative path of a pipeline file (stores, mapping folders, spec files) made
    relative to the file, in one place."""
    for key in ("object_store", "state_store", "canonical_store"):
        if isinstance(data.get(key), str):
            data[key] = _locate(data[key], base)
    if isinstance(dirs := data.get("mapping_dirs"), list):
        data["mapping_dirs"] = [_locate(d, base) if isinstance(d, str) else d for d in dirs]
    for src in data.get("sources") or []:
        if isinstance(src, dict) and isinstance(src.get("spec"), str):
            src["spec"] = _locate(src["spec"], base)


def load_settings(path: str | Path, relative_to: Path | None = None,
                  credentials: bool = True) -> Settings:
    """The pipeline file at ``path``, validated; its relative paths are relative to its
    folder (or to ``relative_to``, for a file fetched to a temporary place).
    ``credentials=False`` is for commands that read the stores and never call an API
    (query, status, quarantine): the tenants' credentials are left out unread, so an unset
    ``${VAR}`` or a secret manager in them does not matter."""
    p = Path(path)
    try:
        data = yamlio.load(p.read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read pipeline file {p}: {exc.strerror}") from None
    except yamlio.YAMLError as exc:
        raise ConfigError(f"{p}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: expected a mapping at the top level")
    if not credentials and isinstance(data.get("tenants"), list):
        data["tenants"] = [{**t, "credentials": {}} if isinstance(t, dict) else t
                           for t in data["tenants"]]
    try:
        data = expand_env(data)
    except ConfigError as exc:
        raise ConfigError(f"{p}: {exc}") from None
    _locate_paths(data, relative_to.resolve() if relative_to else p.resolve().parent)
    try:
        settings = Settings.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(x) for x in first["loc"]) or "(top level)"
        raise ConfigError(f"{p}: at {where}: {first['msg']}") from None
    if not settings.sources:
        raise ConfigError(f"{p}: no sources: list at least one service under 'sources'")
    if not settings.tenants:
        raise ConfigError(f"{p}: no tenants: list at least one under 'tenants'")
    return settings
