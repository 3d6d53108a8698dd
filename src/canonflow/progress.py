"""Progress bars (rich) for long runs: one bar per table's chunks, one for transforms."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)

from canonflow.model import ChunkSpec, TableRef, TransformRequest
from canonflow.plan import JobPlan


class RichProgress:
    """Shown from the moment the jobs are planned: a run that fails before (a store that
    does not open) prints its one error line and nothing else."""

    def __init__(self, console: Console) -> None:
        self._progress = Progress(
            TextColumn("{task.description:<34}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[records]:>9} records"), TimeElapsedColumn(),
            console=console, transient=False,
        )
        self._tables: dict[TableRef, TaskID] = {}
        self._transforms: TaskID | None = None
        self._records: dict[TableRef, int] = {}
        self._started = False

    def __enter__(self) -> RichProgress:
        return self

    def __exit__(self, *_exc: object) -> None:
        if self._started:
            self._progress.stop()

    def planned(self, plans: list[JobPlan]) -> None:
        counts: dict[TableRef, int] = {}
        for plan in plans:
            for spec in plan.chunks:
                counts[spec.table] = counts.get(spec.table, 0) + 1
        if not self._started:
            self._progress.start()
            self._started = True
        for table, n in counts.items():
            self._records[table] = 0
            self._tables[table] = self._progress.add_task(table.label, total=n, records=0)
        if self._transforms is None:
            self._transforms = self._progress.add_task("canonical transforms", total=0,
                                                       records="")

    def chunk_done(self, spec: ChunkSpec, result: dict[str, Any]) -> None:
        self._records[spec.table] += int(result.get("records_processed", 0))
        self._progress.update(self._tables[spec.table], advance=1,
                              records=self._records[spec.table])

    def transform_submitted(self, request: TransformRequest) -> None:
        if self._transforms is not None:
            total = self._progress.tasks[self._transforms].total or 0
            self._progress.update(self._transforms, total=total + 1)

    def transform_done(self, request: TransformRequest) -> None:
        if self._transforms is not None:
            self._progress.update(self._transforms, advance=1)
