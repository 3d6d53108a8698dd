"""Shared fixtures. Tests are marked by folder: integration/ and reliability/ get their marker
here, in one place."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NoReturn

import pytest
import sqlalchemy as sa

from canonflow.config import Settings, SourceConfig, TenantConfig
from canonflow.connectors.demo_api import DemoApi, DemoServer, serve, tenant_token
from canonflow.runtime import Runtime

HERE = Path(__file__).parent

# the AWS test servers' (moto's) credentials, in the environment before any worker process
# (local pool fork servers start once and keep the environment they started with)
for _key, _value in (("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing"),
                     ("AWS_REGION", "us-east-1")):
    os.environ.setdefault(_key, _value)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        rel = Path(str(item.fspath)).relative_to(HERE)
        if rel.parts[0] in ("integration", "reliability"):
            item.add_marker(getattr(pytest.mark, rel.parts[0]))


def service_missing(what: str, error: object) -> NoReturn:
    """A real service a test needs is not reachable: a failure in CI, a skip elsewhere."""
    message = f"{what} not reachable: {error}"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


POSTGRES = os.environ.get("CANONFLOW_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A state-store URL on the real PostgreSQL, in a schema of its own, dropped afterwards."""
    engine = sa.create_engine(POSTGRES.replace("postgresql://", "postgresql+psycopg://", 1))
    schema = f"t_{uuid.uuid4().hex[:12]}"
    try:
        with engine.begin() as conn:
            conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
    except sa.exc.OperationalError as exc:
        engine.dispose()
        service_missing("PostgreSQL", exc.orig)
    sep = "&" if "?" in POSTGRES else "?"
    yield f"{POSTGRES}{sep}options=-csearch_path%3D{schema}"
    with engine.begin() as conn:
        conn.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))
    engine.dispose()


REDIS = os.environ.get("CANONFLOW_TEST_REDIS", "redis://127.0.0.1:6379/0")


@pytest.fixture
def redis_url() -> str:
    """The real Redis (a Celery broker)."""
    import socket

    host, port = REDIS.split("//", 1)[1].split("/")[0].split(":")
    try:
        socket.create_connection((host, int(port)), timeout=2).close()
    except OSError as exc:
        service_missing("Redis", exc)
    return REDIS


@pytest.fixture(scope="session")
def dynamodb_endpoint() -> Iterator[str]:
    """A DynamoDB-compatible server for the session (moto behind one lock, see tests/aws.py),
    started here and stopped by its handle."""
    try:
        from tests.aws import LockedDynamoServer

        server = LockedDynamoServer().start()
    except (ImportError, OSError) as exc:
        service_missing("DynamoDB test server", exc)
    yield server.endpoint
    server.stop()


@pytest.fixture
def dynamodb_url(dynamodb_endpoint: str) -> str:
    """A state-store URL on the test server, a table of its own (created on first use)."""
    return f"dynamodb://t-{uuid.uuid4().hex[:12]}?region=us-east-1&endpoint={dynamodb_endpoint}"


S3_BUCKET = "canonflow-test"


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """An S3-compatible server: CANONFLOW_TEST_S3_ENDPOINT (CI starts moto_server), or a
    moto_server this session starts on a free port and stops by PID."""
    import shutil
    import socket
    import subprocess
    import time

    for key, value in (("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing"),
                       ("AWS_REGION", "us-east-1")):
        os.environ.setdefault(key, value)
    endpoint = os.environ.get("CANONFLOW_TEST_S3_ENDPOINT")
    proc = None
    if endpoint is None:
        binary = shutil.which("moto_server")
        if binary is None:
            service_missing("S3 server", "moto_server is not installed")
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        proc = subprocess.Popen([binary, "-H", "127.0.0.1", "-p", str(port)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        endpoint = f"http://127.0.0.1:{port}"
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    deadline = time.monotonic() + 20
    while True:
        try:
            client.head_bucket(Bucket=S3_BUCKET)
            break
        except client.exceptions.ClientError:
            client.create_bucket(Bucket=S3_BUCKET)
            break
        except Exception as exc:  # not up yet
            if time.monotonic() > deadline:
                service_missing("S3 server", exc)
            time.sleep(0.2)
    yield endpoint
    if proc is not None:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture
def s3_url(s3_endpoint: str) -> str:
    """An object-store URL on the S3 server under a prefix of its own."""
    return f"s3://{S3_BUCKET}/{uuid.uuid4().hex[:12]}?endpoint={s3_endpoint}"


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
