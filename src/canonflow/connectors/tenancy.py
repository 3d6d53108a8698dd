"""One tenant's connection to one service: the spec with the tenant's values put in.

APIs that address the tenant in the URL (a Zendesk subdomain, a Shopify shop,
``/tenants/{id}/...``) name tenant values in a base URL, a table's path or its params:
``{tenant.subdomain}`` is the tenant's ``values: {subdomain: ...}`` in the pipeline file,
``{tenant.tenant_id}`` its id. This is the one place they are substituted: planning checks
every tenant's connection before a job starts, and each worker builds its clients from the
same settings, so every process sends the same requests.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import quote

from canonflow.connectors.spec import ConnectorSpec, OAuth2ClientCredentials, check_base_url
from canonflow.errors import ConfigError

PLACEHOLDER = re.compile(r"\{tenant\.([A-Za-z_][A-Za-z0-9_]*)\}")


@dataclass(frozen=True, slots=True)
class Connection:
    spec: ConnectorSpec  # paths, params and token URL with the tenant's values
    base_url: str


def connect(spec: ConnectorSpec, base_url: str | None, tenant_id: str,
            values: Mapping[str, str]) -> Connection:
    """The spec and base URL (a source's override, else the spec's) for this tenant.

    In a URL (base URL, path, token URL) a value is percent-encoded, so it cannot add a
    path segment or a query; in params it is sent as it is (the query is encoded anyway).
    A placeholder the tenant has no value for is a :class:`ConfigError`."""
    known = {**values, "tenant_id": tenant_id}

    def fill(text: str, where: str, in_url: bool = True) -> str:
        def one(m: re.Match[str]) -> str:
            key = m.group(1)
            if key not in known:
                raise ConfigError(
                    f"tenant {tenant_id!r} has no value {key!r} ({spec.service} {where} uses "
                    f"{{tenant.{key}}}): add it under the tenant's values")
            return quote(known[key], safe="") if in_url else known[key]

        return PLACEHOLDER.sub(one, text)

    url = fill(base_url or spec.base_url, "base_url")
    try:
        check_base_url(url)
    except ValueError as exc:
        raise ConfigError(f"tenant {tenant_id!r}, service {spec.service}: {exc}") from None
    tables = {name: table.model_copy(update={
        "path": fill(table.path, f"tables.{name}.path"),
        "params": {k: fill(v, f"tables.{name}.params.{k}", in_url=False)
                   for k, v in table.params.items()},
    }) for name, table in spec.tables.items()}
    update: dict[str, object] = {"tables": tables}
    if isinstance(spec.auth, OAuth2ClientCredentials):
        update["auth"] = spec.auth.model_copy(
            update={"token_url": fill(spec.auth.token_url, "auth.token_url")})
    return Connection(spec.model_copy(update=update), url)
