"""Shared fixtures. Tests are marked by folder: integration/ and reliability/ get their marker
here, in one place."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from canonflow.config import Settings, SourceConfig, TenantConfig
from canonflow.connectors.demo_api import DemoApi, DemoServer, serve, tenant_token
from canonflow.runtime import Runtime

HERE = Path(__file__).parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        rel = Path(str(item.fspath)).relative_to(HERE)
        if rel.parts[0] in ("integration", "reliability"):
            item.add_marker(getattr(pytest.mark, rel.parts[0]))


@pytest.fixture(scope="session")
def demo_server() -> Iterator[DemoServer]:
    """One demo API for the session: 1,200 records per table, 5,000 contacts."""
    with serve(DemoApi(1200, sizes={"contacts": 5000})) as server:
        yield server


SettingsFactory = Callable[..., Settings]


@pytest.fixture
def make_settings(tmp_path: Path, demo_server: DemoServer) -> SettingsFactory:
    def make(tenants: tuple[str, ...] = ("acme",), tables: dict[str, list[str]] | None = None,
             **overrides: Any) -> Settings:
        tables = tables if tables is not None else {
            "crm": ["contacts", "companies", "deals"], "helpdesk": ["tickets", "users"]}
        base = demo_server.base_url
        fields: dict[str, Any] = dict(
            name="test",
            object_store=f"file://{tmp_path / 'data'}",
            state_store=f"sqlite:///{tmp_path / 'data' / 'state.db'}",
            dispatcher="inline://",
            batch_records=500,
            sources=[SourceConfig(service=svc, base_url=f"{base}/{svc}/v1", tables=tbls,
                                  page_size=100, pages_per_chunk=2)
                     for svc, tbls in tables.items()],
            tenants=[TenantConfig.model_validate({
                "tenant_id": t, "credentials": {svc: {"token": tenant_token(t)} for svc in tables}
            }) for t in tenants],
        )
        fields.update(overrides)
        return Settings(**fields)

    return make


@pytest.fixture
def runtime(make_settings: SettingsFactory) -> Iterator[Runtime]:
    rt = Runtime(make_settings())
    yield rt
    rt.close()
