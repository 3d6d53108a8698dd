"""The ``canonflow`` command line."""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from canonflow import jsonio, log, memory
from canonflow.config import DEFAULT_DATA, Settings, SourceConfig, TenantConfig, load_settings
from canonflow.connectors.demo_api import TABLES, DemoApi, serve, tenant_token
from canonflow.dispatch import open_dispatcher
from canonflow.errors import CanonflowError, ConfigError, UnknownJob
from canonflow.model import TransformRequest, TriggerMode
from canonflow.progress import RichProgress
from canonflow.query import run_query
from canonflow.report import job_report, totals
from canonflow.runner import JobRunner, recover
from canonflow.runtime import Runtime
from canonflow.stores import open_object_store

app = typer.Typer(
    help="Sync many tenants' SaaS data into one canonical model: parallel chunks, "
    "exactly-once canonical processing, nothing lost.",
    no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False,
)
console = Console(stderr=True)
out = Console(width=None if sys.stdout.isatty() else 120)

DEMO_SERVICES = ("crm", "helpdesk", "billing")
PipelineOpt = Annotated[Path | None, typer.Option(
    "--pipeline", "-p", help="Pipeline YAML (stores, sources, tenants).")]
DataDirOpt = Annotated[Path, typer.Option(
    "--data-dir", help="Data directory of the embedded default (used without --pipeline).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON document for machines.")]
MappingDirOpt = Annotated[list[Path] | None, typer.Option(
    "--mapping-dir", help="Extra mapping YAML folder (repeatable); wins over built-ins.")]
VerboseOpt = Annotated[bool, typer.Option("--verbose", "-v", help="JSON logs at INFO on stderr.")]


def _settings(pipeline: Path | None, data_dir: Path, mapping_dir: list[Path] | None = None,
              ) -> Settings:
    if pipeline is not None:
        return load_settings(pipeline)
    root = data_dir.resolve()
    return Settings(object_store=f"file://{root}", state_store=f"sqlite:///{root}/state.db",
                    mapping_dirs=[str(d) for d in mapping_dir or []])


def _emit_json(doc: Any) -> None:
    sys.stdout.write(jsonio.dumps_str(doc) + "\n")


def _summary(reports: list[dict[str, Any]], seconds: float) -> Table:
    jobs = ", ".join(f"{r['tenant_id']}={r['job_id']} ({r['status']}/{r['outcome']})"
                     for r in reports)
    table = Table(title=f"canonflow sync: {len(reports)} job(s) in {seconds:.1f} s",
                  caption=jobs)
    table.add_column("table", no_wrap=True)
    for col in ("chunks", "records", "files", "transforms", "canonical", "quarantined"):
        table.add_column(col, justify="right")
    for rep in reports:
        for label, t in rep["tables"].items():
            table.add_row(label, str(t["chunks"]), str(t["records_extracted"]),
                          str(t["files_written"]), str(t["transforms_triggered"]),
                          str(t["records_canonical"]), str(t["records_quarantined"]))
    sums = [totals(r) for r in reports]
    if sums:
        agg = {k: sum(s[k] for s in sums) for k in sums[0]}
        table.add_section()
        table.add_row("total", str(agg["chunks"]), str(agg["records_extracted"]),
                      str(agg["files_written"]), str(agg["transforms_triggered"]),
                      str(agg["records_canonical"]), str(agg["records_quarantined"]))
    return table


def _run_jobs(settings: Settings, tenants: list[str] | None, as_json: bool,
              full_refresh: bool = False) -> int:
    started = time.perf_counter()
    rt = Runtime(settings)
    dispatcher = open_dispatcher(settings.dispatcher, settings)
    try:
        if as_json:
            job_ids = JobRunner(settings, rt, dispatcher,
                                full_refresh=full_refresh).run(tenants)
        else:
            with RichProgress(console) as progress:
                job_ids = JobRunner(settings, rt, dispatcher, progress,
                                    full_refresh=full_refresh).run(tenants)
        reports = [job_report(rt.state, j) for j in job_ids]
    finally:
        dispatcher.close()
        rt.close()
    seconds = time.perf_counter() - started
    if as_json:
        _emit_json({"seconds": round(seconds, 3), "jobs": reports})
    else:
        out.print(_summary(reports, seconds))
    failed = [r for r in reports if r["status"] != "done" or r["outcome"] != "completed"]
    return 1 if failed else 0


@app.command()
def demo(
    tenants: Annotated[int, typer.Option(help="How many demo tenants to sync.", min=1)] = 2,
    records: Annotated[int, typer.Option(help="Records per table per tenant.", min=0)] = 2000,
    workers: Annotated[int, typer.Option(help="Worker processes.", min=1)] = 2,
    data_dir: DataDirOpt = Path(DEFAULT_DATA),
    trigger_mode: Annotated[TriggerMode, typer.Option(
        help="aggregated (one transform per table) or per_batch (legacy rollback).")
    ] = TriggerMode.AGGREGATED,
    as_json: JsonOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Start the demo SaaS API, sync demo tenants end to end, print a summary.

    Leaves canonical tables in DATA_DIR that `canonflow query` reads.
    """
    log.configure(logging.INFO if verbose else logging.WARNING)
    names = ["acme", "globex", "initech", "umbrella", "hooli", "stark"]
    tenant_ids = [names[i] if i < len(names) else f"tenant{i}" for i in range(tenants)]
    with serve(DemoApi(records)) as server:
        root = data_dir.resolve()
        settings = Settings(
            name="demo", object_store=f"file://{root}", state_store=f"sqlite:///{root}/state.db",
            dispatcher=f"local://?workers={workers}", trigger_mode=trigger_mode,
            batch_records=1000,
            sources=[SourceConfig(service=svc, base_url=f"{server.base_url}/{svc}/v1")
                     for svc in DEMO_SERVICES],
            tenants=[TenantConfig.model_validate({
                "tenant_id": t,
                "credentials": {svc: {"token": tenant_token(t)} for svc in DEMO_SERVICES}})
                for t in tenant_ids],
        )
        code = _run_jobs(settings, None, as_json)
    if not as_json:
        console.print(f'Canonical tables are in {root}/canonical; try: '
                      f'canonflow query --data-dir {data_dir} "SELECT count(*) FROM contact"')
    raise typer.Exit(code)


@app.command()
def run(
    pipeline: Annotated[Path, typer.Argument(help="Pipeline YAML.")],
    tenant: Annotated[list[str] | None, typer.Option(
        help="Sync only this tenant (repeatable).")] = None,
    full_refresh: Annotated[bool, typer.Option(
        help="Ignore incremental high-water marks: fetch every record again.")] = False,
    as_json: JsonOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Run one sync job per tenant of PIPELINE and wait for its canonical transforms.

    Tables with an incremental filter fetch only what changed since their last synced
    high-water mark, unless --full-refresh."""
    log.configure(logging.INFO if verbose else logging.WARNING)
    raise typer.Exit(_run_jobs(load_settings(pipeline), tenant or None, as_json, full_refresh))


@app.command()
def status(
    job_id: Annotated[str | None, typer.Argument(help="A job id; default: recent jobs.")] = None,
    pipeline: PipelineOpt = None,
    data_dir: DataDirOpt = Path(DEFAULT_DATA),
    as_json: JsonOpt = False,
) -> None:
    """Show a job's status, per table, or the most recent jobs."""
    rt = Runtime(_settings(pipeline, data_dir))
    try:
        if job_id is not None:
            rep = job_report(rt.state, job_id)
            if rep["status"] == "unknown":
                raise UnknownJob(f"no job {job_id!r} in {rt.settings.state_store}")
            if as_json:
                _emit_json(rep)
            else:
                out.print(_summary([rep], rep["seconds"]))
            return
        jobs = rt.state.jobs(20)
        if as_json:
            _emit_json({"jobs": [job_report(rt.state, j.job_id) for j in jobs]})
            return
        table = Table(title="recent jobs")
        for col in ("job", "tenant", "status", "outcome", "chunks", "created"):
            table.add_column(col)
        for j in jobs:
            table.add_row(j.job_id, j.tenant_id, j.status, j.outcome or "",
                          f"{j.completed_chunks}/{j.total_chunks}",
                          j.created_at.isoformat(timespec="seconds"))
        out.print(table)
    finally:
        rt.close()


@app.command()
def transform(
    tenant: Annotated[str, typer.Option(help="Tenant id.")],
    service: Annotated[str, typer.Option(help="Service name, e.g. crm.")],
    table: Annotated[str, typer.Option(help="Table name, e.g. contacts.")],
    source_file: Annotated[list[str] | None, typer.Option(
        help="Raw file key to read (repeatable): file_specific mode. "
        "Without it: time_based mode.")] = None,
    lookback_hours: Annotated[float, typer.Option(help="time_based window.")] = 72.0,
    reprocess: Annotated[bool, typer.Option(
        help="time_based: also read files already canonicalized (per the ledger).")] = False,
    pipeline: PipelineOpt = None,
    data_dir: DataDirOpt = Path(DEFAULT_DATA),
    mapping_dir: MappingDirOpt = None,
    as_json: JsonOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Run one canonical transform now (a manual trigger)."""
    log.configure(logging.INFO if verbose else logging.WARNING)
    from canonflow.transform import run_transform

    rt = Runtime(_settings(pipeline, data_dir, mapping_dir))
    try:
        request = TransformRequest(
            tenant_id=tenant, service_name=service, table_name=table,
            source_files=list(source_file) if source_file else None,
            lookback_hours=lookback_hours, reprocess=reprocess,
        )
        result = run_transform(request, rt)
    finally:
        rt.close()
    if as_json:
        _emit_json(result.model_dump(mode="json"))
    else:
        out.print(f"{result.processing_mode.value}: {result.files_read} files, "
                  f"{result.records_read} records read, {result.records_written} canonical, "
                  f"{result.records_quarantined} quarantined, {result.records_merged} merged "
                  f"in {result.seconds:.2f} s")


@app.command()
def query(
    sql: Annotated[str, typer.Argument(help='SQL, e.g. "SELECT count(*) FROM contact".')],
    pipeline: PipelineOpt = None,
    data_dir: DataDirOpt = Path(DEFAULT_DATA),
    as_json: JsonOpt = False,
    csv: Annotated[bool, typer.Option("--csv", help="Print CSV (an export).")] = False,
) -> None:
    """Query canonical tables (one per entity) and `quarantine` with DuckDB SQL."""
    settings = _settings(pipeline, data_dir)
    store = open_object_store(settings.canonical_store or settings.object_store)
    columns, rows = run_query(store, sql, settings.mapping_dirs)
    if as_json:
        _emit_json([dict(zip(columns, r, strict=True)) for r in rows])
        return
    if csv:
        import csv as csv_module

        writer = csv_module.writer(sys.stdout)
        writer.writerow(columns)
        writer.writerows(rows)
        return
    table = Table()
    for c in columns:
        table.add_column(c)
    for r in rows:
        table.add_row(*("" if v is None else str(v) for v in r))
    out.print(table)


@app.command()
def worker(
    pipeline: Annotated[Path, typer.Argument(help="Pipeline YAML (dispatcher: celery+...).")],
    concurrency: Annotated[int, typer.Option(help="Worker processes.", min=1)] = 2,
    name: Annotated[str | None, typer.Option(help="Worker node name, e.g. w1@host.")] = None,
) -> None:
    """Run a Celery worker for PIPELINE's chunk and transform tasks (one per machine)."""
    log.configure(logging.WARNING)
    settings = load_settings(pipeline)
    if not settings.dispatcher.startswith("celery+"):
        raise ConfigError(f"{pipeline}: dispatcher is {settings.dispatcher!r}; "
                          "workers serve celery+redis:// or celery+amqp:// pipelines")
    try:
        from canonflow.dispatch.celery import run_worker
    except ModuleNotFoundError as exc:
        raise ConfigError(f"canonflow worker needs {exc.name!r}: "
                          "pip install 'canonflow[celery]'") from None
    run_worker(settings, concurrency, name)


db_app = typer.Typer(help="State store schema.", no_args_is_help=True)
app.add_typer(db_app, name="db")


@db_app.command("upgrade")
def db_upgrade(pipeline: PipelineOpt = None, data_dir: DataDirOpt = Path(DEFAULT_DATA)) -> None:
    """Create or migrate the state store's tables (also done on first use)."""
    settings = _settings(pipeline, data_dir)
    rt = Runtime(settings)
    try:
        rt.state.upgrade()
    finally:
        rt.close()
    out.print(f"state store schema is current: {rt.state.url.split('@')[-1]}")


@app.command()
def entities(
    markdown: Annotated[bool, typer.Option(help="Print the Markdown reference.")] = False,
    pipeline: PipelineOpt = None,
) -> None:
    """List the canonical entities (with --markdown: the reference in docs/entities.md)."""
    from canonflow.mappings import load_catalog
    from canonflow.mappings.docs import entities_markdown

    dirs = load_settings(pipeline).mapping_dirs if pipeline else []
    catalog = load_catalog(dirs)
    if markdown:
        sys.stdout.write(entities_markdown(catalog))
        return
    table = Table(title="canonical entities")
    for col in ("entity", "primary key", "fields", "mapped from"):
        table.add_column(col)
    for name, entity in sorted(catalog.entities.items()):
        sources = [f"{s}.{t}" for (s, t), m in sorted(catalog.mappings.items())
                   if m.entity == name or any(c.entity == name for c in m.children)]
        table.add_row(name, ", ".join(entity.keys), str(len(entity.fields)),
                      ", ".join(sources))
    out.print(table)


connectors_app = typer.Typer(help="Connector specs: list the built-in ones, check your own.",
                             no_args_is_help=True)
app.add_typer(connectors_app, name="connectors")


@connectors_app.command("list")
def connectors_list(as_json: JsonOpt = False) -> None:
    """The built-in connector specs and their tables."""
    from canonflow.connectors.spec import builtin_specs

    docs = [{"service": s.service, "table": t, "pagination": ts.pagination.type,
             "chunking": ts.chunking.type, "auth": s.auth.type, "description": s.description}
            for s in builtin_specs().values() for t, ts in s.tables.items()]
    if as_json:
        _emit_json(docs)
        return
    view = Table(title="built-in connectors")
    for col in ("service", "table", "pagination", "chunking", "auth"):
        view.add_column(col)
    for d in docs:
        view.add_row(d["service"], d["table"], d["pagination"], d["chunking"], d["auth"])
    out.print(view)


@connectors_app.command("check")
def connectors_check(
    spec_file: Annotated[Path, typer.Argument(help="Connector spec YAML.")],
    probe: Annotated[str | None, typer.Option(
        help="Base URL to fetch one page of each table from.")] = None,
    credential: Annotated[list[str] | None, typer.Option(
        help="KEY=VALUE credential for the probe (repeatable), e.g. token=$TOKEN.")] = None,
    table: Annotated[list[str] | None, typer.Option(help="Probe only this table.")] = None,
) -> None:
    """Validate a spec (file, path in it, what was expected); with --probe, read one page."""
    from canonflow.connectors.rest import RestClient
    from canonflow.connectors.spec import load_spec

    spec = load_spec(spec_file)
    out.print(f"{spec_file}: valid spec for service {spec.service!r}, "
              f"tables: {', '.join(spec.tables)}")
    if probe is None:
        return
    creds = {}
    for item in credential or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--credential {key!r}: expected KEY=VALUE")
        creds[key] = value
    with RestClient(spec, creds, base_url=probe) as client:
        for name in table or list(spec.tables):
            page = next(client.pages(name, 1, 1))
            total = f", total {page.total}" if page.total is not None else ""
            out.print(f"  {name}: {len(page.records)} record(s) on the first page{total}")


quarantine_app = typer.Typer(help="Rejected records: list them, replay them.",
                             no_args_is_help=True)
app.add_typer(quarantine_app, name="quarantine")
TenantOpt = Annotated[str | None, typer.Option(help="Only this tenant.")]
ServiceOpt = Annotated[str | None, typer.Option(help="Only this service.")]
TableOpt = Annotated[str | None, typer.Option(help="Only this source table.")]


@quarantine_app.command("list")
def quarantine_list(
    tenant: TenantOpt = None, service: ServiceOpt = None, table: TableOpt = None,
    records: Annotated[bool, typer.Option(help="Show each record, not counts.")] = False,
    limit: Annotated[int, typer.Option(help="At most this many records.", min=1)] = 50,
    pipeline: PipelineOpt = None, data_dir: DataDirOpt = Path(DEFAULT_DATA),
    as_json: JsonOpt = False,
) -> None:
    """Unresolved quarantined records, counted by table, field and reason."""
    from canonflow.transform.quarantine import quarantined, summary

    rt = Runtime(_settings(pipeline, data_dir))
    rows = quarantined(rt, tenant, service, table)
    if records:
        cols = ["_tenant_id", "_service_name", "_source_table", "_source_file", "line",
                "field", "reason", "raw"]
        docs = rows.select(cols).slice(0, limit).to_pylist() if rows.num_rows else []
    else:
        docs = summary(rows)
    if as_json:
        _emit_json(docs)
        return
    if not docs:
        out.print("no quarantined records")
        return
    view = Table(title=f"quarantine: {rows.num_rows} unresolved record(s)")
    for col in docs[0]:
        view.add_column(col.lstrip("_"), overflow="fold")
    for doc in docs:
        view.add_row(*("" if v is None else str(v) for v in doc.values()))
    out.print(view)


@quarantine_app.command("replay")
def quarantine_replay(
    tenant: TenantOpt = None, service: ServiceOpt = None, table: TableOpt = None,
    pipeline: PipelineOpt = None, data_dir: DataDirOpt = Path(DEFAULT_DATA),
    mapping_dir: MappingDirOpt = None, as_json: JsonOpt = False,
) -> None:
    """Re-map unresolved quarantined records with the current mappings (after a fix):
    those that pass land in the canonical tables and are marked resolved."""
    from dataclasses import asdict

    from canonflow.transform.quarantine import replay

    settings = _settings(pipeline, data_dir, mapping_dir)
    rt = Runtime(settings)
    try:
        result = replay(rt, tenant, service, table)
    finally:
        rt.close()
    if as_json:
        _emit_json(asdict(result))
    else:
        out.print(f"{result.replay_id}: {result.records} record(s) replayed, "
                  f"{result.landed} landed, {result.still_quarantined} still quarantined")


@app.command(name="demo-api")
def demo_api(
    records: Annotated[int, typer.Option(help="Records per table per tenant.", min=0)] = 2000,
    port: Annotated[int, typer.Option(help="Port on 127.0.0.1 (0: any free port).")] = 8765,
    prerender: Annotated[list[str] | None, typer.Option(
        help="Render every page for this tenant before serving (repeatable).")] = None,
    page_size: Annotated[int, typer.Option(help="Page size to prerender.", min=1)] = 250,
) -> None:
    """Serve the demo SaaS API on 127.0.0.1 until interrupted (prints its base URL)."""
    api = DemoApi(records, cache_pages=1 << 20 if prerender else 2048)
    if prerender:
        api.prerender(list(prerender), {t: page_size for _, t in TABLES})
    with serve(api, port) as server:
        print(server.base_url, flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass


@app.command(name="recover")
def recover_cmd(
    pipeline: PipelineOpt = None,
    data_dir: DataDirOpt = Path(DEFAULT_DATA),
    older_than: Annotated[float, typer.Option(
        help="Only touch work idle for this many seconds.")] = 60.0,
    as_json: JsonOpt = False,
) -> None:
    """Sweep: aggregate jobs stuck after their last chunk, re-send pending transforms."""
    settings = _settings(pipeline, data_dir)
    rt = Runtime(settings)
    dispatcher = open_dispatcher(settings.dispatcher, settings)
    try:
        swept = recover(rt, dispatcher, older_than)
    finally:
        dispatcher.close()
        rt.close()
    if as_json:
        _emit_json(swept)
    else:
        out.print(", ".join(f"{k}: {v}" for k, v in swept.items()))


def main() -> None:
    memory.tune()
    try:
        app()
    except CanonflowError as exc:
        console.print(f"[red]error:[/red] {exc}", highlight=False, soft_wrap=True)
        sys.exit(3 if exc.retryable else 2)
