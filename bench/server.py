"""Run the demo API in its own process (so its page cache never counts as canonflow's
memory), and stop it by PID."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def demo_api(records_per_table: int, tenants: list[str], page_size: int) -> Iterator[str]:
    cmd = [sys.executable, "-c", "from canonflow.cli import main; main()", "demo-api",
           "--records", str(records_per_table), "--port", "0", "--page-size", str(page_size)]
    for t in tenants:
        cmd += ["--prerender", t]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        base_url = proc.stdout.readline().strip()
        if not base_url.startswith("http://127.0.0.1:"):
            raise RuntimeError(f"demo API did not start (exit {proc.poll()})")
        yield base_url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
