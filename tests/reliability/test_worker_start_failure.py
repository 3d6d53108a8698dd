"""A local worker that cannot start (its settings, its stores) fails the run with its reason
in one line; the pool is not started again and again, and no traceback is printed."""

from __future__ import annotations

import time

import pytest

from canonflow.config import Settings
from canonflow.dispatch.local import LocalDispatcher
from canonflow.errors import TerminalError
from canonflow.runner import JobRunner
from canonflow.runtime import Runtime
from tests.conftest import SettingsFactory


def test_a_worker_that_cannot_start_fails_the_run_with_its_reason(
        make_settings: SettingsFactory, monkeypatch: pytest.MonkeyPatch,
        capfd: pytest.CaptureFixture[str]) -> None:
    settings = make_settings(tables={"crm": ["companies"]}, dispatcher="local://?workers=2")
    rt = Runtime(settings)
    # what the workers receive: settings they cannot read (the parent's are fine)
    monkeypatch.setattr(Settings, "to_worker_json",
                        lambda self: '{"batch_records": "not a number"}')
    dispatcher = LocalDispatcher(settings.dispatcher, settings)
    started = time.monotonic()
    try:
        with pytest.raises(TerminalError, match=r"a local worker could not start: .*"
                                                r"batch_records"):
            JobRunner(settings, rt, dispatcher).run()
    finally:
        dispatcher.close()
        rt.close()
    assert time.monotonic() - started < 60
    assert "Traceback" not in capfd.readouterr().err
