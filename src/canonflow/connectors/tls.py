"""One TLS context per process for every HTTP client (source APIs, token endpoints).

Building a context loads the CA bundle (about 25 ms); a worker opens a client per tenant and
service, so a fresh context each time cost a small tenant's sync more than its requests.
"""

from __future__ import annotations

import ssl
from functools import cache

import certifi


@cache
def context() -> ssl.SSLContext:
    """The verifying client context (certifi's CA bundle, as httpx uses by default)."""
    return ssl.create_default_context(cafile=certifi.where())
