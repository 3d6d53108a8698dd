"""A local worker that cannot start reports why in a file its parent may read at any moment
(while the first tasks are submitted): the file must appear whole or not at all."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from canonflow import jsonio
from canonflow.dispatch import tasks


class Exited(Exception):
    pass


def test_the_start_failure_report_appears_whole(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    report = tmp_path / "start-failure"
    seen: list[tuple[bool, Any]] = []
    replace = os.replace

    def watched(src: Any, dst: Any) -> None:
        # the moment the report appears: before it, no file a reader could find half done
        seen.append((Path(dst).exists(), jsonio.loads(Path(src).read_bytes())))
        replace(src, dst)

    def exit_(code: int) -> None:
        raise Exited(code)

    monkeypatch.setattr(tasks.os, "replace", watched)
    monkeypatch.setattr(tasks.os, "_exit", exit_)
    with pytest.raises(Exited):
        tasks.init_worker('{"batch_records": "not a number"}', report_failure=str(report))
    ((existed, payload),) = seen
    assert not existed
    assert payload["retryable"] is False and "batch_records" in payload["message"]
    assert jsonio.loads(report.read_bytes()) == payload
    assert [p.name for p in tmp_path.iterdir()] == ["start-failure"]  # no partial left
