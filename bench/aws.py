"""``python -m bench.aws [--records N] [--json]``: what a sync costs on AWS, from counts.

The whole pipeline runs through the Lambda handlers (plan, chunk, transform) with SQS
delivery played in this process, against one AWS-compatible test server (moto: S3, SQS,
DynamoDB) that counts every request it answers, by service and operation: the S3 requests of
the raw files, manifests and Delta tables, the DynamoDB requests of the protocol, the SQS
requests of the dispatch and its event source. Invocations are counted as Lambda would make
them (chunk batches of 5, transform batches of 1) and timed here (an estimate of GB-seconds:
this machine, a local server, not Lambda).

Prices are us-east-1 list prices (inputs, printed with the result); DynamoDB requests are
priced as one request unit each (items here are under 1 KB; a transactional write counts
double): a lower bound when items grow.
"""

from __future__ import annotations

import argparse
import threading
import time
import uuid
from collections import Counter
from typing import Any

import boto3
import orjson
from werkzeug.serving import make_server

PRICES = {  # USD, us-east-1 list prices
    "lambda_request": 0.20 / 1e6,
    "lambda_gb_second_x86": 0.0000166667,
    "dynamodb_write_unit": 0.625 / 1e6,
    "dynamodb_read_unit": 0.125 / 1e6,
    "s3_put_list": 0.005 / 1000,
    "s3_get": 0.0004 / 1000,
    "sqs_request": 0.40 / 1e6,
}
MEMORY_GB = {"chunk": 1.0, "transform": 3.0, "plan": 0.5}
DYNAMO_WRITES = {"PutItem", "UpdateItem", "DeleteItem", "BatchWriteItem"}
DYNAMO_TRANSACT = {"TransactWriteItems"}
TABLES = {"crm": ["contacts", "companies", "deals"], "helpdesk": ["tickets"]}


class CountingServer:
    """moto (every service) on 127.0.0.1, one request at a time, each counted."""

    def __init__(self) -> None:
        import os

        from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app
        from tests.aws import TEST_CREDENTIALS, item_level_rollback, serialized

        for key, value in TEST_CREDENTIALS.items():
            os.environ.setdefault(key, value)
        self.counts: Counter[tuple[str, str]] = Counter()
        inner = serialized(DomainDispatcherApplication(create_backend_app))
        counts = self.counts

        def app(environ: dict[str, Any], start_response: Any) -> Any:
            counts[_operation(environ)] += 1
            return inner(environ, start_response)

        from tests.aws import _QuietHandler

        self._undo = item_level_rollback()
        self._server = make_server("127.0.0.1", 0, app, threaded=True,
                                   request_handler=_QuietHandler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self._server.server_port}"

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._undo()


def _operation(environ: dict[str, Any]) -> tuple[str, str]:
    auth = environ.get("HTTP_AUTHORIZATION", "")
    service = auth.split("Credential=", 1)[1].split("/")[3] if "Credential=" in auth else "?"
    target = environ.get("HTTP_X_AMZ_TARGET", "")
    if target:
        return service, target.rsplit(".", 1)[-1]
    method, path = environ["REQUEST_METHOD"], environ.get("PATH_INFO", "/").strip("/")
    query = environ.get("QUERY_STRING", "")
    if service == "s3":
        if method == "GET" and ("/" not in path or "list-type" in query):
            return service, "ListObjects"
        return service, {"GET": "GetObject", "PUT": "PutObject", "HEAD": "HeadObject",
                         "DELETE": "DeleteObject", "POST": "PostObject"}.get(method, method)
    return service, method


def measure(records: int) -> dict[str, Any]:
    from canonflow.aws import handlers
    from canonflow.config import Settings, SourceConfig, TenantConfig
    from canonflow.connectors.demo_api import DemoApi, serve, tenant_token

    server = CountingServer()
    try:
        endpoint = server.endpoint
        name = f"bench-{uuid.uuid4().hex[:8]}"
        s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
        s3.create_bucket(Bucket=name)
        sqs = boto3.client("sqs", endpoint_url=endpoint, region_name="us-east-1")
        chunks_url = sqs.create_queue(QueueName=f"{name}-chunks")["QueueUrl"]
        transforms_url = sqs.create_queue(QueueName=f"{name}-transforms")["QueueUrl"]
        account = chunks_url.rstrip("/").split("/")[-2]
        with serve(DemoApi(records)) as api:
            settings = Settings(
                name="bench", object_store=f"s3://{name}/data?endpoint={endpoint}",
                state_store=f"dynamodb://{name}?region=us-east-1&endpoint={endpoint}",
                dispatcher=f"sqs://sqs.us-east-1.amazonaws.com/{account}/{name}-chunks"
                           f"?transforms={name}-transforms&endpoint={endpoint}"
                           "&region=us-east-1",
                batch_records=5000,
                sources=[SourceConfig(service=svc, base_url=f"{api.base_url}/{svc}/v1",
                                      tables=tables, page_size=100, pages_per_chunk=50)
                         for svc, tables in TABLES.items()],
                tenants=[TenantConfig.model_validate({"tenant_id": "acme", "credentials": {
                    svc: {"token": tenant_token("acme")} for svc in TABLES}})])
            c = handlers.configure(settings)
            c.rt.state.upgrade()  # the stack creates the table: not counted
            server.counts.clear()
            invocations: Counter[str] = Counter()
            seconds: Counter[str] = Counter()
            ctx = _Context()

            def invoke(kind: str, fn: Any, event: dict[str, Any]) -> dict[str, Any]:
                started = time.perf_counter()
                out: dict[str, Any] = fn(event, ctx)
                seconds[kind] += time.perf_counter() - started
                invocations[kind] += 1
                return out

            (job_id,) = invoke("plan", handlers.plan, {})["jobs"]
            while True:
                moved = False
                for kind, url, fn, batch in (("chunk", chunks_url, handlers.chunk, 5),
                                             ("transform", transforms_url, handlers.transform,
                                              1)):
                    got = sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=batch,
                                              WaitTimeSeconds=0,
                                              AttributeNames=["All"]).get("Messages", [])
                    if not got:
                        continue
                    moved = True
                    out = invoke(kind, fn, _sqs_event(got))
                    failed = {f["itemIdentifier"] for f in out.get("batchItemFailures", [])}
                    for m in got:
                        if m["MessageId"] not in failed:
                            sqs.delete_message(QueueUrl=url, ReceiptHandle=m["ReceiptHandle"])
                job = c.rt.state.job(job_id)
                if job is not None and job.status == "done":
                    break
                if not moved:
                    time.sleep(0.2)
            extracted = sum(r.records_processed for r in c.rt.state.chunk_results(job_id))
            handlers.reset()
    finally:
        server.stop()
    return _costs(extracted, dict(server.counts), dict(invocations), dict(seconds))


class _Context:
    def get_remaining_time_in_millis(self) -> int:
        return 900_000


def _sqs_event(messages: list[dict[str, Any]]) -> dict[str, Any]:
    return {"Records": [{
        "messageId": m["MessageId"], "receiptHandle": m["ReceiptHandle"], "body": m["Body"],
        "attributes": {"ApproximateReceiveCount": m["Attributes"]["ApproximateReceiveCount"]},
        "messageAttributes": {}, "md5OfBody": m["MD5OfBody"], "eventSource": "aws:sqs",
        "eventSourceARN": "arn:aws:sqs:us-east-1:123456789012:bench",
        "awsRegion": "us-east-1"} for m in messages]}


def _costs(records: int, counts: dict[tuple[str, str], int], invocations: dict[str, int],
           seconds: dict[str, float]) -> dict[str, Any]:
    per_million = 1e6 / records
    by_service: Counter[str] = Counter()
    for (service, _), n in counts.items():
        by_service[service] += n
    dyn_writes = sum(n for (s, op), n in counts.items() if s == "dynamodb"
                     and op in DYNAMO_WRITES) + 2 * sum(
        n for (s, op), n in counts.items() if s == "dynamodb" and op in DYNAMO_TRANSACT)
    dyn_reads = sum(n for (s, op), n in counts.items() if s == "dynamodb"
                    and op not in DYNAMO_WRITES | DYNAMO_TRANSACT)
    s3_put = sum(n for (s, op), n in counts.items() if s == "s3"
                 and op in ("PutObject", "ListObjects", "PostObject", "DeleteObject"))
    s3_get = sum(n for (s, op), n in counts.items() if s == "s3"
                 and op in ("GetObject", "HeadObject"))
    # SQS: the dispatch's sends plus Lambda's polling (a receive and a delete per message)
    sqs_requests = by_service["sqs"]
    gb_seconds = sum(seconds[k] * MEMORY_GB[k] for k in seconds)
    cost = {
        "lambda_requests": sum(invocations.values()) * PRICES["lambda_request"],
        "lambda_compute_estimate": gb_seconds * PRICES["lambda_gb_second_x86"],
        "dynamodb": dyn_writes * PRICES["dynamodb_write_unit"]
        + dyn_reads * PRICES["dynamodb_read_unit"],
        "s3": s3_put * PRICES["s3_put_list"] + s3_get * PRICES["s3_get"],
        "sqs": sqs_requests * PRICES["sqs_request"],
    }
    return {
        "records": records,
        "invocations": invocations,
        "invocation_seconds": {k: round(v, 2) for k, v in seconds.items()},
        "requests": {f"{s}:{op}": n for (s, op), n in sorted(counts.items())},
        "per_million_records": {
            "invocations": round(sum(invocations.values()) * per_million),
            "dynamodb_write_units": round(dyn_writes * per_million),
            "dynamodb_read_requests": round(dyn_reads * per_million),
            "s3_put_list": round(s3_put * per_million),
            "s3_get": round(s3_get * per_million),
            "sqs_requests": round(sqs_requests * per_million),
            "usd": {k: round(v * per_million, 4) for k, v in cost.items()},
            "usd_total": round(sum(cost.values()) * per_million, 4),
        },
        "prices": PRICES,
    }


def main() -> None:
    import os

    os.environ.setdefault("POWERTOOLS_METRICS_DISABLED", "true")  # no EMF lines here
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=20_000,
                        help="records per table (4 tables)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    result = measure(args.records)
    if args.json:
        print(orjson.dumps(result).decode())
        return
    from rich.table import Table

    from canonflow import render

    console = render.console()
    table = Table(title=f"AWS requests for {result['records']:,} records, per million records")
    table.add_column("what")
    table.add_column("per million records", justify="right")
    for key, value in result["per_million_records"].items():
        if key == "usd":
            for what, usd in value.items():
                table.add_row(f"USD {what}", f"{usd:.4f}")
        else:
            table.add_row(key, f"{value:,}" if isinstance(value, int) else f"{value:.4f}")
    console.print(table)
    console.print({"invocations": result["invocations"], "requests": result["requests"]})


if __name__ == "__main__":
    main()
