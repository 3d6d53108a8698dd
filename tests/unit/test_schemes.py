"""One scheme registry for the three ports: unknown schemes and missing extras, one line."""

import sys
from collections.abc import Callable
from typing import Any

import pytest

from canonflow.dispatch import open_dispatcher
from canonflow.errors import ConfigError
from canonflow.schemes import DISPATCHERS, OBJECT_STORES, STATE_STORES, Backend, Port
from canonflow.stores import open_object_store, open_state_store


@pytest.mark.parametrize(("open_", "port", "known"), [
    (open_object_store, "object store", "file://, memory://, s3://"),
    (open_state_store, "state store", "postgresql://, sqlite://"),
    (lambda url: open_dispatcher(url, None), "dispatcher", "celery+redis://"),  # type: ignore[arg-type]
])
def test_every_port_names_its_schemes_for_an_unknown_url(
        open_: Callable[[str], Any], port: str, known: str) -> None:
    with pytest.raises(ConfigError, match=f"unsupported {port} URL 'nope://x': use one of "):
        open_("nope://x")
    with pytest.raises(ConfigError, match=known.replace("+", r"\+")):
        open_("nope://x")


def test_a_driver_suffix_falls_back_to_the_base_scheme() -> None:
    assert STATE_STORES.scheme("sqlite+pysqlite:///x.db") == "sqlite"
    assert DISPATCHERS.scheme("celery+amqp://h//") == "celery+amqp"
    with pytest.raises(ConfigError):
        DISPATCHERS.scheme("celery+kafka://h")
    assert OBJECT_STORES.scheme("s3://b/p") == "s3"


def test_a_missing_library_names_the_extra_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "psycopg_missing_for_test", None)
    port = Port("state store", {"x": Backend("psycopg_missing_for_test:open", "postgres")})
    with pytest.raises(ConfigError, match=r"state store x:// needs 'psycopg_missing_for_test': "
                                          r"pip install 'canonflow\[postgres\]'"):
        port.open("x://h")


def test_a_missing_module_of_canonflow_itself_is_not_blamed_on_an_extra() -> None:
    port = Port("state store", {"x": Backend("canonflow.no_such_module:open", "aws")})
    with pytest.raises(ModuleNotFoundError):
        port.open("x://h")


def test_dynamodb_without_boto3_names_the_aws_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "boto3", None)
    monkeypatch.delitem(sys.modules, "canonflow.stores.dynamodb", raising=False)
    with pytest.raises(ConfigError, match=r"state store dynamodb:// needs 'boto3': "
                                          r"pip install 'canonflow\[aws\]'"):
        open_state_store("dynamodb://canonflow?region=us-east-1")
