"""Pipeline configuration (YAML), typed; credentials are secrets and never printed.

``${NAME}`` in a credential value is read from the environment when the file is loaded.
Validating settings — from a file, in code, or from a worker's JSON in another process —
registers every secret they hold with :mod:`canonflow.redact`: each credential value, the
passwords (and secret query parameters) of the store, dispatcher and source base URLs.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from canonflow import jsonio
from canonflow.connectors.spec import ConnectorSpec, builtin_specs, load_spec
from canonflow.errors import ConfigError
from canonflow.model import ServiceName, TableName, TenantId, TriggerMode
from canonflow.redact import register_secret, register_url_secrets

DEFAULT_DATA = "./canonflow-data"
_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


class _Cfg(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SourceConfig(_Cfg):
    service: ServiceName
    spec: str | None = Field(default=None, description="spec file; default: the built-in one")
    base_url: str | None = None
    tables: list[TableName] | None = None
    page_size: int | None = Field(default=None, gt=0)
    pages_per_chunk: int | None = Field(default=None, gt=0)

    @model_validator(mode="after")
    def _register_secrets(self) -> SourceConfig:
        register_url_secrets([self.base_url])
        return self


class TenantConfig(_Cfg):
    tenant_id: TenantId
    credentials: dict[str, dict[str, SecretStr]] = Field(default_factory=dict)

    @field_validator("credentials", mode="before")
    @classmethod
    def _expand_env(cls, value: Any) -> Any:
        if not isinstance(value, dict):
            return value
        out: dict[str, dict[str, str]] = {}
        for service, creds in value.items():
            if not isinstance(creds, dict):
                return value
            out[service] = {}
            for key, raw in creds.items():
                text = str(raw)
                for name in _ENV.findall(text):
                    if name not in os.environ:
                        raise ValueError(f"environment variable {name} is not set")
                out[service][key] = _ENV.sub(lambda m: os.environ[m.group(1)], text)
        return out

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
    plan_concurrency: int = Field(
        default=8, ge=1, description="tenants planned at once by a run (planning waits on "
        "each API's first page)")
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
    def _unique_tenants(self) -> Settings:
        seen: set[str] = set()
        for tenant in self.tenants:
            if tenant.tenant_id in seen:
                raise ValueError(f"duplicate tenant_id {tenant.tenant_id}: each tenant is "
                                 "listed once (one job per tenant and run)")
            seen.add(tenant.tenant_id)
        return self

    @property
    def queue(self) -> str:
        """The Celery queue of this pipeline's tasks."""
        return self.celery_queue or f"canonflow.{self.name}"

    def to_worker_json(self) -> str:
        """The settings for a worker process: secrets revealed (they travel only to the
        worker's initializer, never to a log, the state store or a task payload)."""
        data = self.model_dump(mode="json")
        data["tenants"] = [
            {"tenant_id": t.tenant_id,
             "credentials": {svc: {k: v.get_secret_value() for k, v in creds.items()}
                             for svc, creds in t.credentials.items()}}
            for t in self.tenants
        ]
        return jsonio.dumps_str(data)

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

    def credentials(self, tenant_id: str, service: str) -> dict[str, str]:
        for tenant in self.tenants:
            if tenant.tenant_id == tenant_id:
                creds = tenant.credentials.get(service, {})
                values = {k: v.get_secret_value() for k, v in creds.items()}
                if any(v.startswith("secretsmanager://") for v in values.values()):
                    from canonflow.aws.secrets import resolve  # the aws extra

                    values = {k: resolve(v) for k, v in values.items()}
                return values
        raise ConfigError(f"tenant {tenant_id!r} is not in pipeline {self.name!r}")


def _locate(text: str, base: Path) -> str:
    """Relative file:// and sqlite:/// paths in a pipeline file are relative to that file."""
    if text.startswith("file://./") or text.startswith("file://../"):
        return "file://" + str((base / text[len("file://"):]).resolve())
    if text.startswith("sqlite:///./") or text.startswith("sqlite:///../"):
        return "sqlite:///" + str((base / text[len("sqlite:///"):]).resolve())
    return text


def load_settings(path: str | Path, credentials: bool = True) -> Settings:
    """The pipeline file, validated. ``credentials=False`` is for commands that read the
    stores and never call an API (query, status, quarantine): the tenants' credentials are
    left out unread, so an unset ``${VAR}`` or a secret manager in them does not matter."""
    p = Path(path)
    try:
        data = yaml.safe_load(p.read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read pipeline file {p}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: expected a mapping at the top level")
    if not credentials and isinstance(data.get("tenants"), list):
        data["tenants"] = [{**t, "credentials": {}} if isinstance(t, dict) else t
                           for t in data["tenants"]]
    base = p.resolve().parent
    for key in ("object_store", "state_store", "canonical_store"):
        if isinstance(data.get(key), str):
            data[key] = _locate(data[key], base)
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
