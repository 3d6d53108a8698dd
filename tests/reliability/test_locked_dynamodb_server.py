"""The test server must serialize requests: ADDs from several processes on one item, among
transactions that add to it too and are cancelled, end at the exact count. moto's bare
server loses some (a cancelled transaction puts back what it backed up before it ran,
erasing what other requests wrote meanwhile); if this fails, the DynamoDB tests would be
judging moto's races, not canonflow."""

from __future__ import annotations

import boto3
import botocore.exceptions

from tests.processes import run_together

PROCESSES, ADDS = 8, 120


def _client(endpoint: str):  # type: ignore[no-untyped-def]
    return boto3.client("dynamodb", endpoint_url=endpoint, region_name="us-east-1")


def _add(endpoint: str, table: str, barrier) -> None:  # type: ignore[no-untyped-def]
    client = _client(endpoint)
    barrier.wait()
    for i in range(ADDS):
        client.update_item(TableName=table, Key={"pk": {"S": "counter"}},
                           UpdateExpression="ADD #n :one",
                           ExpressionAttributeNames={"#n": "n"},
                           ExpressionAttributeValues={":one": {"N": "1"}})
        try:  # a transaction whose condition fails: it must change nothing, and only that
            client.transact_write_items(TransactItems=[
                {"Update": {"TableName": table, "Key": {"pk": {"S": "counter"}},
                            "UpdateExpression": "ADD #n :one",
                            "ExpressionAttributeNames": {"#n": "n"},
                            "ExpressionAttributeValues": {":one": {"N": "1"}}}},
                {"ConditionCheck": {"TableName": table, "Key": {"pk": {"S": "absent"}},
                                    "ConditionExpression": "attribute_exists(#pk)",
                                    "ExpressionAttributeNames": {"#pk": "pk"}}},
                {"Put": {"TableName": table, "Item": {"pk": {"S": f"other-{i}"}}}},
            ])
        except botocore.exceptions.ClientError as exc:
            assert exc.response["Error"]["Code"] == "TransactionCanceledException"


def test_unconditional_adds_from_several_processes_all_count(dynamodb_endpoint: str) -> None:
    client = _client(dynamodb_endpoint)
    table = "guard-counter"
    client.create_table(TableName=table, BillingMode="PAY_PER_REQUEST",
                        AttributeDefinitions=[{"AttributeName": "pk", "AttributeType": "S"}],
                        KeySchema=[{"AttributeName": "pk", "KeyType": "HASH"}])
    try:
        run_together(_add, [(dynamodb_endpoint, table)] * PROCESSES)
        item = client.get_item(TableName=table, Key={"pk": {"S": "counter"}},
                               ConsistentRead=True)["Item"]
        assert int(item["n"]["N"]) == PROCESSES * ADDS
    finally:
        client.delete_table(TableName=table)
