"""Running one job in a test: a pipeline's single tenant, driven to its end."""

from __future__ import annotations

from canonflow.config import Settings
from canonflow.dispatch import open_dispatcher
from canonflow.runner import JobRunner
from canonflow.runtime import Runtime


def run_job(settings: Settings) -> tuple[Runtime, str]:
    """The job's runtime (open: the caller reads the job through it, then closes it) and
    the job id."""
    rt = Runtime(settings)
    dispatcher = open_dispatcher(settings.dispatcher, settings)
    try:
        (job_id,) = JobRunner(settings, rt, dispatcher).run()
    finally:
        dispatcher.close()
    return rt, job_id
