"""The pipeline file as written: ${VAR} in any string, paths relative to the file, tenant
values in connections, and the mistakes refused before anything runs."""

from __future__ import annotations

from pathlib import Path

import pytest

from canonflow.config import Settings, SourceConfig, TenantConfig, load_settings
from canonflow.connectors.spec import parse_spec
from canonflow.connectors.tenancy import connect
from canonflow.errors import ConfigError
from canonflow.interpolation import expand_env

SPEC = """
service: shop
base_url: https://{tenant.shop}.shop.example/api
auth: {type: oauth2_client_credentials, token_url: "https://{tenant.shop}.shop.example/token"}
tables:
  orders:
    path: /tenants/{tenant.tenant_id}/orders
    records_path: data
    primary_key: id
    params: {owner: "{tenant.owner}", status: all}
    pagination: {type: page_number, has_more_path: meta.more}
    chunking: {type: sequential}
"""


def write(tmp_path: Path, text: str, name: str = "pipeline.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


MINIMAL = "sources: [{service: crm}]\ntenants: [{tenant_id: acme}]\n"


# -- ${VAR} -------------------------------------------------------------------------------

def test_env_references_expand_in_every_string_value_recursively() -> None:
    env = {"HOST": "api.example.com", "TOKEN": "t0ken-value", "N": "50"}
    data = {"object_store": "s3://b/${HOST}", "sources": [
        {"service": "crm", "base_url": "https://${HOST}/v1", "page_size": "${N}"}],
        "tenants": [{"tenant_id": "acme", "values": {"sub": "x-${HOST}"},
                     "credentials": {"crm": {"token": "${TOKEN}"}}}], "batch_records": 7}
    out = expand_env(data, env)
    assert out["object_store"] == "s3://b/api.example.com"
    assert out["sources"][0] == {"service": "crm", "base_url": "https://api.example.com/v1",
                                 "page_size": "50"}
    assert out["tenants"][0]["values"] == {"sub": "x-api.example.com"}
    assert out["tenants"][0]["credentials"] == {"crm": {"token": "t0ken-value"}}
    assert out["batch_records"] == 7


@pytest.mark.parametrize(("text", "expanded"), [
    ("price $$5", "price $5"), ("$$HOME", "$HOME"), ("$${HOME}", "${HOME}"),
    ("cost $5 or $", "cost $5 or $"), ("a${X}b${X}", "a1b1")])
def test_double_dollar_is_a_literal_dollar(text: str, expanded: str) -> None:
    assert expand_env(text, {"X": "1"}) == expanded


def test_a_missing_variable_is_named_with_its_place() -> None:
    with pytest.raises(ConfigError, match=r"at sources\.0\.base_url: environment variable "
                                          r"API_HOST is not set"):
        expand_env({"sources": [{"base_url": "https://${API_HOST}/v1"}]}, {})


def test_a_bare_dollar_name_suggests_braces() -> None:
    with pytest.raises(ConfigError, match=r"at object_store: \$BUCKET is not read from the "
                                          r"environment: write \$\{BUCKET\}"):
        expand_env({"object_store": "s3://$BUCKET/x"}, {"BUCKET": "b"})


def test_an_unclosed_reference_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"at name: '\$\{' starts no \$\{NAME\}"):
        expand_env({"name": "x${OOPS"}, {})


@pytest.mark.parametrize("where", [
    {"tenants": [{"credentials": {"crm": {"token": "pa$sw0rdSecret"}}}]},
    {"state_store": "postgresql://u:pa$sw0rdSecret@db/x"}])
def test_a_bare_dollar_in_a_secret_never_shows_the_secret(where: dict[str, object]) -> None:
    with pytest.raises(ConfigError) as info:
        expand_env(where, {})
    assert "sw0rd" not in str(info.value) and "${NAME}" in str(info.value)


def test_load_settings_reports_env_errors_with_the_file(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOPE_URL", raising=False)
    path = write(tmp_path, "sources: [{service: crm, base_url: '${NOPE_URL}'}]\n"
                 "tenants: [{tenant_id: acme}]\n")
    with pytest.raises(ConfigError, match=rf"^{path}: at sources\.0\.base_url: environment "
                                          "variable NOPE_URL is not set \\(export it, or write "
                                          "the value in the file\\)$"):
        load_settings(path)


# -- relative paths -----------------------------------------------------------------------

def test_every_relative_path_is_relative_to_the_file(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "project"
    folder.mkdir()
    (folder / "specs").mkdir()
    (folder / "specs" / "shop.yaml").write_text(SPEC)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SPECS", "specs")
    settings = load_settings(write(folder, """
object_store: file://./data
state_store: sqlite:///../state.db
canonical_store: file:///abs/canonical
mapping_dirs: [mappings, /abs/mappings, "${SPECS}/../more"]
sources: [{service: shop, spec: "${SPECS}/shop.yaml"}, {service: crm}]
tenants: [{tenant_id: acme, values: {shop: acme, owner: o1}}]
"""))
    assert settings.object_store == f"file://{folder}/data"
    assert settings.state_store == f"sqlite:///{tmp_path}/state.db"
    assert settings.canonical_store == "file:///abs/canonical"
    assert settings.mapping_dirs == [str(folder / "mappings"), "/abs/mappings",
                                     str(folder / "more")]
    assert settings.sources[0].spec == str(folder / "specs" / "shop.yaml")
    assert settings.sources[1].spec is None
    assert settings.spec_for("shop").service == "shop"  # found from another directory


# -- mistakes refused at load -------------------------------------------------------------

def test_a_duplicate_source_service_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, "sources: [{service: crm}, {service: helpdesk}, {service: crm}]\n"
                 "tenants: [{tenant_id: acme}]\n")
    with pytest.raises(ConfigError, match="duplicate source service crm: each service is "
                                          "listed once"):
        load_settings(path)


@pytest.mark.parametrize("url", ["ftp://x", "not a url", "http://", "https://a b.example/"])
def test_a_base_url_that_is_not_http_is_a_config_error(tmp_path: Path, url: str) -> None:
    path = write(tmp_path, f"sources: [{{service: crm, base_url: '{url}'}}]\n"
                 "tenants: [{tenant_id: acme}]\n")
    with pytest.raises(ConfigError, match=r"at sources\.0\.base_url: .*is not an http\(s\) URL"):
        load_settings(path)
    with pytest.raises(ConfigError, match=r"s\.yaml: at base_url: .*is not an http\(s\) URL"):
        parse_spec(SPEC.replace("https://{tenant.shop}.shop.example/api", url), "s.yaml")


@pytest.mark.parametrize(("values", "message"), [
    ({"tenant_id": "x"}, "tenant_id is not a value"),
    ({"a-b": "x"}, "value name 'a-b'")])
def test_tenant_value_names(values: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TenantConfig(tenant_id="acme", values=values)


# -- tenant values in connections ---------------------------------------------------------

def test_connect_puts_the_tenants_values_in_urls_paths_and_params() -> None:
    spec = parse_spec(SPEC, "shop.yaml")
    conn = connect(spec, None, "acme", {"shop": "acme-eu", "owner": "Ann & Bob"})
    assert conn.base_url == "https://acme-eu.shop.example/api"
    table = conn.spec.tables["orders"]
    assert table.path == "/tenants/acme/orders"
    assert table.params == {"owner": "Ann & Bob", "status": "all"}  # the query encodes it
    assert conn.spec.auth.token_url == "https://acme-eu.shop.example/token"  # type: ignore[union-attr]
    assert spec.tables["orders"].path == "/tenants/{tenant.tenant_id}/orders"  # unchanged
    # in a URL a value is one segment: it cannot add a path or a query
    sneaky = connect(spec, "https://api.example/{tenant.shop}", "acme",
                     {"shop": "../admin?x=1", "owner": "o"})
    assert sneaky.base_url == "https://api.example/..%2Fadmin%3Fx%3D1"


def test_a_missing_tenant_value_names_the_tenant_and_the_key() -> None:
    spec = parse_spec(SPEC, "shop.yaml")
    with pytest.raises(ConfigError, match=r"tenant 'globex' has no value 'owner' \(shop "
                                          r"tables\.orders\.params\.owner uses "
                                          r"\{tenant\.owner\}\)"):
        connect(spec, None, "globex", {"shop": "g"})
    with pytest.raises(ConfigError, match=r"tenant 'globex', service shop: base_url "
                                          r"'https://a%20b\.shop\.example/api' is not"):
        connect(spec, None, "globex", {"shop": "a b", "owner": "o"})


def test_settings_check_every_tenant_and_workers_get_the_same_connection(
        tmp_path: Path) -> None:
    spec = write(tmp_path, SPEC, "shop.yaml")
    settings = Settings(
        sources=[SourceConfig(service="shop", spec=str(spec))],
        tenants=[TenantConfig(tenant_id="acme", values={"shop": "a", "owner": "o"}),
                 TenantConfig.model_validate({"tenant_id": "globex",
                                              "values": {"shop": "g"}})])
    with pytest.raises(ConfigError, match="tenant 'globex' has no value 'owner'"):
        settings.check_connections()
    worker = Settings.model_validate_json(settings.to_worker_json())
    assert worker.connection("acme", "shop") == settings.connection("acme", "shop")
    assert worker.connection("acme", "shop").base_url == "https://a.shop.example/api"


def test_load_settings_expands_before_validation(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ACME_SHOP", "acme-shop")
    monkeypatch.setenv("PAGE", "25")
    settings = load_settings(write(tmp_path, MINIMAL.replace(
        "{service: crm}", "{service: crm, page_size: '${PAGE}'}").replace(
        "{tenant_id: acme}", "{tenant_id: acme, values: {shop: '${ACME_SHOP}'}}")))
    assert settings.sources[0].page_size == 25
    assert settings.tenants[0].values == {"shop": "acme-shop"}


def test_a_fetched_file_can_be_read_relative_to_another_folder(tmp_path: Path) -> None:
    fetched = write(tmp_path, "mapping_dirs: [mappings]\n" + MINIMAL, "fetched.yaml")
    home = tmp_path / "task"
    assert load_settings(fetched, relative_to=home).mapping_dirs == [str(home / "mappings")]
