"""``python -m bench [--quick] [--write docs/BENCHMARKS.md]``: every scenario, one table each.

Scenarios (each run in its own process tree, the demo API in a separate process):
  1. trigger modes — the same job with ``per_batch`` (legacy) and ``aggregated`` triggering
  2. throughput — one tenant, 4 tables of 50k / 200k / 500k records: end-to-end records/s,
     extraction and transform apart
  3. scaling — coordination cost per chunk at 10, 100, 1000 chunks for the same data
     (3b: the same on DynamoDB, requests per completion and per aggregation)
  4. floor — the same pages fetched and written by plain concurrent code (beside 2)
  5. transform — the canonical transform alone on 1M raw records: records/s, peak RSS
  6. history — 10,000 changed records into a tenant holding 1M rows vs into an empty table
  7. syncs — 1,000 incremental syncs of one tenant: files, log, read time, vacuum
  8. many tenants — 1,000 small tenants (7 tables x 100 records) through the whole pipeline,
     on the embedded default and on PostgreSQL + Redis + a Celery worker
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
from rich.table import Table

from bench.coordination import run as coordination_run
from bench.coordination import run_dynamodb
from bench.server import demo_api
from canonflow import render

FOUR_TABLES = {"crm": ["contacts", "companies", "deals"], "helpdesk": ["tickets"]}
console = render.console()  # CI logs get whole tables, not 80 columns


def child(module: str, cfg: dict[str, Any]) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, "-m", module, orjson.dumps(cfg).decode()],
                          capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"{module} failed:\n{proc.stderr[-3000:]}")
    result: dict[str, Any] = orjson.loads(proc.stdout.strip().splitlines()[-1])
    return result


def machine() -> str:
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (f"{os.cpu_count()} cores ({model}), {mem:.0f} GiB RAM, "
            f"Python {platform.python_version()}, {platform.system()} {platform.release()}")


def trigger_modes(work: Path, quick: bool) -> tuple[Table, list[dict[str, Any]]]:
    batch, chunks = (50, 5) if quick else (500, 10)
    per_table = chunks * 5 * batch  # chunks x 5 batches per table
    rows = []
    with demo_api(per_table, ["acme"], batch) as url:
        for mode in ("per_batch", "aggregated"):
            root = work / f"modes-{mode}"
            r = child("bench.e2e", {
                "base_url": url, "root": str(root), "tenants": ["acme"],
                "tables": FOUR_TABLES, "trigger_mode": mode, "batch_records": batch,
                "page_size": batch, "pages_per_chunk": 5})
            r["mode"] = mode
            rows.append(r)
            shutil.rmtree(root, ignore_errors=True)
    table = Table(
        title=f"1. trigger modes: 4 tables x {chunks} chunks x 5 batches of {batch} records")
    for col in ("mode", "transforms", "records extracted", "records read by transforms",
                "read / extracted", "wall s", "canonical rows"):
        table.add_column(col, justify="left" if col == "mode" else "right")
    for r in rows:
        table.add_row(r["mode"], str(r["transforms"]), f"{r['records_extracted']:,}",
                      f"{r['records_read']:,}",
                      f"{r['records_read'] / r['records_extracted']:.2f}",
                      f"{r['wall_s']:.1f}", f"{r['canonical_rows']:,}")
    return table, rows


def throughput(work: Path, quick: bool) -> tuple[Table, list[dict[str, Any]]]:
    per_table_sizes = [10_000, 50_000] if quick else [50_000, 200_000, 500_000]
    rows = []
    for per_table in per_table_sizes:
        size = per_table * 4
        with demo_api(per_table, ["acme"], 1000) as url:
            base = {"base_url": url, "tenants": ["acme"], "tables": FOUR_TABLES,
                    "records_per_table": per_table, "page_size": 1000, "pages_per_chunk": 10}
            floor = child("bench.floor", {**base, "root": str(work / "floor")})
            e2e = child("bench.e2e", {**base, "root": str(work / "e2e")})
            shutil.rmtree(work / "floor", ignore_errors=True)
            shutil.rmtree(work / "e2e", ignore_errors=True)
        rows.append({"records": size, "per_table": per_table, "floor": floor, "e2e": e2e})
    table = Table(title="2+4. throughput: canonflow end to end vs the floor client "
                  "(one tenant, 4 tables)")
    for col in ("records", "floor rec/s", "canonflow rec/s", "x floor", "extract rec/s",
                "transform rec/s", "wall s", "peak RSS MB", "floor RSS MB"):
        table.add_column(col, justify="right")
    for r in rows:
        e, f, n = r["e2e"], r["floor"], r["records"]
        table.add_row(
            f"4 x {r['per_table']:,}", f"{n / f['wall_s']:,.0f}", f"{n / e['wall_s']:,.0f}",
            f"{f['wall_s'] / e['wall_s']:.2f}", f"{n / e['extract_s']:,.0f}",
            f"{n / e['transform_s']:,.0f}", f"{e['wall_s']:.1f}", f"{e['peak_rss_mb']:.0f}",
            f"{f['peak_rss_mb']:.0f}")
    return table, rows


def scaling(quick: bool) -> tuple[Table, list[dict[str, Any]]]:
    counts = [10, 100, 300] if quick else [10, 100, 1000]
    rows = [coordination_run(n) for n in counts]
    table = Table(title="3. scaling: coordination cost per chunk, same data (1,000 files)")
    for col in ("chunks", "claims", "transform requests", "completion ms/chunk",
                "statements/chunk", "aggregation ms", "aggregation ms/chunk"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(str(r["chunks"]), str(r["claims"]), str(r["transform_requests"]),
                      f"{r['completion_ms_per_chunk']:.2f}", f"{r['statements_per_chunk']:.1f}",
                      f"{r['aggregation_ms']:.1f}", f"{r['aggregation_ms_per_chunk']:.3f}")
    return table, rows


def scaling_dynamodb(quick: bool) -> tuple[Table, list[dict[str, Any]]]:
    """The scaling job on DynamoDB, against moto (behind one lock) on 127.0.0.1: request
    counts are what DynamoDB would receive; the milliseconds are moto's, not AWS's."""
    from tests.aws import LockedDynamoServer

    counts = [10, 100, 300] if quick else [10, 100, 1000]
    server = LockedDynamoServer().start()
    try:
        rows = [run_dynamodb(n, server.endpoint) for n in counts]
    finally:
        server.stop()
    table = Table(title="3b. scaling on DynamoDB: requests per chunk completion and per "
                        "aggregation, same data (1,000 files)")
    for col in ("chunks", "claims", "transform requests", "requests/completion",
                "writes/completion", "max writes/completion", "aggregation requests",
                "aggregation writes", "ms/completion (moto)"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(str(r["chunks"]), str(r["claims"]), str(r["transform_requests"]),
                      f"{r['requests_per_completion']:.2f}", f"{r['writes_per_completion']:.2f}",
                      str(r["most_writes_one_completion"]), str(r["aggregation_requests"]),
                      str(r["aggregation_writes"]), f"{r['completion_ms_per_chunk']:.2f}")
    return table, rows


def transform_alone(work: Path, quick: bool) -> tuple[Table, list[dict[str, Any]]]:
    sizes = [100_000] if quick else [200_000, 1_000_000]
    rows = []
    for size in sizes:
        rows.append(child("bench.transform", {"root": str(work / f"tx-{size}"),
                                              "records": size}))
        shutil.rmtree(work / f"tx-{size}", ignore_errors=True)
    table = Table(title="5. transform alone: raw JSON Lines (zstd) -> canonical Delta, "
                  "one table, one process")
    for col in ("raw records", "files", "seconds", "records/s", "peak RSS MB"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(f"{r['records']:,}", str(r["files"]), f"{r['seconds']:.1f}",
                      f"{r['records_per_s']:,.0f}", f"{r['peak_rss_mb']:.0f}")
    return table, rows


def history(work: Path, quick: bool) -> tuple[Table, list[dict[str, Any]]]:
    sizes = [(100_000, 1_000)] if quick else [(100_000, 1_000), (1_000_000, 10_000)]
    rows = []
    for held, changed in sizes:
        for writes in ("copy_on_write", "merge_on_read"):
            rows.append(child("bench.history", {"root": str(work / f"history-{held}"),
                                                "history": held, "changed": changed,
                                                "writes": writes}))
            shutil.rmtree(work / f"history-{held}", ignore_errors=True)
    table = Table(title="6. history: an incremental transform (1% of the keys changed, "
                  "spread across the partition) vs the same records into an empty table")
    table.add_column("canonical_writes")
    for col in ("rows held", "changed", "seconds", "empty table s", "x empty",
                "MB written", "empty MB", "x empty ", "files after", "compact s"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(
            r["writes"], f"{r['history']:,}", f"{r['changed']:,}",
            f"{r['incremental_seconds']:.2f}",
            f"{r['empty_seconds']:.2f}", f"{r['incremental_seconds'] / r['empty_seconds']:.1f}",
            f"{r['incremental_bytes'] / 1e6:.1f}", f"{r['empty_bytes'] / 1e6:.2f}",
            f"{r['incremental_bytes'] / max(1, r['empty_bytes']):.0f}",
            str(r["incremental_files"]), f"{r['compact_seconds']:.2f}")
    return table, rows


def syncs(quick: bool) -> tuple[Table, list[dict[str, Any]]]:
    held, count = (20_000, 50) if quick else (50_000, 1000)
    rows = [child("bench.syncs", {"held": held, "syncs": count, "writes": writes})
            for writes in ("copy_on_write", "merge_on_read")]
    table = Table(title="7. syncs: one tenant synced again and again (1% of the keys changed "
                  "and 10 new each time), then vacuumed")
    table.add_column("canonical_writes")
    for col in ("rows held", "syncs", "s/sync", "most files in the partition",
                "read s", "fresh read s", "x fresh", "data files on disk",
                "after vacuum", "log files after"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(r["writes"], f"{r['held']:,}", f"{r['syncs']:,}",
                      f"{r['sync_seconds']:.2f}",
                      str(r["most_files"]), f"{r['read_seconds']:.3f}",
                      f"{r['fresh_read_seconds']:.3f}",
                      f"{r['read_seconds'] / r['fresh_read_seconds']:.2f}",
                      str(r["files_on_disk"]), str(r["files_after_vacuum"]),
                      str(r["log_files"]))
    return table, rows


def tenants(work: Path, quick: bool) -> tuple[Table, list[dict[str, Any]]]:
    count = 10 if quick else 1000
    rows = []
    for engine in ("local", "celery"):
        try:
            rows.append(child("bench.tenants", {"root": str(work / f"tenants-{engine}"),
                                                "tenants": count, "records": 100,
                                                "engine": engine}))
        except RuntimeError as exc:  # PostgreSQL or Redis not reachable: said, not hidden
            console.print(f"8. many tenants on {engine}: skipped: "
                          f"{str(exc).strip().splitlines()[-1]}")
        shutil.rmtree(work / f"tenants-{engine}", ignore_errors=True)
    table = Table(title="8. many tenants: demo tenants x 7 tables x 100 records, the whole "
                  "pipeline (local: SQLite + local://?workers=2; celery: PostgreSQL + Redis + "
                  "one worker, concurrency 2)")
    table.add_column("engine")
    for col in ("tenants", "records", "seconds", "records/s", "ms a tenant job",
                "CPU s (workers / runner / API)", "transforms / tables", "read / extracted",
                "contact rows = distinct"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(r["engine"], f"{r['tenants']:,}", f"{r['records_extracted']:,}",
                      f"{r['seconds']:.1f}", f"{r['records_per_s']:,.0f}",
                      f"{r['ms_per_tenant']:.0f}",
                      " / ".join(f"{r['cpu_s'][k]:.0f}" for k in ("workers", "runner", "api")),
                      f"{r['transforms_triggered']:,} / {r['tables']:,}",
                      f"{r['records_read'] / max(1, r['records_extracted']):.2f}",
                      str(r["contact_rows"] == r["distinct_contacts"]))
    return table, rows


def markdown(table: Table) -> str:
    headers = [str(c.header) for c in table.columns]
    cells = [[str(x) for x in c._cells] for c in table.columns]
    lines = [f"**{table.title}**", "", "| " + " | ".join(headers) + " |",
             "|" + "---|" * len(headers)]
    for i in range(len(cells[0]) if cells else 0):
        lines.append("| " + " | ".join(col[i] for col in cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes, under a minute")
    parser.add_argument("--write", type=Path, help="write the tables as Markdown to this file")
    args = parser.parse_args()
    started = time.perf_counter()
    console.print(f"machine: {machine()}")
    tables = []
    with tempfile.TemporaryDirectory(prefix="canonflow-bench-") as tmp:
        work = Path(tmp)
        for name, build in (("trigger modes", lambda: trigger_modes(work, args.quick)),
                            ("throughput", lambda: throughput(work, args.quick)),
                            ("scaling", lambda: scaling(args.quick)),
                            ("scaling on DynamoDB", lambda: scaling_dynamodb(args.quick)),
                            ("transform", lambda: transform_alone(work, args.quick)),
                            ("history", lambda: history(work, args.quick)),
                            ("syncs", lambda: syncs(args.quick)),
                            ("many tenants", lambda: tenants(work, args.quick))):
            with console.status(f"running {name} ..."):
                table, _ = build()
            console.print(table)
            tables.append(table)
    seconds = time.perf_counter() - started
    console.print(f"all scenarios in {seconds:.0f} s")
    if args.write:
        write_results(args.write, tables, seconds, args.quick)


BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"


def write_results(path: Path, tables: list[Table], seconds: float, quick: bool) -> None:
    """Replace the generated block of ``path`` (between the bench markers), keeping the
    hand-written analysis around it."""
    stamp = datetime.now(UTC).strftime("%Y-%m-%d")
    block = "\n".join([
        BEGIN,
        f"Generated by `python -m bench{' --quick' if quick else ''}` on {stamp}.",
        f"Machine: {machine()}. All scenarios took {seconds:.0f} s.",
        "", "\n\n".join(markdown(t) for t in tables), END])
    text = path.read_text() if path.exists() else f"# Benchmarks\n\n{BEGIN}\n{END}\n"
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        text = head + block + rest.split(END, 1)[1]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text)


if __name__ == "__main__":
    main()
