"""Connectors: declarative REST specs, the engine that reads them, and the demo SaaS API."""

from canonflow.connectors.rest import Page, RestClient
from canonflow.connectors.spec import ConnectorSpec, TableSpec, builtin_specs, load_spec

__all__ = ["ConnectorSpec", "Page", "RestClient", "TableSpec", "builtin_specs", "load_spec"]
