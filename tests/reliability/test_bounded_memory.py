"""Memory stays bounded by batch size, not table size: the same job at 20k and 80k records
(4x) must peak at about the same resident memory. Both sizes run several transform groups,
so allocator warm-up is the same and only data-proportional growth shows."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

CHILD = textwrap.dedent("""
    import json, resource, sys
    from canonflow.config import Settings, SourceConfig, TenantConfig
    from canonflow.connectors.demo_api import DemoApi, serve, tenant_token
    from canonflow.dispatch import open_dispatcher
    from canonflow.report import job_report
    from canonflow.runner import JobRunner
    from canonflow.runtime import Runtime

    records, root = int(sys.argv[1]), sys.argv[2]
    with serve(DemoApi(records, cache_pages=0)) as server:  # its cache is not canonflow's
        settings = Settings(
            object_store=f"file://{root}", state_store=f"sqlite:///{root}/state.db",
            dispatcher="inline://", batch_records=1000, transform_group_records=4000,
            sources=[SourceConfig(service="crm", base_url=server.base_url + "/crm/v1",
                                  tables=["contacts"], page_size=500, pages_per_chunk=1000)],
            tenants=[TenantConfig.model_validate(
                {"tenant_id": "acme", "credentials": {"crm": {"token": tenant_token("acme")}}})],
        )
        rt = Runtime(settings)
        (job,) = JobRunner(settings, rt, open_dispatcher("inline://", settings)).run()
        rep = job_report(rt.state, job)
    print(json.dumps({"rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "canonical": rep["tables"]["acme/crm.contacts"]["records_canonical"]}))
""")


def peak(records: int, root: Path) -> dict[str, float]:
    out = subprocess.run([sys.executable, "-c", CHILD, str(records), str(root)],
                         capture_output=True, text=True, timeout=600, check=True)
    result: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def test_peak_memory_does_not_grow_with_table_size(tmp_path: Path) -> None:
    small = peak(20_000, tmp_path / "small")
    large = peak(80_000, tmp_path / "large")
    assert small["canonical"] == 20_000 and large["canonical"] == 80_000
    # one chunk streams 80k records through 1,000-record batches and 4,000-record groups;
    # holding the extra 60k records would add well over 60 MB (as dicts, lines and Arrow)
    growth = large["rss_mb"] - small["rss_mb"]
    print(f"peak RSS: {small['rss_mb']:.0f} MB at 20k, {large['rss_mb']:.0f} MB at 80k")
    assert growth < 40, f"peak RSS grew by {growth:.0f} MB from 20k to 80k records"
