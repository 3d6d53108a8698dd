"""A sequential chunk killed mid-way resumes from its checkpoint instead of restarting."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import orjson

from canonflow.chunk import process_chunk
from canonflow.config import Settings, SourceConfig, TenantConfig
from canonflow.connectors.demo_api import DemoApi, serve, tenant_token
from canonflow.model import ChunkSpec, TableRef
from canonflow.runtime import Runtime
from canonflow.transform.reader import decompress

CHILD = """
import sys
from canonflow.config import Settings
from canonflow.chunk import process_chunk
from canonflow.model import ChunkSpec
from canonflow.runtime import Runtime
rt = Runtime(Settings.model_validate_json(sys.argv[1]))
process_chunk(ChunkSpec.model_validate_json(sys.argv[2]), rt)
"""


def test_a_killed_sequential_chunk_resumes_from_its_checkpoint(tmp_path: Path) -> None:
    api = DemoApi(2000, page_delay=0.1)  # 20 pages of 100: about 2 s for the whole table
    with serve(api) as server:
        settings = Settings(
            object_store=f"file://{tmp_path}/data",
            state_store=f"sqlite:///{tmp_path}/data/state.db", batch_records=200,
            sources=[SourceConfig(service="billing", base_url=f"{server.base_url}/billing/v1",
                                  tables=["invoices"], page_size=100)],
            tenants=[TenantConfig.model_validate(
                {"tenant_id": "acme",
                 "credentials": {"billing": {"token": tenant_token("acme")}}})])
        spec = ChunkSpec(job_id="job-r", chunk_id="billing-invoices-00000",
                         table=TableRef(tenant_id="acme", service_name="billing",
                                        table_name="invoices"),
                         start_page=1, end_page=None, page_size=100, batch_records=200)
        rt = Runtime(settings)
        rt.state.create_job("job-r", "acme", "t", "aggregated", [spec])
        child = subprocess.Popen([sys.executable, "-c", CHILD, settings.to_worker_json(),
                                  spec.model_dump_json()])
        deadline = time.monotonic() + 30
        while (ckpt := rt.state.load_checkpoint("job-r", spec.chunk_id)) is None \
                or ckpt["records"] < 600:
            assert time.monotonic() < deadline and child.poll() is None
            time.sleep(0.02)
        os.kill(child.pid, signal.SIGKILL)  # mid-way through the table
        child.wait()
        ckpt = rt.state.load_checkpoint("job-r", spec.chunk_id)
        assert ckpt is not None and 600 <= ckpt["records"] < 2000
        before = api.faults.requests
        result = process_chunk(spec, rt)  # the retry
        fetched_again = api.faults.requests - before
    assert result.completed and result.records_processed == 2000
    assert fetched_again == 20 - ckpt["records"] // 100  # only the pages after the checkpoint
    ids: list[str] = []
    for key in result.s3_files_written:
        data = decompress(rt.objects.get(key), key)
        ids += [orjson.loads(line)["id"] for line in data.splitlines() if line.strip()]
    assert len(ids) == len(set(ids)) == 2000  # nothing lost, nothing twice
    assert result.s3_files_written == sorted(result.s3_files_written)
