"""One canonflow sync in a child process: phases timed, peak memory measured.

Run as ``python -m bench.e2e CONFIG_JSON``; prints one JSON line of metrics.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

from canonflow import jsonio
from canonflow.config import Settings, SourceConfig, TenantConfig
from canonflow.connectors.demo_api import tenant_token
from canonflow.dispatch import open_dispatcher
from canonflow.model import ChunkSpec, TransformRequest
from canonflow.plan import JobPlan
from canonflow.query import existing_tables, run_query
from canonflow.report import job_report, totals
from canonflow.runner import JobRunner
from canonflow.runtime import Runtime

TABLES = {"crm": ["contacts", "companies", "deals"], "helpdesk": ["tickets", "users"]}


class PhaseClock:
    """Progress sink that notes when extraction and transforms end."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.chunks_left = 0
        self.extract_end = 0.0
        self.transform_end = 0.0
        self.first_transform = 0.0
        self.planned_any = False

    def planned(self, plans: list[JobPlan]) -> None:  # once per job, as each is planned
        if not self.planned_any:
            self.start, self.planned_any = time.perf_counter(), True
        self.chunks_left += sum(len(p.chunks) for p in plans)

    def chunk_done(self, spec: ChunkSpec, result: dict[str, Any]) -> None:
        self.chunks_left -= 1
        if self.chunks_left == 0:
            self.extract_end = time.perf_counter()

    def transform_submitted(self, request: TransformRequest) -> None:
        if not self.first_transform:
            self.first_transform = time.perf_counter()

    def transform_done(self, request: TransformRequest) -> None:
        self.transform_end = time.perf_counter()


def descendants(root: int) -> list[int]:
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parents[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    found, frontier = [], [root]
    while frontier:
        pid = frontier.pop()
        kids = [p for p, pp in parents.items() if pp == pid]
        found += kids
        frontier += kids
    return found


def cpu_seconds(pid: int) -> float:
    """User + system CPU a live process has used, all its threads (0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def command_line(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def peak_rss_mb(pids: list[int]) -> float:
    """Largest peak resident set (VmHWM) among these processes, in MB."""
    peak = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        peak = max(peak, int(line.split()[1]))
        except OSError:
            continue
    return peak / 1024


def settings_for(cfg: dict[str, Any]) -> Settings:
    base = cfg["base_url"]
    tables = cfg.get("tables", TABLES)
    return Settings(
        name="bench", object_store=f"file://{cfg['root']}",
        state_store=f"sqlite:///{cfg['root']}/state.db",
        dispatcher=f"local://?workers={cfg.get('workers', 2)}",
        trigger_mode=cfg.get("trigger_mode", "aggregated"),
        batch_records=cfg.get("batch_records", 5000),
        transform_group_records=cfg.get("group_records", 150_000),
        sources=[SourceConfig(service=svc, base_url=f"{base}/{svc}/v1", tables=tbls,
                              page_size=cfg.get("page_size", 1000),
                              pages_per_chunk=cfg.get("pages_per_chunk", 10))
                 for svc, tbls in tables.items()],
        tenants=[TenantConfig.model_validate({"tenant_id": t, "credentials": {
            svc: {"token": tenant_token(t)} for svc in tables}}) for t in cfg["tenants"]],
    )


def run_query_tables(store: object) -> list[str]:
    return [name for name in existing_tables(store) if name != "quarantine"]  # type: ignore[arg-type]


def main(cfg: dict[str, Any]) -> dict[str, Any]:
    settings = settings_for(cfg)
    rt = Runtime(settings)
    rt.warm_up()  # process start, as the workers' (and the floor's imports): not timed
    dispatcher = open_dispatcher(settings.dispatcher, settings)
    clock = PhaseClock()
    started = time.perf_counter()
    try:
        job_ids = JobRunner(settings, rt, dispatcher, clock).run()
        peak = peak_rss_mb([os.getpid(), *descendants(os.getpid())])  # workers still alive
    finally:
        dispatcher.close()
    wall = time.perf_counter() - started
    reports = [job_report(rt.state, j) for j in job_ids]
    store = rt.canonical._store
    canonical_rows = 0
    for entity in run_query_tables(store):
        _, rows = run_query(store, f"SELECT count(*) FROM {entity}")
        canonical_rows += int(rows[0][0])
    sums = [totals(r) for r in reports]
    agg = {k: sum(s[k] for s in sums) for k in sums[0]}
    statuses = sorted({f"{r['status']}/{r['outcome']}" for r in reports})
    return {
        "wall_s": wall,
        "plan_s": clock.start - started,
        "extract_s": clock.extract_end - clock.start,
        "transform_s": clock.transform_end - clock.extract_end if clock.transform_end else 0.0,
        "peak_rss_mb": peak,
        "statuses": statuses,
        "transforms": sum(len(r["transforms"]) for r in reports),
        "canonical_rows": canonical_rows,
        **agg,
    }


if __name__ == "__main__":
    print(jsonio.dumps_str(main(jsonio.loads(sys.argv[1]))), flush=True)
