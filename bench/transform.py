"""The canonical transform alone: raw JSON Lines batch files → canonical Delta table.

``python -m bench.transform CONFIG``: writes ``records`` demo contacts as batch files of
``batch_records`` (not timed), then times one file-specific transform of all of them in this
process and reports records/s and peak RSS.
"""

from __future__ import annotations

import resource
import sys
import time
from typing import Any

import orjson

from canonflow import memory
from canonflow.chunk import encode_batch
from canonflow.config import Settings
from canonflow.connectors.demo_api import contact
from canonflow.model import TableRef, TransformRequest, raw_key
from canonflow.runtime import Runtime
from canonflow.transform.run import run_transform


def main(cfg: dict[str, Any]) -> dict[str, Any]:
    memory.tune()  # as canonflow's own processes do
    root, records, batch = cfg["root"], cfg["records"], cfg.get("batch_records", 5000)
    rt = Runtime(Settings(object_store=f"file://{root}",
                          state_store=f"sqlite:///{root}/state.db",
                          transform_group_records=cfg.get("group_records", 150_000)))
    table = TableRef(tenant_id="acme", service_name="crm", table_name="contacts")
    files = []
    for part, start in enumerate(range(0, records, batch)):
        lines = [orjson.dumps(contact("acme", i)) for i in range(start, min(start + batch,
                                                                           records))]
        key = raw_key(table, "job-bench", "crm-contacts-00000", part)
        rt.objects.put(key, encode_batch(lines))
        files.append(key)
    rt.warm_up()
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    started = time.perf_counter()
    result = run_transform(TransformRequest(
        tenant_id="acme", service_name="crm", table_name="contacts", source_files=files), rt)
    seconds = time.perf_counter() - started
    return {
        "records": records, "files": len(files), "seconds": seconds,
        "records_per_s": records / seconds, "written": result.records_written,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "rss_before_mb": baseline,
    }


if __name__ == "__main__":
    print(orjson.dumps(main(orjson.loads(sys.argv[1]))).decode(), flush=True)
