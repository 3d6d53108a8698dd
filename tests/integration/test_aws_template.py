"""The SAM template shipped in the package: valid (cfn-lint, offline), and the properties a
deployment relies on: DLQs, visibility timeout vs function timeout, a table the DynamoDB
store would create itself (with TTL and point-in-time recovery), least-privilege IAM."""

from __future__ import annotations

import importlib
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cfnlint.api import ManualArgs, decode_str, lint

from canonflow.aws import handlers, template
from canonflow.config import Settings
from canonflow.stores import open_state_store


@pytest.fixture(scope="module")
def doc() -> dict[str, Any]:
    decoded, problems = decode_str(template())
    assert not problems and decoded is not None
    return dict(decoded)


_GONE = object()  # AWS::NoValue: the property or list item is left out


def deployed(doc: dict[str, Any], dispatch: str) -> dict[str, Any]:
    """The template as CloudFormation applies it for ``Dispatch=dispatch``: each Fn::If
    taken, AWS::NoValue left out, resources whose condition is false gone."""
    conditions = {"InvokeDirectly": dispatch == "lambda", "ThroughQueues": dispatch == "sqs"}
    assert set(conditions) == set(doc["Conditions"])

    def walk(value: Any) -> Any:
        if isinstance(value, dict):
            if set(value) == {"Fn::If"}:
                name, yes, no = value["Fn::If"]
                return walk(yes if conditions[name] else no)
            if value == {"Ref": "AWS::NoValue"}:
                return _GONE
            out = {k: walk(v) for k, v in value.items()}
            return {k: v for k, v in out.items() if v is not _GONE}
        if isinstance(value, list):
            return [v for v in map(walk, value) if v is not _GONE]
        return value

    out = walk(doc)
    out["Resources"] = {name: r for name, r in out["Resources"].items()
                        if conditions.get(r.get("Condition", ""), True)}
    return dict(out)


def resources(doc: dict[str, Any], kind: str) -> dict[str, dict[str, Any]]:
    return {name: r for name, r in doc["Resources"].items() if r["Type"] == kind}


def handler(fn: dict[str, Any]) -> str:
    """The handler an image function runs (its command)."""
    assert fn["Properties"]["PackageType"] == "Image"
    (command,) = fn["Properties"]["ImageConfig"]["Command"]
    return str(command)


def refs(value: Any) -> Iterator[str]:
    """Every resource or parameter name a value refers to (Ref, GetAtt, ${...} in Sub)."""
    import re

    if isinstance(value, dict):
        for key, inner in value.items():
            if key == "Ref":
                yield str(inner)
            elif key == "Fn::GetAtt":
                yield str(inner[0] if isinstance(inner, list) else inner.split(".")[0])
            elif key == "Fn::Sub":
                text = inner if isinstance(inner, str) else inner[0]
                yield from (m.split(".")[0] for m in re.findall(r"\$\{([^}]+)\}", text))
            else:
                yield from refs(inner)
    elif isinstance(value, list):
        for inner in value:
            yield from refs(inner)


def test_cfn_lint_finds_nothing() -> None:
    matches = lint(template(), config=ManualArgs(regions=["us-east-1", "eu-west-1"]))
    assert [str(m) for m in matches] == []


def test_every_queue_has_a_dead_letter_queue_and_outlasts_its_function(
        doc: dict[str, Any]) -> None:
    queues = resources(doc, "AWS::SQS::Queue")
    work = {n: q for n, q in queues.items() if "RedrivePolicy" in q.get("Properties", {})}
    assert set(work) == {"ChunkQueue", "TransformQueue"}
    timeouts = doc["Parameters"]["FunctionTimeout"]["AllowedValues"]
    for name, queue in work.items():
        props = queue["Properties"]
        (dlq,) = set(refs(props["RedrivePolicy"]["deadLetterTargetArn"]))
        assert dlq in queues and "RedrivePolicy" not in queues[dlq].get("Properties", {})
        assert list(refs(props["RedrivePolicy"]["maxReceiveCount"])) == ["MaxReceiveCount"]
        assert props["VisibilityTimeout"] == {"Fn::FindInMap": [
            "Timeouts", {"Ref": "FunctionTimeout"}, "Visibility"]}
        for seconds in timeouts:  # at least 6x the function timeout, at most SQS's 12 h
            visibility = doc["Mappings"]["Timeouts"][str(seconds)]["Visibility"]
            assert 6 * int(seconds) <= visibility <= 43_200, name
    functions = resources(doc, "AWS::Serverless::Function")
    for fn in functions.values():  # functions with their own timeout take no queue
        assert fn["Properties"].get("Timeout", {"Ref": "FunctionTimeout"}) == {
            "Ref": "FunctionTimeout"} or handler(fn).endswith(("plan", "sweeper"))
    for mapping in resources(doc, "AWS::Lambda::EventSourceMapping").values():
        assert mapping["Properties"]["FunctionResponseTypes"] == ["ReportBatchItemFailures"]


def test_functions_name_real_handlers_with_schedules_and_reserved_concurrency(
        doc: dict[str, Any]) -> None:
    functions = resources(doc, "AWS::Serverless::Function")
    names = {}
    for name, fn in functions.items():
        module, attr = handler(fn).rsplit(".", 1)
        assert fn["Metadata"]["Dockerfile"] == "Dockerfile"
        assert callable(getattr(importlib.import_module(module), attr))
        names[attr] = fn["Properties"]
        assert "ReservedConcurrentExecutions" in fn["Properties"], name
    assert set(names) == {"plan", "chunk", "transform", "sweeper"}
    assert names["chunk"]["ReservedConcurrentExecutions"] == {"Ref": "ChunkConcurrency"}
    assert names["transform"]["ReservedConcurrentExecutions"] == {
        "Ref": "TransformConcurrency"}
    for stage in ("plan", "sweeper"):
        (event,) = names[stage]["Events"].values()
        assert event["Type"] in ("Schedule", "ScheduleV2")
    for stage in ("chunk", "transform"):  # async invokes (lambda://): retries, then the DLQ
        config = names[stage]["EventInvokeConfig"]
        assert config["MaximumRetryAttempts"] <= 2
        assert config["DestinationConfig"]["OnFailure"]["Type"] == "SQS"
    env = doc["Globals"]["Function"]["Environment"]["Variables"]
    source = Path(handlers.__file__).read_text()
    for variable in env:
        if variable.startswith("CANONFLOW_") and variable not in (
                "CANONFLOW_OBJECT_STORE", "CANONFLOW_STATE_STORE", "CANONFLOW_DISPATCHER"):
            assert f'"{variable}"' in source, variable  # read by the handlers
    assert deployed(doc, "sqs")["Globals"]["Function"]["Environment"]["Variables"][
        "CANONFLOW_DISPATCHER"]["Fn::Sub"].startswith("sqs://")


# what each handler hands on through the dispatcher: the plan sends chunks (and relays a job
# without chunks); a chunk continues itself and relays its job's transforms; a transform
# short of time continues in a new invocation; the sweeper re-sends both
SENDS = {"plan": {"chunk", "transform"}, "chunk": {"chunk", "transform"},
         "transform": {"transform"}, "sweeper": {"chunk", "transform"}}


@pytest.mark.parametrize("dispatch", ["sqs", "lambda"])
def test_each_function_may_send_what_its_handler_sends_whichever_the_dispatch(
        doc: dict[str, Any], dispatch: str) -> None:
    from canonflow.aws.dispatch import LambdaDispatcher, SqsDispatcher

    live = deployed(doc, dispatch)
    functions = resources(live, "AWS::Serverless::Function")
    stack, region, account = "cf-prod", "eu-west-1", "123456789012"
    pseudo = {"AWS::StackName": stack, "AWS::Region": region, "AWS::AccountId": account,
              "AWS::Partition": "aws", "ChunkQueue.QueueName": "cq",
              "TransformQueue.QueueName": "tq"}

    def sub(value: Any) -> str:
        text = value["Fn::Sub"]
        for name, actual in pseudo.items():
            text = text.replace("${" + name + "}", actual)
        return str(text)

    by_stage = {handler(fn).rsplit(".", 1)[1]: fn["Properties"] for fn in functions.values()}
    url = sub(live["Globals"]["Function"]["Environment"]["Variables"]["CANONFLOW_DISPATCHER"])
    settings = Settings(name="t", object_store="memory://", state_store="sqlite://",
                        dispatcher=url)
    if dispatch == "lambda":
        client = object()  # never called: the URL is what this checks
        d: Any = LambdaDispatcher(url, settings, client=client)
        targets = {"chunk": d.chunk_function, "transform": d.transform_function}
        for stage in ("chunk", "transform"):  # the URL names the stack's own functions
            assert sub(by_stage[stage]["FunctionName"]) == targets[stage]
        wanted = {stage: f"arn:aws:lambda:{region}:{account}:function:{name}"
                  for stage, name in targets.items()}
        action = "lambda:InvokeFunction"
        assert not resources(live, "AWS::Lambda::EventSourceMapping")  # no queue polled
    else:
        SqsDispatcher(url, settings, client=object())
        wanted = {"chunk": "ChunkQueue", "transform": "TransformQueue"}
        action = "sqs:SendMessage"
        assert len(resources(live, "AWS::Lambda::EventSourceMapping")) == 2
    for stage, sends in SENDS.items():
        allowed = set()
        for policy in by_stage[stage]["Policies"]:
            for st in policy["Statement"]:
                if action in st["Action"]:
                    targets_ = st["Resource"] if isinstance(st["Resource"], list) else [
                        st["Resource"]]
                    allowed |= ({sub(t) for t in targets_} if dispatch == "lambda"
                                else set(refs(targets_)))
        assert {wanted[s] for s in sends} <= allowed, (stage, dispatch, allowed)
        # and nothing it never sends to (its own dead-letter queue aside: on-failure)
        assert allowed - {wanted[s] for s in sends} <= {
            "ChunkDeadLetterQueue", "TransformDeadLetterQueue"}, (stage, allowed)


@pytest.mark.parametrize("dispatch", ["sqs", "lambda"])
def test_iam_is_least_privilege(doc: dict[str, Any], dispatch: str) -> None:
    doc = deployed(doc, dispatch)
    for name, fn in resources(doc, "AWS::Serverless::Function").items():
        for policy in fn["Properties"]["Policies"]:
            assert isinstance(policy, dict) and set(policy) == {"Statement"}, name
            for st in policy["Statement"]:
                actions = st["Action"] if isinstance(st["Action"], list) else [st["Action"]]
                targets = st["Resource"] if isinstance(st["Resource"], list) else [
                    st["Resource"]]
                assert st["Effect"] == "Allow"
                assert all("*" not in a for a in actions), (name, st["Sid"])
                assert "*" not in targets, (name, st["Sid"])  # never every resource
                named = set(refs(targets))
                services = {a.split(":")[0] for a in actions}
                assert len(services) == 1, (name, st["Sid"])
                service = services.pop()
                if service == "s3":
                    assert "DataBucket" in named
                    if "s3:ListBucket" in actions:
                        assert st["Condition"]["StringLike"]["s3:prefix"]
                    else:
                        assert "DataPrefix" in named
                elif service == "dynamodb":
                    assert named == {"StateTable"}
                elif service == "sqs":
                    assert named and named <= set(resources(doc, "AWS::SQS::Queue"))
                elif service == "lambda":
                    assert actions == ["lambda:InvokeFunction"] and dispatch == "lambda"
                    assert all(t["Fn::Sub"].endswith(("${AWS::StackName}-chunk",
                                                      "${AWS::StackName}-transform"))
                               for t in targets), (name, st["Sid"])
                elif service == "secretsmanager":
                    assert "SecretsPrefix" in named and actions == [
                        "secretsmanager:GetSecretValue"]
                else:
                    raise AssertionError(f"{name}: unexpected service {service}")
    # only the chunk and plan functions read tenant secrets
    readers = {name for name, fn in resources(doc, "AWS::Serverless::Function").items()
               if "SecretsPrefix" in set(refs(fn["Properties"]["Policies"]))}
    assert readers == {"PlanFunction", "ChunkFunction"}


def test_the_table_is_the_one_the_store_creates_with_ttl_and_pitr(
        doc: dict[str, Any], dynamodb_url: str) -> None:
    (table,) = resources(doc, "AWS::DynamoDB::Table").values()
    props = table["Properties"]
    assert props["TimeToLiveSpecification"] == {"AttributeName": "expires", "Enabled": True}
    assert props["PointInTimeRecoverySpecification"] == {"PointInTimeRecoveryEnabled": True}
    assert table["DeletionPolicy"] == "Retain"
    store: Any = open_state_store(dynamodb_url)
    try:
        store.upgrade()
        live = store.client.describe_table(TableName=store.table)["Table"]
        ttl = store.client.describe_time_to_live(TableName=store.table)[
            "TimeToLiveDescription"]
    finally:
        store.close()
    assert ttl["AttributeName"] == "expires"
    assert sorted(props["AttributeDefinitions"], key=str) == sorted(
        live["AttributeDefinitions"], key=str)
    assert props["KeySchema"] == live["KeySchema"]
    for kind in ("GlobalSecondaryIndexes", "LocalSecondaryIndexes"):
        assert {i["IndexName"]: i["KeySchema"] for i in props[kind]} == {
            i["IndexName"]: i["KeySchema"] for i in live[kind]}


def test_the_cli_prints_and_writes_the_template(tmp_path: Path) -> None:
    code = "from canonflow.cli import main; main()"
    printed = subprocess.run([sys.executable, "-c", code, "aws", "template"],
                             capture_output=True, text=True, timeout=60)
    assert printed.returncode == 0, printed.stderr
    assert printed.stdout == template()
    written = subprocess.run([sys.executable, "-c", code, "aws", "template", "--out",
                              str(tmp_path / "deploy")], capture_output=True, text=True,
                             timeout=60)
    assert written.returncode == 0, written.stderr
    assert (tmp_path / "deploy" / "template.yaml").read_text() == template()
    assert (tmp_path / "deploy" / "src" / "requirements.txt").read_text().startswith(
        "canonflow[aws]")
    docker = (tmp_path / "deploy" / "src" / "Dockerfile").read_text()
    assert "public.ecr.aws/lambda/python:3.12" in docker
    assert "COPY pipeline.yaml ${LAMBDA_TASK_ROOT}/" in docker
    assert "requirements.txt" in docker
