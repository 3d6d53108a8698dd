"""The ``canonflow`` command line."""

from __future__ import annotations

import logging
import signal
import sys
import time
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.table import Table
from rich.text import Text

from canonflow import exits, jsonio, log, memory, render
from canonflow.config import DEFAULT_DATA, Settings, SourceConfig, TenantConfig, load_settings
from canonflow.connectors.demo_api import TABLES, DemoApi, serve, tenant_token
from canonflow.dispatch import Dispatcher, open_dispatcher
from canonflow.errors import ConfigError, TerminalError, UnknownJob
from canonflow.lease import runner_alive
from canonflow.model import TERMINAL, TransformRequest, TriggerMode
from canonflow.plan import PLAN_PREFIX, forget_pages
from canonflow.progress import RichProgress
from canonflow.query import Scan, run_query
from canonflow.report import job_report, totals
from canonflow.runner import JobRunner, recover
from canonflow.runtime import Runtime
from canonflow.stores import open_object_store
from canonflow.telemetry import metrics
from canonflow.telemetry import setup as telemetry
from canonflow.timeline import write_timeline
from canonflow.transform.writer import QUARANTINE_TABLE, canonical_path

app = typer.Typer(
    help="Sync many tenants' SaaS data into one canonical model: parallel chunks, "
    "exactly-once canonical processing, nothing lost.",
    no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False,
)
console = render.console(stderr=True)
out = render.console()

DEMO_SERVICES = ("crm", "helpdesk", "billing")
PipelineOpt = Annotated[Path | None, typer.Option(
    "--pipeline", "-p", help="Pipeline YAML (stores, sources, tenants).")]
DataDirOpt = Annotated[Path, typer.Option(
    "--data-dir", help="Data directory of the embedded default (used without --pipeline).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON document for machines.")]
MappingDirOpt = Annotated[list[Path] | None, typer.Option(
    "--mapping-dir", help="Extra mapping YAML folder (repeatable); wins over built-ins.")]
VerboseOpt = Annotated[bool, typer.Option(
    "--verbose", "-v", help="Logs at INFO (--log-level info).")]
LOG_OPTIONS = ("--log-level", "--log-format")


@app.callback()
def _logging(
    ctx: typer.Context,
    log_level: Annotated[str, typer.Option(
        "--log-level", envvar="CANONFLOW_LOG_LEVEL",
        help="debug, info, warning or error, for this process and the workers it starts "
        "(accepted before or after the command).")] = "warning",
    log_format: Annotated[str, typer.Option(
        "--log-format", envvar="CANONFLOW_LOG_FORMAT",
        help="json (one object per line), text, or auto: text on a terminal, else JSON.")
    ] = "auto",
) -> None:
    """Sync many tenants' SaaS data into one canonical model: parallel chunks,
    exactly-once canonical processing, nothing lost.

    Telemetry: set OTEL_EXPORTER_OTLP_ENDPOINT (with canonflow[otel] installed) and every
    process sends spans and metrics over OTLP; `canonflow worker --metrics-port` serves
    Prometheus metrics."""
    log.configure(log_level, log_format)
    if ctx.invoked_subcommand != "worker":  # a worker's pool processes configure their own
        telemetry.configure()


def _hoist_log_options(argv: list[str]) -> list[str]:
    """``--log-level``/``--log-format`` are accepted anywhere on the line: they move to the
    front, where the app's callback reads them for every command."""
    front: list[str] = []
    rest: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in LOG_OPTIONS and i + 1 < len(argv):
            front += [arg, argv[i + 1]]
            i += 2
            continue
        if arg.split("=", 1)[0] in LOG_OPTIONS and "=" in arg:
            front.append(arg)
        else:
            rest.append(arg)
        i += 1
    return front + rest


def _settings(pipeline: Path | None, data_dir: Path, mapping_dir: list[Path] | None = None,
              credentials: bool = False) -> Settings:
    """The pipeline's settings, or the embedded default's; without ``credentials`` (for
    commands that never call an API) the tenants' credentials are not read."""
    if pipeline is not None:
        return load_settings(pipeline, credentials=credentials)
    root = data_dir.resolve()
    return Settings(object_store=f"file://{root}", state_store=f"sqlite:///{root}/state.db",
                    mapping_dirs=[str(d) for d in mapping_dir or []])


def _emit_json(doc: Any) -> None:
    sys.stdout.write(jsonio.dumps_str(doc) + "\n")


def _summary(reports: list[dict[str, Any]], seconds: float) -> render.FittedTable:
    jobs = ", ".join(f"{r['tenant_id']}={r['job_id']} ({r['status']}/{r['outcome']})"
                     for r in reports)
    table = render.View(f"canonflow sync: {len(reports)} job(s) in {seconds:.1f} s", jobs)
    table.column("table").columns(
        ("chunks", "records", "files", "transforms", "canonical", "quarantined", "read/ext",
         "chunk s", "trans. s"), "number")
    for rep in reports:
        for label, t in rep["tables"].items():
            factor = t.get("read_per_extracted")
            table.row(label, str(t["chunks"]), str(t["records_extracted"]),
                          str(t["files_written"]), str(t["transforms_triggered"]),
                          str(t["records_canonical"]), str(t["records_quarantined"]),
                          "" if factor is None else f"{factor:.2f}",
                          f"{t.get('chunk_seconds', 0.0):.2f}",
                          f"{t.get('transform_seconds', 0.0):.2f}")
    sums = [totals(r) for r in reports]
    if sums:
        agg = {k: sum(s[k] for s in sums) for k in sums[0]}
        table.section()
        factor = (f"{agg['records_read'] / agg['records_extracted']:.2f}"
                  if agg["records_extracted"] else "")
        table.row("total", str(agg["chunks"]), str(agg["records_extracted"]),
                      str(agg["files_written"]), str(agg["transforms_triggered"]),
                  str(agg["records_canonical"]), str(agg["records_quarantined"]), factor)
    return table.render()


def _secs(value: float | None) -> str:
    return "" if value is None else f"{value:.2f}"


def _timings(rep: dict[str, Any]) -> render.FittedTable:
    """Where a job's time went, per table (times are the workers' clocks)."""
    table = render.View(f"timings (aggregated {rep.get('aggregated_at') or 'not yet'})")
    table.column("table").columns(
        ("extraction s", "wait for aggr. s", "transform s", "files/transform", "read/ext"),
        "number")
    for label, t in rep["tables"].items():
        factor, per = t.get("read_per_extracted"), t.get("files_per_transform")
        table.row(label, _secs(t.get("extraction_seconds")),
                      _secs(t.get("aggregation_wait_seconds")),
                      _secs(t.get("transform_seconds")), "" if per is None else str(per),
                  "" if factor is None else f"{factor:.2f}")
    return table.render()


def _run_jobs(settings: Settings, tenants: list[str] | None, as_json: bool,
              full_refresh: bool = False, wait_limit: float | None = None,
              resume_with: str = "the same command again") -> int:
    """Run (or resume) one job per tenant and print the reports. Exit codes: 0 every job
    done and completed, 1 a job failed or a tenant was refused, 130 interrupted (the jobs
    stay resumable: ``resume_with`` says how); errors exit 2 (terminal) or 3 (retryable, a
    wait limit)."""
    started = time.perf_counter()
    rt = Runtime(settings)
    if telemetry.enabled():
        metrics.watch_backlog(lambda: rt.state.outbox_backlog(settings.name), settings.name)
    dispatcher: Dispatcher | None = None
    runner: JobRunner | None = None
    try:
        dispatcher = open_dispatcher(settings.dispatcher, settings)
        if as_json:
            runner = JobRunner(settings, rt, dispatcher, full_refresh=full_refresh,
                               wait_limit=wait_limit)
            job_ids = runner.run(tenants)
        else:
            with RichProgress(console) as progress:
                runner = JobRunner(settings, rt, dispatcher, progress,
                                   full_refresh=full_refresh, wait_limit=wait_limit)
                job_ids = runner.run(tenants)
        reports = [job_report(rt.state, j) for j in job_ids]
    except KeyboardInterrupt:
        left = [f"{j.tenant_id}={j.job_id}" for j in rt.state.unfinished_jobs()
                if runner is not None and j.runner == runner.holder]
        if left:
            console.print(f"interrupted: {len(left)} unfinished job(s) {', '.join(left)} can "
                          f"be resumed: run {resume_with}", soft_wrap=True)
        else:
            console.print("interrupted before any job started: nothing to resume",
                          soft_wrap=True)
        return exits.INTERRUPTED
    finally:
        if dispatcher is not None:
            dispatcher.close()
        rt.close()
    seconds = time.perf_counter() - started
    refused = runner.refused if runner else {}
    if as_json:
        _emit_json({"seconds": round(seconds, 3), "jobs": reports,
                    "refused": refused, "resumed": runner.resumed if runner else []})
    else:
        if reports:
            out.print(_summary(reports, seconds))
        for job_id in runner.resumed if runner else []:
            console.print(f"resumed job {job_id} (its runner was gone)", highlight=False)
        for message in refused.values():
            console.print(f"refused: {message}", soft_wrap=True)
        for r in reports:
            if r.get("error"):
                console.print(f"{r['tenant_id']}: job {r['job_id']} failed: "
                              f"{r['error']}", highlight=False, soft_wrap=True)
    failed = [r for r in reports if r["status"] != "done" or r["outcome"] != "completed"]
    return 1 if failed or refused else 0


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
    if verbose:
        log.at_least(logging.INFO)
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
        code = _run_jobs(settings, None, as_json,
                         resume_with="the same `canonflow demo` command again (the same "
                         "--data-dir and --records)")
    if not as_json and code != exits.INTERRUPTED:
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
    wait_limit: Annotated[float | None, typer.Option(
        help="Stop waiting after this many seconds (exit code 3; the jobs go on). "
        "Default: the pipeline's run_wait_limit_seconds (24 h).", min=0.001)] = None,
    as_json: JsonOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Run one sync job per tenant of PIPELINE and wait for its canonical transforms.

    Tables with an incremental filter fetch only what changed since their last synced
    high-water mark, unless --full-refresh. A tenant whose previous job was left unfinished
    by a run that died (killed, Ctrl-C) resumes that job: only its missing chunks run again.
    A tenant whose job another live run is driving is refused."""
    if verbose:
        log.at_least(logging.INFO)
    raise typer.Exit(_run_jobs(
        load_settings(pipeline), tenant or None, as_json, full_refresh, wait_limit,
        resume_with=f"`canonflow recover --pipeline {pipeline} --older-than 0` (their runner "
        "is gone), or the same command again"))


@app.command()
def status(
    job_id: Annotated[str | None, typer.Argument(help="A job id; default: recent jobs.")] = None,
    pipeline: PipelineOpt = None,
    data_dir: DataDirOpt = Path(DEFAULT_DATA),
    as_json: JsonOpt = False,
    timeline: Annotated[Path | None, typer.Option(
        "--timeline", metavar="FILE",
        help="Write the job's timeline to FILE (one self-contained HTML page, no network "
        "needed to open it): its chunks and transforms per worker process over time, "
        "coloured by table, the aggregation moment marked; prints the path.")] = None,
) -> None:
    """Show a job's status, per table (chunks, records, files, transforms and timings:
    extraction, wait for aggregation, transform), or the most recent jobs."""
    rt = Runtime(_settings(pipeline, data_dir))
    try:
        if timeline is not None and job_id is None:
            raise TerminalError("--timeline needs a JOB_ID")
        if job_id is not None:
            rep = job_report(rt.state, job_id)
            if rep["status"] == "unknown":
                raise UnknownJob(f"no job {job_id!r} in {rt.settings.state_store}: "
                                 "`canonflow status` lists the recent jobs")
            if timeline is not None:
                written = str(write_timeline(rt.state, job_id, timeline))
                if as_json:
                    _emit_json({**rep, "timeline": written})
                else:
                    out.print(written, highlight=False, soft_wrap=True)
            elif as_json:
                _emit_json(rep)
            else:
                out.print(_summary([rep], rep["seconds"]))
                out.print(_timings(rep))
                if rep.get("runner") == "lost":
                    console.print(f"job {job_id} is {rep['status']} but its runner is gone: "
                                  "resume it with `canonflow run` of its pipeline and tenant "
                                  f"or `canonflow recover`, or `canonflow cancel {job_id}`",
                                  highlight=False, soft_wrap=True)
                if rep.get("error"):
                    console.print(f"error: {rep['error']}", highlight=False, soft_wrap=True)
                for event in rep.get("events", []):
                    console.print(f"{event['at']} {event['kind']} "
                                  f"{event['chunk_id'] or ''}: {event['detail']}",
                                  highlight=False, soft_wrap=True)
            return
        jobs = rt.state.jobs(20)
        if as_json:
            _emit_json({"jobs": [job_report(rt.state, j.job_id) for j in jobs]})
            return
        table = render.View("recent jobs").column("job", "id").columns(
            ("tenant", "status", "outcome", "chunks", "created"))
        for j in jobs:
            lost = j.status not in TERMINAL and j.runner is not None \
                and not runner_alive(rt.state, j)
            table.row(j.job_id, j.tenant_id, j.status + (" (runner lost)" if lost else ""),
                          j.outcome or "",
                          f"{j.completed_chunks}/{j.total_chunks}",
                      j.created_at.isoformat(timespec="seconds"))
        out.print(table.render())
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
    if verbose:
        log.at_least(logging.INFO)
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
    elif result.files_read == 0 and result.files_skipped == 0 and not source_file:
        # nothing to do is not a failure (exit 0): a scheduled trigger may find no new data
        out.print(f"no raw files for tenant {tenant} table {service}.{table} in the last "
                  f"{lookback_hours:g} hours; nothing to transform (run a sync first, or "
                  "widen --lookback-hours)", soft_wrap=True)
    else:
        skipped = (f", {result.files_skipped} skipped (already canonical; --reprocess reads "
                   "them again)" if result.files_skipped else "")
        out.print(f"{result.processing_mode.value}: {result.files_read} files{skipped}, "
                  f"{result.records_read} records read, {result.records_written} canonical, "
                  f"{result.records_quarantined} quarantined, {result.records_merged} merged "
                  f"in {result.seconds:.2f} s", soft_wrap=True)


@app.command()
def query(
    sql: Annotated[str, typer.Argument(help='SQL, e.g. "SELECT count(*) FROM contact".')],
    pipeline: PipelineOpt = None,
    data_dir: DataDirOpt = Path(DEFAULT_DATA),
    as_json: JsonOpt = False,
    csv: Annotated[bool, typer.Option("--csv", help="Print CSV (an export).")] = False,
    scanned: Annotated[bool, typer.Option(
        "--scanned", help="Also print, on stderr, how many data files the query read of "
        "those its tables hold (filters on _tenant_id and other columns skip files).")
    ] = False,
    mapping_dir: MappingDirOpt = None,
) -> None:
    """Query canonical tables (one per entity) and `quarantine` with DuckDB SQL. Reads
    tables only: the pipeline's credentials are not needed."""
    settings = _settings(pipeline, data_dir, mapping_dir)
    store = open_object_store(settings.canonical_store or settings.object_store)
    scan = Scan() if scanned else None
    dirs = [*settings.mapping_dirs, *(str(d) for d in mapping_dir or []
                                      if str(d) not in settings.mapping_dirs)]
    columns, rows = run_query(store, sql, dirs, scan)
    if scan is not None:
        console.print(f"read {scan.files_read} of {scan.total} data files", highlight=False)
    if as_json:  # decimals as exact text, timestamps and dates as ISO text
        sys.stdout.write(jsonio.dumps_rows([dict(zip(columns, r, strict=True))
                                            for r in rows]) + "\n")
        return
    if csv:
        import csv as csv_module

        writer = csv_module.writer(sys.stdout)
        writer.writerow(columns)
        writer.writerows(rows)
        return
    out.print(render.rows_view(columns, rows))


@app.command()
def worker(
    pipeline: Annotated[Path, typer.Argument(help="Pipeline YAML (dispatcher: celery+...).")],
    concurrency: Annotated[int, typer.Option(help="Worker processes.", min=1)] = 2,
    name: Annotated[str | None, typer.Option(help="Worker node name, e.g. w1@host.")] = None,
    metrics_port: Annotated[int | None, typer.Option(
        help="Serve Prometheus metrics of every worker process on this port (/metrics); "
        "needs canonflow[otel].", min=0, max=65535)] = None,
    metrics_host: Annotated[str, typer.Option(
        help="Address the metrics endpoint listens on.")] = "0.0.0.0",
) -> None:
    """Run a Celery worker for PIPELINE's chunk and transform tasks (one per machine)."""
    settings = load_settings(pipeline)
    if not settings.dispatcher.startswith("celery+"):
        raise ConfigError(f"{pipeline}: dispatcher is {settings.dispatcher!r}; "
                          "workers serve celery+redis:// or celery+amqp:// pipelines")
    try:
        from canonflow.dispatch.celery import run_worker
    except ModuleNotFoundError as exc:
        raise ConfigError(f"canonflow worker needs {exc.name!r}: "
                          "pip install 'canonflow[celery]'") from None
    run_worker(settings, concurrency, name, metrics_port, metrics_host)


aws_app = typer.Typer(help="Run on AWS Lambda: the SAM template.", no_args_is_help=True)
app.add_typer(aws_app, name="aws")


@aws_app.command("template")
def aws_template(
    out_dir: Annotated[Path | None, typer.Option(
        "--out", help="write DIR/template.yaml, DIR/src/Dockerfile and "
        "DIR/src/requirements.txt (then copy your pipeline file to DIR/src/pipeline.yaml "
        "and run `sam build && sam deploy --guided` in DIR)"
    )] = None,
) -> None:
    """Print the SAM template (S3 bucket, DynamoDB table, SQS queues with dead-letter
    queues, the plan, chunk, transform and sweeper functions, their schedules)."""
    from importlib.metadata import PackageNotFoundError, version

    from canonflow.aws import dockerfile, template

    text = template()
    if out_dir is None:
        sys.stdout.write(text)
        return
    try:
        pin = f">={version('canonflow')}"
    except PackageNotFoundError:
        pin = ""
    (out_dir / "src").mkdir(parents=True, exist_ok=True)
    (out_dir / "template.yaml").write_text(text)
    (out_dir / "src" / "Dockerfile").write_text(dockerfile())
    requirements = out_dir / "src" / "requirements.txt"
    if not requirements.exists():
        requirements.write_text(f"canonflow[aws]{pin}\n")
    out.print(f"wrote {out_dir / 'template.yaml'}, a Dockerfile and {requirements}; copy "
              "your pipeline "
              f"file to {out_dir / 'src'}/pipeline.yaml, then in {out_dir}: "
              "sam build && sam deploy --guided")


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
    mapping_dir: MappingDirOpt = None,
) -> None:
    """List the canonical entities (with --markdown: the reference in docs/entities.md),
    with the pipeline's or --mapping-dir's own entities and added fields."""
    from canonflow.mappings import load_catalog
    from canonflow.mappings.docs import entities_markdown

    dirs = load_settings(pipeline, credentials=False).mapping_dirs if pipeline else []
    catalog = load_catalog([*dirs, *(str(d) for d in mapping_dir or [])])
    if markdown:
        sys.stdout.write(entities_markdown(catalog))
        return
    table = render.View("canonical entities").columns(
        ("entity", "primary key", "fields", "mapped from"))
    for name, entity in sorted(catalog.entities.items()):
        sources = [f"{s}.{t}" for (s, t), m in sorted(catalog.mappings.items())
                   if m.entity == name or any(c.entity == name for c in m.children)]
        table.row(name, ", ".join(entity.keys), len(entity.fields), ", ".join(sources))
    out.print(table.render())


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
    view = render.View("built-in connectors").columns(
        ("service", "table", "pagination", "chunking", "auth"))
    for d in docs:
        view.row(d["service"], d["table"], d["pagination"], d["chunking"], d["auth"])
    out.print(view.render())


@connectors_app.command("check")
def connectors_check(
    spec_file: Annotated[Path, typer.Argument(help="Connector spec YAML.")],
    probe: Annotated[str | None, typer.Option(
        help="Base URL to fetch one page of each table from.")] = None,
    credential: Annotated[list[str] | None, typer.Option(
        help="KEY=VALUE credential for the probe (repeatable), e.g. token=$TOKEN.")] = None,
    table: Annotated[list[str] | None, typer.Option(help="Probe only this table.")] = None,
    mapping_dir: MappingDirOpt = None,
) -> None:
    """Validate a spec (file, path in it, what was expected) and its mappings (fields they
    read that the request never asks for); with --probe, read one page."""
    from canonflow.connectors.rest import RestClient
    from canonflow.connectors.spec import load_spec, unrequested_fields

    spec = load_spec(spec_file)
    problems = unrequested_fields(spec, [str(d) for d in mapping_dir or []])
    if problems:
        for problem in problems:
            console.print(f"{spec_file}: {problem}", markup=False)
        raise typer.Exit(1)
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


mappings_app = typer.Typer(help="Mappings: check them against their entities and the API.",
                           no_args_is_help=True)
app.add_typer(mappings_app, name="mappings")


@mappings_app.command("check")
def mappings_check(
    pipeline: PipelineOpt = None,
    mapping_dir: MappingDirOpt = None,
    probe: Annotated[bool, typer.Option(
        "--probe", help="Fetch one page of each table of the pipeline (credentials from it) "
        "and show how many records would land or be quarantined, and why; writes nothing."
    )] = False,
    tenant: Annotated[str | None, typer.Option(
        help="The tenant whose credentials the probe uses (default: the first).")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Validate every mapping (built-in and your folders) against its entity; with a
    pipeline, also that each table it syncs has one. Exit code 2 if any is invalid."""
    from canonflow.mappings.check import check_mappings, source_tables
    from canonflow.mappings.check import probe as probe_tables

    if probe and pipeline is None:
        raise ConfigError("--probe needs --pipeline (its sources and credentials)")
    settings = load_settings(pipeline, credentials=probe) if pipeline else None
    dirs = [*(settings.mapping_dirs if settings else []), *(str(d) for d in mapping_dir or [])]
    catalog, rows = check_mappings(dirs, source_tables(settings) if settings else [])
    probes = []
    if probe and settings is not None:
        tenant_id = tenant or settings.tenants[0].tenant_id
        if tenant_id not in [t.tenant_id for t in settings.tenants]:
            raise ConfigError(f"tenant {tenant_id!r} is not in pipeline {settings.name!r}")
        probes = probe_tables(settings, catalog, tenant_id)
    invalid = [r for r in rows if r.status != "ok"]
    failed = [p for p in probes if p.error is not None]
    if as_json:
        from dataclasses import asdict

        _emit_json({"mappings": [asdict(r) for r in rows],
                    "probe": [asdict(p) for p in probes]})
    else:
        view = Table(title=f"mappings: {len(rows) - len(invalid)} ok, {len(invalid)} "
                     "invalid or missing")
        for col in ("service", "table", "entity", "status", "problems"):
            view.add_column(col, overflow="fold")
        for r in rows:
            status = Text(r.status, style="" if r.status == "ok" else "red")
            view.add_row(r.service, r.table, r.entity, status, Text("; ".join(r.problems)))
        out.print(view)
        if probes:
            pview = Table(title=f"probe: one page per table, tenant {tenant_id}")
            for col in ("service", "table", "entity", "fetched", "would land", "quarantined",
                        "reasons", "examples"):
                pview.add_column(col, overflow="fold")
            for p in probes:
                reasons = "; ".join(f"{n} x {why}" for why, n in p.reasons.items())
                examples = "; ".join(f"line {e['line']}"
                                     + (f" ({e['key']})" if e["key"] else "")
                                     + f": {e['reason']}" for e in p.examples)
                pview.add_row(p.service, p.table, p.entity, str(p.fetched), str(p.landed),
                              str(p.quarantined), Text(p.error or reasons), Text(examples),
                              style="red" if p.error else None)
            out.print(pview)
    if invalid or any(not p.retryable for p in failed):
        raise typer.Exit(2)
    if failed:
        raise typer.Exit(3)


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
    groups = summary(rt, tenant, service, table)
    total = sum(g["records"] for g in groups)
    if records:
        cols = ["_tenant_id", "_service_name", "_source_table", "_source_file", "line",
                "field", "reason", "raw"]
        docs = quarantined(rt, tenant, service, table, columns=cols, limit=limit).to_pylist()
    else:
        docs = groups
    if as_json:
        _emit_json(docs)
        return
    if not docs:
        out.print("no quarantined records")
        return
    out.print(render.rows_view([col.lstrip("_") for col in docs[0]],
                               [list(doc.values()) for doc in docs],
                               f"quarantine: {total} unresolved record(s)"))


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
    """Sweep: settle finished jobs, aggregate jobs stuck after their last chunk, re-send
    pending or abandoned transforms; with --pipeline, also resume that pipeline's jobs whose
    runner is gone (only their missing chunks run again)."""
    settings = _settings(pipeline, data_dir, credentials=True)  # it may resume chunks
    rt = Runtime(settings)
    dispatcher = open_dispatcher(settings.dispatcher, settings)
    try:
        swept: dict[str, Any] = dict(recover(
            rt, dispatcher, older_than, pipeline=settings.name if pipeline else None))
        if pipeline is not None:
            resumed = JobRunner(settings, rt, dispatcher).resume(older_than=older_than)
            swept["jobs_resumed"] = len(resumed)
        else:
            orphans = [j.job_id for j in rt.state.unfinished_jobs()
                       if j.runner is not None and not runner_alive(rt.state, j)]
            swept["jobs_orphaned"] = len(orphans)
            if orphans and not as_json:
                console.print(f"{len(orphans)} job(s) whose runner is gone need their "
                              "pipeline to resume: canonflow recover --pipeline FILE "
                              f"({', '.join(orphans[:5])})", highlight=False, soft_wrap=True)
    finally:
        dispatcher.close()
        rt.close()
    if as_json:
        _emit_json(swept)
    else:
        out.print(", ".join(f"{k}: {v}" for k, v in swept.items()))


@app.command()
def maintain(
    pipeline: PipelineOpt = None,
    data_dir: DataDirOpt = Path(DEFAULT_DATA),
    retention_hours: Annotated[float, typer.Option(
        help="Keep what every version of the last this many hours reads (time travel within "
        "it keeps working).", min=1)] = 168.0,
    as_json: JsonOpt = False,
) -> None:
    """Table upkeep (run it now and then, like recover): compact tenant partitions holding
    more than compact_after_files files, delete data files no version within the retention
    reads, checkpoint each log and drop expired log entries; delete the first pages planning
    kept for chunks (plan/) of jobs that ended, and of any job after the retention."""
    settings = _settings(pipeline, data_dir)
    rt = Runtime(settings)
    rows: list[dict[str, Any]] = []
    try:
        names = [canonical_path(e) for e in rt.catalog.entities] + [QUARANTINE_TABLE]
        for name in names:
            compacted = 0
            if settings.compact_after_files > 0 and name != QUARANTINE_TABLE:
                for tenant in rt.canonical.tenants(name):
                    compacted += rt.canonical.compact(name, tenant,
                                                      settings.compact_after_files)
            vacuumed = rt.canonical.vacuum(name, retention_hours)
            rows.append({"table": name, "files_compacted": compacted,
                         "files_deleted": vacuumed})
        rows.append({"table": PLAN_PREFIX, "files_compacted": 0,
                     "files_deleted": forget_pages(rt, retention_hours)})
    finally:
        rt.close()
    if as_json:
        _emit_json(rows)
        return
    view = render.View(f"maintenance (retention {retention_hours:g} h)").column("table")
    view.columns(("files compacted", "files deleted"), "number")
    for r in rows:
        view.row(r["table"], r["files_compacted"], r["files_deleted"])
    out.print(view.render())


@app.command()
def cancel(
    job_id: Annotated[str, typer.Argument(help="The job to cancel.")],
    reason: Annotated[str, typer.Option(help="Why (kept with the job).")] = "cancelled by user",
    pipeline: PipelineOpt = None,
    data_dir: DataDirOpt = Path(DEFAULT_DATA),
) -> None:
    """Cancel an unfinished job: it is never aggregated, transforms not yet started never
    start, and its tenant can start a new job."""
    rt = Runtime(_settings(pipeline, data_dir))
    try:
        if rt.state.cancel_job(job_id, reason):
            out.print(f"job {job_id} cancelled")
        else:
            job = rt.state.job(job_id)
            out.print(f"job {job_id} is already {job.status if job else 'gone'}; nothing to do")
    finally:
        rt.close()


def _command_path(argv: list[str]) -> str:
    """``canonflow`` and the (sub)command words of ``argv``, e.g. ``canonflow db upgrade``."""
    words = ["canonflow"]
    if not isinstance(app, typer.Typer):  # replaced (tests): no command words to find
        return words[0]
    command = typer.main.get_command(app)
    for arg in argv:
        sub = getattr(command, "commands", {}).get(arg)
        if sub is not None:
            command = sub
            words.append(arg)
    return " ".join(words)


def _exit(code: int) -> NoReturn:
    """End the process with ``code``. The outcome is decided and printed by now, so Ctrl-C
    has nothing left to interrupt: it is ignored from here on. Otherwise one that lands
    while the interpreter shuts down (which puts the default handler back first) kills the
    process by SIGINT, without a line, after a command that finished."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sys.exit(code)


def main() -> None:
    """The ``canonflow`` entry point: any failure ends in one redacted line on stderr (exit 2
    when retrying will not help, 3 when it may, 130 interrupted, 1 for an error canonflow
    did not expect); see :mod:`canonflow.exits`."""
    memory.tune()
    argv = _hoist_log_options(sys.argv[1:])
    try:
        code = app(args=argv, prog_name="canonflow", standalone_mode=False)
    except (KeyboardInterrupt, typer.Abort):
        console.print("error: interrupted; run the command again to continue", soft_wrap=True)
        _exit(exits.INTERRUPTED)
    except Exception as exc:  # one line, never a traceback that could carry a secret
        if type(exc).__name__ == "NoArgsIsHelpError":  # the help is printed already
            _exit(exits.TERMINAL)
        text, code = exits.describe(exc, _command_path(argv))
        console.print(f"error: {exits.one_line(text)}", soft_wrap=True)
        _exit(code)
    _exit(code if isinstance(code, int) else 0)
