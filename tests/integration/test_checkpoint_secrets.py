"""Checkpoints hold no secret, and a chunk resumed from one still authenticates."""

from __future__ import annotations

from pathlib import Path

import orjson

from canonflow.chunk import process_chunk
from canonflow.config import Settings, SourceConfig, TenantConfig
from canonflow.model import ChunkSpec, TableRef
from canonflow.runtime import Runtime
from canonflow.transform.reader import decompress
from tests.secret_api import KEYED_SPEC, SecretApi, serve_secret_api

KEY = "CheckpointKey-5a7e"


def test_a_checkpointed_next_url_drops_the_key_and_the_resume_restores_it(
        tmp_path: Path) -> None:
    spec_file = tmp_path / "keyed.yaml"
    spec_file.write_text(KEYED_SPEC.format(service="keyed"))
    api = SecretApi(token="unused-token", api_key=KEY, username="u", password="unused-pw",
                    records=35, drop={("keyed", 3): -1})
    with serve_secret_api(api) as server:
        settings = Settings(
            object_store=f"file://{tmp_path}/data",
            state_store=f"sqlite:///{tmp_path}/data/state.db", batch_records=10,
            sources=[SourceConfig(service="keyed", spec=str(spec_file),
                                  base_url=f"{server.base_url}/keyed")],
            tenants=[TenantConfig.model_validate(
                {"tenant_id": "acme", "credentials": {"keyed": {"key": KEY}}})])
        spec = ChunkSpec(job_id="job-k", chunk_id="keyed-items-00000",
                         table=TableRef(tenant_id="acme", service_name="keyed",
                                        table_name="items"),
                         start_page=1, end_page=None, page_size=10, batch_records=10)
        rt = Runtime(settings)
        rt.state.create_job("job-k", "acme", "t", "aggregated", [spec])
        failed = process_chunk(spec, rt)  # page 3's connection drops, every retry
        assert not failed.completed and failed.error is not None
        assert failed.error.type == "HttpRetryable" and "after=20" in failed.error.message
        assert KEY not in failed.model_dump_json()
        ckpt = rt.state.load_checkpoint("job-k", spec.chunk_id)
        assert ckpt is not None and ckpt["records"] == 20
        assert KEY not in orjson.dumps(ckpt).decode()
        assert "after=20" in ckpt["next"]["url"]
        api.drop.clear()  # the API is back
        served = len(api.requests)
        result = process_chunk(spec, rt)  # the retry resumes from the checkpoint
        resumed = api.requests[served:]
        rt.close()
    assert result.completed and result.records_processed == 35
    assert len(resumed) == 2 and "after=20" in resumed[0]  # pages 3 and 4 only
    assert f"api_key={KEY}" in resumed[0]  # the client's own key, put back by its auth
    ids = []
    for key in result.s3_files_written:
        data = decompress(rt.objects.get(key), key)
        ids += [orjson.loads(line)["id"] for line in data.splitlines() if line.strip()]
    assert len(ids) == len(set(ids)) == 35
