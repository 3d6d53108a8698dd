"""The floor: the same pages fetched and written by the plainest fast code, no coordination.

Two processes (one per core), each with a keep-alive httpx client, fetch page ranges, parse
with orjson and write each batch as a Parquet file. Run as ``python -m bench.floor CONFIG``.
"""

from __future__ import annotations

import math
import resource
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import orjson
import pyarrow as pa
import pyarrow.parquet as pq

from canonflow.connectors.demo_api import tenant_token

SHAPES = {"crm": ("results", "per_page"), "helpdesk": ("data", "limit")}


def _fetch_range(job: tuple[str, str, str, str, int, int, int, str]) -> int:
    base, tenant, service, table, first, last, page_size, out = job
    records_key, size_param = SHAPES[service]
    n = 0
    rows: list[dict[str, Any]] = []
    part = 0
    with httpx.Client(base_url=f"{base}/{service}/v1",
                      headers={"Authorization": f"Bearer {tenant_token(tenant)}"}) as client:
        for page in range(first, last + 1):
            body = client.get(f"/{table}", params={"page": page, size_param: page_size}).content
            rows.extend(orjson.loads(body)[records_key])
        if rows:
            Path(out).mkdir(parents=True, exist_ok=True)
            pq.write_table(pa.Table.from_pylist(rows), f"{out}/part-{first:06d}-{part}.parquet")
            n = len(rows)
    return n


def main(cfg: dict[str, Any]) -> dict[str, Any]:
    jobs = []
    for tenant in cfg["tenants"]:
        for service, tables in cfg["tables"].items():
            for table in tables:
                pages = math.ceil(cfg["records_per_table"] / cfg["page_size"])
                for first in range(1, pages + 1, cfg["pages_per_chunk"]):
                    last = min(first + cfg["pages_per_chunk"] - 1, pages)
                    jobs.append((cfg["base_url"], tenant, service, table, first, last,
                                 cfg["page_size"], f"{cfg['root']}/{tenant}/{service}/{table}"))
    started = time.perf_counter()
    with ProcessPoolExecutor(max_workers=cfg.get("workers", 2)) as pool:
        records = sum(pool.map(_fetch_range, jobs))
    wall = time.perf_counter() - started
    return {"wall_s": wall, "records": records,
            "peak_rss_mb": max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                               resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss) / 1024}


if __name__ == "__main__":
    print(orjson.dumps(main(orjson.loads(sys.argv[1]))).decode(), flush=True)
