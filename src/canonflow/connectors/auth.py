"""Authentication for the REST engine, as httpx ``Auth`` flows built from a spec.

Secrets come from the tenant's credentials (pipeline file or environment) and stay inside
these objects: error messages name the credential key, never its value.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Generator, Mapping

import httpx

from canonflow import jsonio
from canonflow.connectors import tls
from canonflow.connectors.spec import (
    ApiKeyAuth,
    BasicAuth,
    BearerAuth,
    ConnectorSpec,
    OAuth2ClientCredentials,
)
from canonflow.errors import ConfigError, HttpRetryable, HttpTerminal


def _need(credentials: Mapping[str, str], key: str, service: str) -> str:
    value = credentials.get(key)
    if not value:
        raise ConfigError(f"no credential {key!r} for service {service!r}")
    return value


def credential_names(spec: ConnectorSpec) -> list[str]:
    """The keys of the tenant's credentials the spec's auth reads (names, never values)."""
    auth = spec.auth
    if isinstance(auth, BearerAuth | ApiKeyAuth):
        return [auth.credential]
    if isinstance(auth, BasicAuth):
        return [auth.username_credential, auth.password_credential]
    return [auth.client_id_credential, auth.client_secret_credential]


class HeaderAuth(httpx.Auth):
    def __init__(self, name: str, value: str) -> None:
        self._name, self._value = name, value

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response]:
        request.headers[self._name] = self._value
        yield request


class QueryAuth(httpx.Auth):
    def __init__(self, name: str, value: str) -> None:
        self._name, self._value = name, value

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response]:
        request.url = request.url.copy_merge_params({self._name: self._value})
        yield request


class ClientCredentials(httpx.Auth):
    """OAuth 2.0 client credentials: fetch a token, reuse it until shortly before it
    expires, and fetch a new one once if the API answers 401 anyway."""

    requires_response_body = False

    def __init__(self, spec: OAuth2ClientCredentials, client_id: str, secret: str,
                 transport: httpx.BaseTransport | None = None) -> None:
        self._spec = spec
        self._form = {"grant_type": "client_credentials", "client_id": client_id,
                      "client_secret": secret, **({"scope": spec.scope} if spec.scope else {})}
        self._transport = transport
        self._token: str | None = None
        self._expires = 0.0
        self._lock = threading.Lock()
        self.fetches = 0

    def _fetch(self) -> str:
        with httpx.Client(transport=self._transport, timeout=30,
                          verify=tls.context()) as client:
            try:
                resp = client.post(self._spec.token_url, data=self._form)
            except httpx.TransportError as exc:
                raise HttpRetryable(f"token request to {self._spec.token_url}: "
                                    f"{type(exc).__name__}") from None
        if resp.status_code >= 500 or resp.status_code == 429:
            raise HttpRetryable(f"token request to {self._spec.token_url}: "
                                f"HTTP {resp.status_code}")
        if resp.status_code >= 300:
            raise HttpTerminal(f"token request to {self._spec.token_url}: "
                               f"HTTP {resp.status_code} (check the client credentials)")
        doc = jsonio.loads(resp.content)
        token = doc.get("access_token") if isinstance(doc, dict) else None
        if not isinstance(token, str) or not token:
            raise HttpTerminal(f"token response from {self._spec.token_url} has no "
                               "access_token")
        self.fetches += 1
        self._token = token
        self._expires = time.monotonic() + float(doc.get("expires_in", 3600)) - 30
        return token

    def _current(self, stale: str | None = None) -> str:
        with self._lock:
            if self._token is None or self._token == stale or time.monotonic() > self._expires:
                return self._fetch()
            return self._token

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response]:
        token = self._current()
        request.headers["Authorization"] = f"Bearer {token}"
        response = yield request
        if response.status_code == 401:
            request.headers["Authorization"] = f"Bearer {self._current(stale=token)}"
            yield request


def build_auth(spec: ConnectorSpec, credentials: Mapping[str, str],
               transport: httpx.BaseTransport | None = None) -> tuple[httpx.Auth, set[str]]:
    """The httpx auth for a spec, and the query parameters to redact from messages."""
    auth = spec.auth
    service = spec.service
    if isinstance(auth, BearerAuth):
        token = _need(credentials, auth.credential, service)
        return HeaderAuth("Authorization", f"Bearer {token}"), set()
    if isinstance(auth, ApiKeyAuth):
        key = _need(credentials, auth.credential, service)
        if auth.location == "query":
            return QueryAuth(auth.name, key), {auth.name}
        return HeaderAuth(auth.name, key), set()
    if isinstance(auth, BasicAuth):
        return httpx.BasicAuth(_need(credentials, auth.username_credential, service),
                               _need(credentials, auth.password_credential, service)), set()
    return ClientCredentials(auth, _need(credentials, auth.client_id_credential, service),
                             _need(credentials, auth.client_secret_credential, service),
                             transport), set()
