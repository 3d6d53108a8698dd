"""What the command line prints. Every failure is one line on stderr with a next step,
never a traceback: exit 2 when retrying will not help, 3 when it may. Tables show values as
they are, keep ids whole and are never cut when piped. An interrupted run says which jobs it
left and how to resume them."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import signal
import socket
import struct
import subprocess
import sys
import termios
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from canonflow.connectors.demo_api import DemoApi, DemoServer, serve, tenant_token
from tests.integration.test_cli import cli
from tests.reliability.test_killed_runs import wait_for_a_job
from tests.servers import JsonHandler, serve_api


def write_pipeline(path: Path, base_url: str, service: str, tables: str, tenant: str,
                   token: str, dispatcher: str = "inline://", paging: str = "") -> Path:
    """A pipeline file: one source (``paging``: its extra fields), one tenant, data next to
    the file."""
    path.write_text(f"""
name: {path.stem}
object_store: file://./data
state_store: sqlite:///./data/state.db
dispatcher: {dispatcher}
sources: [{{service: {service}, base_url: '{base_url}/{service}/v1', tables: [{tables}]{paging}}}]
tenants: [{{tenant_id: {tenant}, credentials: {{{service}: {{token: {token}}}}}}}]
""")
    return path


def one_error_line(proc: subprocess.CompletedProcess[str], code: int, *parts: str) -> str:
    """The single ``error:`` line of a failed command, which mentions every part."""
    assert proc.returncode == code, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for part in parts:
        assert part in lines[0], (part, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data directory with the canonical tables of a small demo (one tenant)."""
    root = tmp_path_factory.mktemp("demo") / "data"
    proc = cli("demo", "--records", "50", "--tenants", "1", "--data-dir", str(root), "--json")
    assert proc.returncode == 0, proc.stderr
    return root


def test_invalid_argument_values_name_their_option(tmp_path: Path) -> None:
    data = str(tmp_path / "data")
    transform = ("transform", "--data-dir", data, "--service", "crm", "--table", "contacts")
    one_error_line(cli(*transform, "--tenant", "a/b"), 2,
                   "--tenant: invalid tenant_id 'a/b'", "canonflow transform --help")
    one_error_line(cli(*transform, "--tenant", "a", "--lookback-hours", "-5"), 2,
                   "--lookback-hours: Input should be greater than 0",
                   "canonflow transform --help")
    one_error_line(cli(*transform, "--tenant", "a", "--lookback-hours", "inf"), 2,
                   "--lookback-hours: Input should be a finite number",
                   "canonflow transform --help")
    one_error_line(cli(*transform, "--tenant", "a", "--lookback-hours", "1e12"), 2,
                   "--lookback-hours: Input should be less than or equal to 87840",
                   "canonflow transform --help")
    one_error_line(cli("demo", "--tenants", "0"), 2, "'--tenants'", "canonflow demo --help")
    one_error_line(cli("db", "upgrade", "--nope"), 2, "No such option: --nope",
                   "canonflow db upgrade --help")
    one_error_line(cli("nosuch"), 2, "No such command 'nosuch'", "canonflow --help")


def test_query_errors_of_duckdb_are_one_line(data: Path) -> None:
    for sql, message in (("SELEC 1", "Parser Error"),
                         ("SELECT nope FROM contact", 'column "nope" not found'),
                         ("SELECT CAST(id || 'x' AS INTEGER) FROM contact", "Conversion Error"),
                         ("SELECT error('boom ' || id) FROM contact", "boom")):
        one_error_line(cli("query", "--data-dir", str(data), sql), 2, "query failed", message)


def test_demo_api_port_that_is_busy_or_invalid(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = str(busy.getsockname()[1])
        one_error_line(cli("demo-api", "--port", port, timeout=60), 2,
                       f"port {port} on 127.0.0.1 is in use", "--port")
    for port in ("70000", "-1"):
        one_error_line(cli("demo-api", "--port", port, timeout=60), 2,
                       f"port {port} is not a TCP port", "use 1-65535")


def test_state_store_path_that_cannot_be_created(tmp_path: Path) -> None:
    # a path under a regular file fails for every user, root too
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    one_error_line(cli("status", "--data-dir", str(blocker / "data")), 2,
                   f"cannot create the state store's folder {blocker / 'data'}",
                   "Not a directory", "--data-dir")


def test_state_store_file_that_cannot_hold_a_database(tmp_path: Path) -> None:
    """The folder exists, the database cannot be opened in it: one line at once (exit 2),
    not a minute of retries of an "unavailable" store (exit 3)."""
    data = tmp_path / "data"
    (data / "state.db").mkdir(parents=True)  # a folder where the database file goes
    started = time.monotonic()
    one_error_line(cli("status", "--data-dir", str(data)), 2,
                   f"cannot use {data / 'state.db'} as the SQLite state store",
                   "unable to open database file", "writable --data-dir")
    one_error_line(cli("status", "--data-dir", "/proc"), 2,
                   "cannot use /proc/state.db as the SQLite state store", "--data-dir")
    assert time.monotonic() - started < 30


def test_unknown_store_scheme_is_one_line_and_nothing_else(tmp_path: Path) -> None:
    pipeline = tmp_path / "pipeline.yaml"
    pipeline.write_text(f"""
object_store: foo://x
state_store: sqlite:///{tmp_path}/state.db
sources: [{{service: crm, base_url: 'http://127.0.0.1:9/crm/v1', tables: [contacts]}}]
tenants: [{{tenant_id: acme}}]
""")
    # before: the progress display printed an empty line ahead of the error
    proc = cli("run", str(pipeline))
    one_error_line(proc, 2, "unsupported object store URL 'foo://x'", "file://")
    assert proc.stderr.startswith("error: ")


SPEC = """
service: crm
base_url: {base_url}
auth: {auth}
tables:
  contacts: {{path: /contacts, records_path: results, primary_key: id,
              chunking: {{type: sequential}}}}
"""


def test_connectors_check_rejects_a_spec_without_tables_or_http(tmp_path: Path) -> None:
    empty = tmp_path / "empty.yaml"
    empty.write_text("service: crm\nbase_url: https://api.example\ntables: {}\n")
    one_error_line(cli("connectors", "check", str(empty)), 2,
                   "no tables: list at least one under 'tables'")
    ftp = tmp_path / "ftp.yaml"
    ftp.write_text(SPEC.format(base_url="ftp://files.example/crm", auth="{type: bearer}"))
    one_error_line(cli("connectors", "check", str(ftp)), 2,
                   "at base_url: base_url 'ftp://files.example/crm' is not an http(s) URL",
                   "https://")


def test_a_401_names_the_tenant_and_the_credential_never_its_value(
        tmp_path: Path, demo_server: DemoServer) -> None:
    spec = tmp_path / "crm.yaml"
    spec.write_text(SPEC.format(base_url="http://127.0.0.1:9", auth="{type: bearer}"))
    probe = cli("connectors", "check", str(spec), "--probe",
                f"{demo_server.base_url}/crm/v1", "--credential", "token=wrong-Secret-42")
    line = one_error_line(probe, 2, "HTTP 401", "credential 'token' of service 'crm'")
    assert "wrong-Secret-42" not in probe.stdout + line
    pipeline = write_pipeline(tmp_path / "refused.yaml", demo_server.base_url, "crm",
                              "contacts", "acme", "wrong-Secret-42")
    run = cli("run", str(pipeline))
    assert run.returncode == 1 and "Traceback" not in run.stderr  # a job failed
    assert "credential 'token' of service 'crm' for tenant 'acme'" in run.stderr
    assert "wrong-Secret-42" not in run.stdout + run.stderr


class HtmlHandler(JsonHandler):
    """A login page where the API should be."""

    def do_GET(self) -> None:
        body = b"<html><body>Please sign in</body></html>"
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def html_server() -> Iterator[str]:
    with serve_api(None, HtmlHandler, "html-api") as server:
        yield server.base_url


def test_an_html_page_where_json_was_expected(tmp_path: Path, html_server: str) -> None:
    spec = tmp_path / "crm.yaml"
    spec.write_text(SPEC.format(base_url="http://127.0.0.1:9",
                                auth="{type: api_key, name: key, location: query}"))
    probe = cli("connectors", "check", str(spec), "--probe", f"{html_server}/crm/v1",
                "--credential", "api_key=query-Secret-42")
    line = one_error_line(probe, 2, "expected JSON, got text/html from "
                                    f"{html_server}/crm/v1/contacts")
    assert "query-Secret-42" not in line


def test_transform_says_when_there_is_nothing_to_transform(data: Path) -> None:
    nothing = cli("transform", "--data-dir", str(data), "--tenant", "nobody", "--service",
                  "crm", "--table", "contacts", "--lookback-hours", "12")
    assert nothing.returncode == 0, nothing.stderr
    assert nothing.stdout.strip().startswith(
        "no raw files for tenant nobody table crm.contacts in the last 12 hours; nothing to "
        "transform")
    skipped = cli("transform", "--data-dir", str(data), "--tenant", "acme", "--service", "crm",
                  "--table", "contacts")
    assert skipped.returncode == 0, skipped.stderr
    assert skipped.stdout.startswith("time_based: 0 files, 1 skipped (already canonical")


def on_terminal(*args: str, columns: int = 80) -> str:
    """The output of a command run on a terminal ``columns`` wide (colours removed)."""
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
    proc = subprocess.Popen([sys.executable, "-c", "from canonflow.cli import main; main()",
                             *args], stdin=follower, stdout=follower, stderr=follower,
                            env={**os.environ, "COLUMNS": str(columns)})
    os.close(follower)
    chunks = []
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # the terminal closed: the command is done
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(leader)
    assert proc.wait(timeout=120) == 0
    return re.sub(r"\x1b\[[0-9;?]*[a-zA-Z]", "", b"".join(chunks).decode()).replace("\r", "")


def test_table_values_print_as_they_are(data: Path) -> None:
    values = ("[urgent]", "[/]", ":x:", "[bold]x[/bold]", "[red]acme[/red]")
    sql = "SELECT " + ", ".join(f"'{v}' AS c{i}" for i, v in enumerate(values)) + \
        " FROM contact LIMIT 1"
    for shown in (cli("query", "--data-dir", str(data), sql).stdout,
                  on_terminal("query", "--data-dir", str(data), sql, columns=120)):
        for value in values:
            assert value in shown, (value, shown)
        assert "\u274c" not in shown  # :x: is not an emoji


LONG_TENANT = "t" * 120 + "-tenant1"  # 128 characters, the longest id allowed


@pytest.fixture(scope="module")
def long_tenant_job(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A finished job of a tenant with a 128-character id: its data dir and job id."""
    root = tmp_path_factory.mktemp("long")
    with serve(DemoApi(300)) as server:
        pipeline = write_pipeline(root / "long.yaml", server.base_url, "helpdesk", "users",
                                  LONG_TENANT, tenant_token(LONG_TENANT))
        proc = cli("run", str(pipeline), "--json")
    assert proc.returncode == 0, proc.stderr
    return root / "data", json.loads(proc.stdout)["jobs"][0]["job_id"]


# a number as a whole token: not a piece of a date, an id or a label
NUMBER = re.compile(r"(?<![\w.:/-])\d+(?:\.\d+)?(?![\w.:/-])")
SUMMARY_NUMBERS = ("chunks", "records", "files", "transforms", "canonical", "quarantined",
                   "read/ext", "chunk s", "trans. s")
TIMINGS_NUMBERS = ("extraction s", "wait for aggr. s", "transform s", "files/transform",
                   "read/ext")


def _secs(value: float | None) -> str:
    return "" if value is None else f"{value:.2f}"


def shown_numbers(report: dict[str, Any], timings: bool) -> list[str]:
    """Every number the summary (and the timings) of a job report show, formatted as the
    CLI formats them."""
    numbers = []
    for t in report["tables"].values():
        numbers += [str(t[k]) for k in ("chunks", "records_extracted", "files_written",
                                        "transforms_triggered", "records_canonical",
                                        "records_quarantined")]
        numbers += [_secs(t.get("read_per_extracted")), _secs(t.get("chunk_seconds", 0.0)),
                    _secs(t.get("transform_seconds", 0.0))]
        if timings:
            per = t.get("files_per_transform")
            numbers += [_secs(t.get("extraction_seconds")),
                        _secs(t.get("aggregation_wait_seconds")),
                        _secs(t.get("transform_seconds")), "" if per is None else str(per),
                        _secs(t.get("read_per_extracted"))]
    return [n for n in numbers if n]


def assert_readable(shown: str, report: dict[str, Any], timings: bool = True,
                    columns: int = 80) -> None:
    """A job's summary (and timings) on a narrow terminal: nothing wider than the terminal,
    never an ellipsis, the job id whole on one line (to copy into `status JOB_ID`), the
    caption whole, a label for every row of every table and every number whole."""
    lines = shown.splitlines()
    assert all(len(line) <= columns for line in lines), shown
    assert "\u2026" not in shown, shown
    assert any(report["job_id"] in line for line in lines), shown
    assert any(f"({report['status']}/{report['outcome']})" in line for line in lines), shown
    tables = 2 if timings else 1
    for label in report["tables"]:
        name = label.split("/", 1)[1]  # service.table, after the tenant
        whole = label if len(label) <= columns else name  # a 143-character label folds
        assert sum(whole in line for line in lines) >= tables, (label, shown)
    assert any(line.strip().strip("\u2502").strip().startswith("total") for line in lines)
    for header in (*SUMMARY_NUMBERS, *(TIMINGS_NUMBERS if timings else ())):
        assert header in shown, (header, shown)  # a number column is not cropped away
    found = Counter(NUMBER.findall(shown))
    missing = Counter(shown_numbers(report, timings)) - found
    assert not missing, (missing, shown)


def job_report(data: Path, job_id: str) -> dict[str, Any]:
    proc = cli("status", "--data-dir", str(data), "--json", job_id)
    assert proc.returncode == 0, proc.stderr
    report: dict[str, Any] = json.loads(proc.stdout)
    return report


def test_ids_stay_whole_and_numbers_visible_on_80_columns(
        long_tenant_job: tuple[Path, str]) -> None:
    data, job_id = long_tenant_job
    recent = on_terminal("status", "--data-dir", str(data))
    assert job_id in recent, recent  # copyable into `canonflow status JOB_ID`
    assert "\u2026" not in recent  # never an ellipsis
    assert all(len(line) <= 80 for line in recent.splitlines()), recent
    assert_readable(on_terminal("status", "--data-dir", str(data), job_id),
                    job_report(data, job_id))


def test_a_short_tenant_keeps_its_labels_and_numbers_on_80_columns(data: Path) -> None:
    jobs = json.loads(cli("status", "--data-dir", str(data), "--json").stdout)["jobs"]
    report = job_report(data, jobs[-1]["job_id"])  # the demo's job, the first one
    assert len(report["tables"]) == 7 and report["tenant_id"] == "acme"
    assert_readable(on_terminal("status", "--data-dir", str(data), report["job_id"]), report)


def test_the_run_summary_keeps_its_labels_and_numbers_on_80_columns(tmp_path: Path) -> None:
    data = tmp_path / "data"
    shown = on_terminal("demo", "--records", "30", "--tenants", "1", "--data-dir", str(data))
    (job,) = json.loads(cli("status", "--data-dir", str(data), "--json").stdout)["jobs"]
    title = "canonflow sync: 1 job(s)"
    assert title in shown, shown
    summary = shown[shown.index(title):]  # not the progress display before it
    assert_readable(summary.split("Canonical tables are in")[0],
                    job_report(data, job["job_id"]), timings=False)


def test_piped_tables_are_never_cut(long_tenant_job: tuple[Path, str]) -> None:
    data, job_id = long_tenant_job
    proc = subprocess.run([sys.executable, "-c", "from canonflow.cli import main; main()",
                           "status", "--data-dir", str(data), job_id], capture_output=True,
                          text=True, timeout=120, env={**os.environ, "COLUMNS": "80"})
    assert proc.returncode == 0, proc.stderr
    label = f"{LONG_TENANT}/helpdesk.users"
    summary, _timings = [line for line in proc.stdout.splitlines() if label in line]
    assert summary.split("\u2502")[3].strip() == "300"  # the records column, after the label
    assert f"{LONG_TENANT}={job_id}" in proc.stdout and "\u2026" not in proc.stdout


def test_an_interrupted_run_says_what_it_left_and_recover_finishes_it(
        tmp_path: Path) -> None:
    records = 1500
    with serve(DemoApi(records, page_delay=0.5)) as server:  # slow: the run is still going
        pipeline = write_pipeline(tmp_path / "interrupted.yaml", server.base_url, "crm",
                                  "contacts, companies", "acme", tenant_token("acme"),
                                  "local://?workers=2", ", page_size: 100, pages_per_chunk: 1")
        proc = subprocess.Popen(
            [sys.executable, "-c", "from canonflow.cli import main; main()", "run",
             str(pipeline)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            start_new_session=True)
        wait_for_a_job(tmp_path / "data" / "state.db", proc)
        time.sleep(1.0)
        assert proc.poll() is None, "the run ended before it could be interrupted"
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C: the whole process group, workers too
        # the pool's workers hold the same pipes: communicate returns once they are gone
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 130, err
        assert "Traceback" not in err
        (line,) = [x for x in err.splitlines() if x.startswith("interrupted")]
        (job_id,) = re.findall(r"acme=(job-\S+)", line)
        assert f"canonflow recover --pipeline {pipeline} --older-than 0" in line

        recovered = cli("recover", "--pipeline", str(pipeline), "--older-than", "0", "--json")
        assert recovered.returncode == 0, recovered.stderr
        assert json.loads(recovered.stdout)["jobs_resumed"] == 1
    status = json.loads(cli("status", "--data-dir", str(tmp_path / "data"), "--json",
                            job_id).stdout)
    assert (status["status"], status["outcome"]) == ("done", "completed")
    for table in ("contacts", "companies"):
        t = status["tables"][f"acme/crm.{table}"]
        assert (t["records_extracted"], t["records_canonical"]) == (records, records), t
        assert t["transforms_triggered"] == 1
    count = cli("query", "--data-dir", str(tmp_path / "data"), "--json",
                "SELECT count(*) AS n, count(DISTINCT id) AS ids FROM contact")
    assert json.loads(count.stdout) == [{"n": records, "ids": records}]


def test_a_worker_that_cannot_start_is_one_line_after_no_traceback(
        tmp_path: Path, demo_server: DemoServer) -> None:
    pipeline = write_pipeline(tmp_path / "workers.yaml", demo_server.base_url, "crm",
                              "companies", "acme", tenant_token("acme"), "local://?workers=2")
    # what the workers receive: settings they cannot read (the parent's are fine)
    proc = subprocess.run(
        [sys.executable, "-c", "from canonflow.config import Settings; "
         "Settings.to_worker_json = lambda self: '{\"batch_records\": \"not a number\"}'; "
         "from canonflow.cli import main; main()", "run", str(pipeline)],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    (line,) = [x for x in proc.stderr.splitlines() if x.startswith("error:")]
    assert line == ("error: a local worker could not start: its settings do not validate: "
                    "at batch_records: Input should be a valid integer, unable to parse "
                    "string as an integer; fix that and run the command again (unfinished "
                    "jobs resume)")
    assert line == proc.stderr.strip().splitlines()[-1]
