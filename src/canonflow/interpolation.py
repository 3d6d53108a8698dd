"""``${NAME}`` in a pipeline file: every string value reads environment variables when the
file is loaded, before validation, so stores, base URLs, tenant values and credentials all
take them the same way.

``$$`` is a literal ``$``. A ``$NAME`` without braces is refused (it reads like a variable
but would be sent as text), and so is a ``${`` that does not close a valid name. Errors name
the place in the file; for a credential they never show any part of the value.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

from canonflow.errors import ConfigError
from canonflow.redact import redact, register_url_secrets

_TOKEN = re.compile(r"\$\$|\$\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)\}|\$(?P<bare>[A-Za-z_]"
                    r"[A-Za-z0-9_]*)|\$\{")


def _secret(where: tuple[str | int, ...]) -> bool:
    """A credential value: no part of it may appear in a message."""
    return "credentials" in where


def _expand(text: str, where: tuple[str | int, ...], env: Mapping[str, str]) -> str:
    place = ".".join(str(p) for p in where)

    def one(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        if (name := m.group("braced")) is not None:
            if name not in env:
                raise ConfigError(f"at {place}: environment variable {name} is not set "
                                  "(export it, or write the value in the file)")
            return env[name]
        if (name := m.group("bare")) is not None:
            register_url_secrets([text])  # a $NAME inside a URL's password stays unnamed
            shown = f"${name}" if not _secret(where) and f"${name}" in redact(text) else "$NAME"
            raise ConfigError(f"at {place}: {shown} is not read from the environment: write "
                              f"${{{shown[1:]}}} for an environment variable, or $$ for a "
                              "literal $")
        raise ConfigError(f"at {place}: '${{' starts no ${{NAME}} (letters, digits and _); "
                          "write $$ for a literal $")

    return _TOKEN.sub(one, text)


def expand_env(data: Any, env: Mapping[str, str] | None = None,
               where: tuple[str | int, ...] = ()) -> Any:
    """``data`` (parsed YAML) with ``${NAME}`` replaced in every string value; mapping keys
    stay as written."""
    env = os.environ if env is None else env
    if isinstance(data, str):
        return _expand(data, where, env)
    if isinstance(data, dict):
        return {k: expand_env(v, env, (*where, k)) for k, v in data.items()}
    if isinstance(data, list):
        return [expand_env(v, env, (*where, i)) for i, v in enumerate(data)]
    return data
