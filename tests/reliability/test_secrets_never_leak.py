"""Invariant 10 end to end: a pipeline with a secret in every place a secret can be, run
through the CLI with its failure paths, then every output searched for every secret.

Secrets: a bearer token (from the environment), an API key sent as a query parameter and
echoed by the API in its next links, basic-auth user and password, userinfo in a source's
base URL, the PostgreSQL state-store password (trust auth: any password connects), and a
broker password. Failure paths: a connection dropped on a page whose URL carries the key
(retried, then the table fails), ``status`` of an unknown job (the error names the state
store), an unknown dispatcher scheme, an unknown state-store scheme, a broker that refuses
the password. Searched: CLI stdout and stderr (JSON logs at INFO), every span and metric
the run exported over OTLP, every row of every state-store table, every file under the
data directory (raw batches decompressed, Parquet read back).
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import sqlalchemy as sa

from canonflow.transform.reader import decompress
from tests.otlp import receiver
from tests.secret_api import (
    BASIC_SPEC,
    BEARER_SPEC,
    KEYED_SPEC,
    SecretApi,
    record,
    serve_secret_api,
)

TOKEN = "HdrTok-e2e-7f3a91"
API_KEY = "QryKey-e2e-b62c04"
BASIC_USER = "BasicUser-e2e-5d1e"
BASIC_PW = "BasicPw-e2e-90aa7c"
URL_PW = "UrlPw-e2e-44be10"
PG_PW = "PgPw-e2e-c0ffee11"
BROKER_PW = "BrokerPw-e2e-d00d22"
SECRETS = {
    "bearer token": TOKEN, "api key": API_KEY, "basic user": BASIC_USER,
    "basic password": BASIC_PW, "basic header": base64.b64encode(
        f"{BASIC_USER}:{BASIC_PW}".encode()).decode(),
    "base_url userinfo password": URL_PW, "state store password": PG_PW,
    "broker password": BROKER_PW,
}
MAPPING = """
source: {{service: {service}, table: items}}
entity: company
fields:
  id: {{path: id}}
  name: {{path: name}}
  updated_at: {{path: updated_at}}
"""


def cli(*args: str, env: dict[str, str] | None = None,
        cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", "from canonflow.cli import main; main()", *args],
        capture_output=True, text=True, timeout=300, env={**os.environ, **(env or {})},
        cwd=cwd)


def with_password(url: str, password: str) -> str:
    return url.replace("postgresql://postgres@", f"postgresql://postgres:{password}@", 1)


def state_rows(url: str) -> dict[str, list[str]]:
    """Every row of every table of the state store's schema, as text."""
    schema = url.split("search_path%3D", 1)[1]
    engine = sa.create_engine(
        url.split("?")[0].replace("postgresql://", "postgresql+psycopg://", 1))
    try:
        with engine.connect() as conn:
            names = sa.inspect(conn).get_table_names(schema=schema)
            return {name: [repr(tuple(row)) for row in conn.execute(
                sa.text(f'SELECT * FROM "{schema}"."{name}"'))] for name in names}
    finally:
        engine.dispose()


def data_texts(root: Path) -> dict[str, str]:
    """Every file under the data directory as text: raw batches decompressed, Parquet read."""
    texts = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        data = path.read_bytes()
        if path.name.endswith(".zst"):
            texts[str(path)] = decompress(data, str(path)).decode()
        elif path.suffix == ".parquet":
            texts[str(path)] = repr(pq.read_table(path).to_pylist())
        else:
            texts[str(path)] = data.decode(errors="replace")
    return texts


@pytest.mark.parametrize("dispatcher", ["inline://", "local://?workers=2"])
def test_no_secret_reaches_any_output(tmp_path: Path, postgres_url: str,
                                      dispatcher: str) -> None:
    # inline: every component logs JSON lines with their extras through one formatter;
    # local: worker processes rebuild the settings from JSON and must know the secrets too
    for service in ("bearer", "keyed", "basic"):  # records carry no secret
        for i in range(40):
            assert not any(s in json.dumps(record(service, i)) for s in SECRETS.values())
    mappings = tmp_path / "mappings"
    mappings.mkdir()
    for service, spec in (("bearer", BEARER_SPEC), ("keyed", KEYED_SPEC),
                          ("basic", BASIC_SPEC)):
        (tmp_path / f"{service}.yaml").write_text(spec.format(service=service))
        (mappings / f"{service}.yaml").write_text(MAPPING.format(service=service))
    state_url = with_password(postgres_url, PG_PW)
    api = SecretApi(token=TOKEN, api_key=API_KEY, username=BASIC_USER, password=BASIC_PW,
                    records=35, drop={("keyed", 3): -1,  # always: the keyed table fails
                                      ("bearer", 2): 1})  # once: retried, then served
    data = tmp_path / "data"
    env = {"E2E_TOKEN": TOKEN}
    with serve_secret_api(api) as server:
        host = server.base_url.removeprefix("http://")
        pipeline = {
            "name": "secrets", "object_store": f"file://{data}", "state_store": state_url,
            "dispatcher": dispatcher, "batch_records": 10,
            "mapping_dirs": [str(mappings)],
            "sources": [
                {"service": "bearer", "spec": str(tmp_path / "bearer.yaml"),
                 "base_url": f"http://svc:{URL_PW}@{host}/bearer"},
                {"service": "keyed", "spec": str(tmp_path / "keyed.yaml"),
                 "base_url": f"{server.base_url}/keyed"},
                {"service": "basic", "spec": str(tmp_path / "basic.yaml"),
                 "base_url": f"{server.base_url}/basic"}],
            "tenants": [{"tenant_id": "acme", "credentials": {
                "bearer": {"token": "${E2E_TOKEN}"}, "keyed": {"key": API_KEY},
                "basic": {"user": BASIC_USER, "password": BASIC_PW}}}],
        }
        path = tmp_path / "pipeline.yaml"
        path.write_text(json.dumps(pipeline))  # JSON is YAML
        with receiver() as (endpoint, telemetry):  # spans and metrics go out too
            run = cli("run", str(path), "--json", "--verbose",
                      env={**env, "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint})
        assert run.returncode == 1, run.stderr[-2000:]  # the keyed table failed
        (job,) = json.loads(run.stdout)["jobs"]
        status = cli("status", job["job_id"], "--pipeline", str(path), "--json", env=env)
        unknown = cli("status", "job-nope", "--pipeline", str(path), env=env)
        bad_dispatcher = tmp_path / "bad-dispatcher.yaml"
        bad_dispatcher.write_text(json.dumps(
            {**pipeline, "dispatcher": f"kafka://bus:{BROKER_PW}@127.0.0.1:9092"}))
        no_such_dispatcher = cli("run", str(bad_dispatcher), env=env)
        bad_store = tmp_path / "bad-store.yaml"
        bad_store.write_text(json.dumps(
            {**pipeline, "state_store": f"mysql://root:{PG_PW}@127.0.0.1:3306/x"}))
        no_such_store = cli("status", "--pipeline", str(bad_store), env=env)
        refused = tmp_path / "broker-refuses.yaml"
        refused.write_text(json.dumps(
            {**pipeline, "dispatcher": f"celery+amqp://guest:{BROKER_PW}@127.0.0.1:5672//"}))
        broker = cli("run", str(refused), "--json", env=env)

    # every place was exercised, and the failure paths failed the way they should
    tables = job["tables"]
    assert tables["acme/bearer.items"]["records_canonical"] == 35
    assert tables["acme/basic.items"]["records_canonical"] == 35
    keyed = tables["acme/keyed.items"]
    assert keyed["chunks_failed"] == 1 and keyed["records_canonical"] == 0
    assert "after=20" in keyed["errors"][0] and "RemoteProtocolError" in keyed["errors"][0]
    assert api.dropped[("keyed", 3)] >= 2  # retried, on a URL carrying the key
    assert api.dropped[("bearer", 2)] == 1  # retried, on the base URL with userinfo
    assert json.loads(status.stdout)["tables"]["acme/keyed.items"]["errors"] == keyed["errors"]
    assert unknown.returncode == 2 and "no job 'job-nope'" in unknown.stderr
    assert "postgresql://postgres:***@127.0.0.1" in unknown.stderr
    assert no_such_dispatcher.returncode == 2
    assert "unsupported dispatcher URL 'kafka://bus:***@127.0.0.1:9092'" \
        in no_such_dispatcher.stderr
    assert no_such_store.returncode == 2 and "unsupported state store URL" in no_such_store.stderr
    assert broker.returncode != 0 and "ACCESS_REFUSED" in broker.stderr
    state = state_rows(state_url)
    assert state["checkpoints"], "the keyed chunk saved checkpoints"
    assert any("after=20" in row for row in state["checkpoints"])
    files = data_texts(data)
    assert any("/raw/acme/keyed/items/" in name for name in files)

    outputs: dict[str, str] = {}
    for name, proc in (("run", run), ("status --json", status), ("status unknown", unknown),
                       ("run unknown dispatcher", no_such_dispatcher),
                       ("status unknown store", no_such_store), ("run broker", broker)):
        outputs[f"{name} stdout"] = proc.stdout
        outputs[f"{name} stderr"] = proc.stderr
    assert "retrying" in run.stderr  # the dropped connection was retried and logged
    if dispatcher == "inline://":
        logs = [json.loads(line) for line in run.stderr.splitlines() if line.startswith("{")]
        retried = [doc for doc in logs if doc["event"] == "retrying"]
        assert any("after=20" in doc["error"] for doc in retried)  # the URL that had the key
        assert any("//127.0.0.1" in doc["error"] and "/bearer/items" in doc["error"]
                   for doc in retried)  # the base URL that had userinfo
    for table, rows in state.items():
        outputs[f"state table {table}"] = "\n".join(rows)
    assert any(s.name == "canonflow.chunk" and s.error for s in telemetry.spans)
    for i, body in enumerate(telemetry.bodies):
        outputs[f"telemetry export {i}"] = body.decode("latin-1")
    outputs.update(files)
    leaks = [f"{what} in {where}" for where, text in outputs.items()
             for what, secret in SECRETS.items() if secret in text]
    assert not leaks, "\n".join(leaks)


@pytest.fixture(autouse=True)
def _no_leftover_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("E2E_TOKEN", raising=False)
