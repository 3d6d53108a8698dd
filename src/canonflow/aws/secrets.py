"""Tenant credentials from AWS Secrets Manager: a credential value
``secretsmanager://NAME#KEY`` (``#KEY`` picks a field of a JSON secret; without it the whole
secret string is the value).

Each secret is fetched once per process (a Lambda container) and kept; its values are
registered with :mod:`canonflow.redact` before they are returned, so they never reach a log
line, an error message or a stored result. Errors name the secret, never its value.
"""

from __future__ import annotations

import json
import threading
from typing import Any

from canonflow.errors import ConfigError
from canonflow.redact import register_secret

SCHEME = "secretsmanager://"
_cache: dict[str, str] = {}
_lock = threading.Lock()
_client: Any = None


def is_reference(value: str) -> bool:
    return value.startswith(SCHEME)


def _secrets_client() -> Any:
    global _client
    if _client is None:
        import os

        import boto3  # the aws extra

        # endpoint from the environment (AWS_ENDPOINT_URL_SECRETS_MANAGER), region from
        # Lambda's AWS_REGION
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        _client = boto3.client("secretsmanager", region_name=region)
    return _client


def _secret_string(name: str) -> str:
    with _lock:
        if name in _cache:
            return _cache[name]
    try:
        response = _secrets_client().get_secret_value(SecretId=name)
    except Exception as exc:  # botocore's errors carry no secret value
        code = getattr(exc, "response", {}).get("Error", {}).get("Code", type(exc).__name__)
        raise ConfigError(f"secret {name!r} could not be read from Secrets Manager: "
                          f"{code}") from None
    text = response.get("SecretString")
    if not isinstance(text, str):
        raise ConfigError(f"secret {name!r} has no string value")
    register_secret(text)
    with _lock:
        _cache[name] = text
    return text


def resolve(value: str) -> str:
    """The credential a ``secretsmanager://NAME#KEY`` reference names (cached per process);
    any other value as it is."""
    if not is_reference(value):
        return value
    name, _, key = value[len(SCHEME):].partition("#")
    if not name:
        raise ConfigError("a secretsmanager:// credential names no secret")
    text = _secret_string(name)
    if not key:
        return text
    try:
        doc = json.loads(text)
    except ValueError:
        raise ConfigError(f"secret {name!r} is not JSON; it has no field {key!r}") from None
    if not isinstance(doc, dict) or key not in doc:
        raise ConfigError(f"secret {name!r} has no field {key!r}")
    field = str(doc[key])
    register_secret(field, *(str(v) for v in doc.values()))
    return field


def clear_cache() -> None:
    """Forget fetched secrets (a rotated secret is read again)."""
    global _client
    with _lock:
        _cache.clear()
        _client = None
