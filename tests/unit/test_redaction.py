"""Invariant 10 at each boundary: errors, error payloads, JSON logs, settings in every process,
the CLI's last line."""

from __future__ import annotations

import io
import logging
import signal
import subprocess
import sys
from typing import Any

import orjson
import pytest

from canonflow import errors, log
from canonflow.config import Settings, SourceConfig, TenantConfig
from canonflow.errors import ConfigError, HttpRetryable, error_payload
from canonflow.redact import redact


def test_every_canonflow_error_is_redacted_when_created() -> None:
    exc = ConfigError("unsupported dispatcher URL 'kafka://bus:Br0kerPw-1@10.0.0.1:9092': "
                      "GET http://api.test/x?after=3&api_key=QueryKey-77")
    assert "Br0kerPw-1" not in str(exc) and "QueryKey-77" not in str(exc)
    assert "Br0kerPw-1" not in exc.args[0]  # what a traceback or repr would show
    assert "kafka://bus:***@10.0.0.1:9092" in str(exc)
    retry = HttpRetryable("GET http://user:UserinfoPw-3@api.test/v1: ReadTimeout", 1.5)
    assert "UserinfoPw-3" not in str(retry) and retry.retry_after == 1.5
    assert "UserinfoPw-3" not in orjson.dumps(retry.to_payload()).decode()


def test_error_payload_redacts_any_exception() -> None:
    payload = error_payload(RuntimeError(
        "could not connect to postgresql://app:PgSecret-9@db:5432/canonflow"))
    assert payload["type"] == "RuntimeError" and payload["retryable"] is True
    assert "PgSecret-9" not in payload["message"]
    assert "postgresql://app:***@db" in payload["message"]


def test_a_secret_registered_after_the_error_is_masked_when_shown() -> None:
    from canonflow.redact import register_secret

    exc = errors.HttpTerminal("GET http://api.test/v1: HTTP 403 for LateSecret-5150")
    register_secret("LateSecret-5150")
    assert "LateSecret-5150" not in str(exc)


def test_the_json_log_formatter_redacts_message_extras_and_exception() -> None:
    from canonflow.redact import register_secret

    register_secret("KnownToken-4242")
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(log.JsonFormatter())
    logger = logging.getLogger("canonflow.test_redaction")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        try:
            raise RuntimeError("GET http://svc:ExcPassword-1@api.test/v1 failed")
        except RuntimeError:
            logger.error("calling %s with KnownToken-4242", "http://api.test/v1?token=ArgTok-8",
                         exc_info=True, extra={
                             "url": "http://u:ExtraPw-2@api.test/?api_key=ExtraKey-3",
                             "nested": {"headers": ["Authorization: Bearer NestedTok-4"],
                                        "value": "KnownToken-4242"},
                             "obj": ValueError("ObjSecret KnownToken-4242")})
    finally:
        logger.removeHandler(handler)
    line = stream.getvalue().strip()
    doc = orjson.loads(line)  # still one JSON object per line
    assert doc["level"] == "error" and doc["logger"] == "canonflow.test_redaction"
    for secret in ("KnownToken-4242", "ArgTok-8", "ExtraPw-2", "ExtraKey-3", "NestedTok-4",
                   "ExcPassword-1"):
        assert secret not in line, secret
    assert doc["nested"]["value"] == "***"


WORKER = """
import sys
from canonflow.config import Settings
from canonflow.redact import redact
Settings.model_validate_json(sys.stdin.read())
print(redact("token TenantCred-31337 user UserCred-5 store PgPass-77 broker BrokerPass-88 "
             "base BasePass-99 objects ObjSecretKey-11"))
"""


def test_settings_register_their_secrets_when_validated_in_any_process() -> None:
    settings = Settings(
        state_store="postgresql://app:PgPass-77@127.0.0.1:5432/test",
        dispatcher="celery+amqp://guest:BrokerPass-88@127.0.0.1:5672//",
        object_store="s3://bucket/prefix?secret_access_key=ObjSecretKey-11",
        sources=[SourceConfig(service="crm", base_url="http://svc:BasePass-99@api.test/v1")],
        tenants=[TenantConfig.model_validate({"tenant_id": "acme", "credentials": {
            "crm": {"token": "TenantCred-31337", "user": "UserCred-5"}}})])
    worker = subprocess.run([sys.executable, "-c", WORKER], input=settings.to_worker_json(),
                            capture_output=True, text=True, timeout=60)
    assert worker.returncode == 0, worker.stderr
    shown = worker.stdout
    for secret in ("TenantCred-31337", "UserCred-5", "PgPass-77", "BrokerPass-88",
                   "BasePass-99", "ObjSecretKey-11"):
        assert secret not in shown, secret
    assert shown.count("***") == 6
    assert "TenantCred-31337" not in redact("TenantCred-31337")  # and in this process too


def test_the_cli_error_line_is_redacted_for_any_exception(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from canonflow import cli

    def boom(**_: object) -> None:
        raise RuntimeError("lost postgresql://app:CliPgPw-6@db:5432/x while reading "
                           "page[after]=7&api_key=CliKey-12")

    monkeypatch.setattr(cli, "app", boom)
    saved = signal.getsignal(signal.SIGINT)  # main ignores Ctrl-C once it exits
    try:
        with pytest.raises(SystemExit) as info:
            cli.main()
    finally:
        signal.signal(signal.SIGINT, saved)
    assert info.value.code == 1
    err = capsys.readouterr().err
    assert "CliPgPw-6" not in err and "CliKey-12" not in err
    assert "RuntimeError" in err and "page[after]=7" in err  # one readable line
    assert len(err.strip().splitlines()) == 1


def test_names_that_end_in_key_are_secrets_only_when_they_say_so() -> None:
    """A spec error about ``primary_key`` keeps its words; secret-named keys are masked."""
    assert redact("at tables.x.primary_key: Field required") == \
        "at tables.x.primary_key: Field required"
    assert redact("sort_key = 5, partition_key: tenant") == "sort_key = 5, partition_key: tenant"
    for text in ("key: abc123", "private_key: abc123", "X-Api-Key: abc123",
                 "aws_secret_access_key: abc123", '{"key": "abc123"}', "?key=abc123&x=1"):
        assert "abc123" not in redact(text), text


def test_a_location_that_ends_in_a_secret_name_keeps_the_problem_after_it() -> None:
    """``at tenants.0.credentials.crm.token: Field required`` names where the problem is;
    the words after it are the problem, not the value (which a validation message never
    carries), while a bare or quoted field of the same name is still masked."""
    for text in ("at tenants.0.credentials.crm.token: Field required",
                 "pipeline.yaml: at sources.0.auth.password: Input should be a valid string",
                 "at sources.1.auth: Extra inputs are not permitted"):
        assert redact(text) == text, text
    for text in ("token: abc123", "password=abc123", '{"token": "abc123"}',
                 "crm token: abc123", "Authorization: Basic abc123", "token = abc123",
                 "db.password=abc123", "auth.token = abc123", "Bearer abc123=="):
        assert "abc123" not in redact(text), text


def test_known_secrets_match_as_a_prefix_tree_longest_first() -> None:
    import random
    import re

    from canonflow.redact import trie_pattern

    words = ["tok-a1", "tok-a1-longer", "tok-b2", "p(a)s$s.w*rd", "tok-", "xyz\\q"]
    pattern = re.compile(trie_pattern(words))
    text = "x tok-a1-longer y tok-a1 z p(a)s$s.w*rd tok-b tok-b2 xyz\\q tok-"
    assert pattern.sub("*", text) == "x * y * z * *b * * *"
    # the same answers as the plain alternation, longest first, on random secrets and text
    rng = random.Random(9)
    many = {"".join(rng.choice("ab-c.1") for _ in range(rng.randint(4, 9)))
            for _ in range(300)}
    plain = re.compile("|".join(re.escape(w) for w in sorted(many, key=len, reverse=True)))
    tree = re.compile(trie_pattern(many))
    for _ in range(200):
        sample = "".join(rng.choice("ab-c.1 x") for _ in range(60))
        assert tree.sub("*", sample) == plain.sub("*", sample), sample


def test_thousands_of_tenants_register_their_secrets_at_the_cost_of_one_pattern(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from canonflow import redact as module

    builds: list[int] = []
    real = module.trie_pattern

    def counted(words: Any) -> str:
        words = list(words)
        builds.append(len(words))
        return real(words)

    monkeypatch.setattr(module, "trie_pattern", counted)
    for i in range(3000):  # each tenant's settings register its credentials one by one
        module.register_secret(f"bench-token-{i:05d}-{i * 7919 % 100_003:06d}")
    last = f"bench-token-02999-{2999 * 7919 % 100_003:06d}"
    assert redact(f"Authorization failed for {last}.") == "Authorization failed for ***."
    assert redact("nothing new") == "nothing new"
    assert len(builds) == 1  # one pattern for 3,000 registrations (it was one each)
