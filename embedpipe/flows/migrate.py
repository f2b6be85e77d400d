"""The re-index migration as a Prefect flow: plan, prepare, backfill slices, catch-up,
validation (with a table artifact), cutover.

Run it through ``embedpipe migrate`` or call :func:`run_migration`. With
``PREFECT_API_URL`` unset Prefect starts its temporary local server; with it set, the
run reports to that server. Tasks are batches (a slice of up to
``migration.slice_size`` documents each), never single documents. Results are not
persisted: they are small reports, and nothing a task returns should reach storage
that a user did not ask for.

The tasks share one :class:`embedpipe.migration.Migration` object and run in the
flow's process (the embedded engine allows one process per data directory).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NONE

from embedpipe.config import Settings, load_settings
from embedpipe.errors import MigrationError, ValidationFailed
from embedpipe.execution import resolve_executor
from embedpipe.migration import Migration, ProgressFactory, migration_lock
from embedpipe.validation import ValidationReport
from embedpipe.flows._prefect import check_prefect, slug

__all__ = ["check_prefect", "migrate_flow", "run_migration"]

# Set by run_migration for the caller's progress (the CLI's bar, a server job's record),
# by index: a server may run migrations of two indexes at once; one index has one
# migration at a time (its migrate lock). Tasks run in the flow's process.
_progress: dict[str, ProgressFactory] = {}

_task = task(cache_policy=NONE, persist_result=False, retries=0)


@_task(name="plan", task_run_name="plan")
def plan_task(m: Migration) -> dict[str, Any]:
    plan = m.plan()
    plan.keep_probe(m.settings)
    return plan.to_dict()


@_task(name="prepare", task_run_name="prepare")
def prepare_task(m: Migration) -> list[str]:
    """Create or resume the new version; returns the documents it still needs."""
    m.prepare()
    return m.todo()


@_task(name="backfill", task_run_name="backfill-{number}")
def backfill_task(m: Migration, ids: list[str], number: int, advance: Any = None,
                  ahead: Any = None) -> dict[str, int]:
    """Write one slice into the new version; with ``ahead`` (Ray) its vectors come from
    the cluster, embedded in the background while earlier slices write."""
    stats = m.backfill(ids, progress=advance, ahead=ahead, number=number - 1)
    return {"written": stats.written, "embedded": stats.embedded, "reused": stats.reused,
            "failed": len(stats.failures)}


@_task(name="catch-up", task_run_name="catch-up")
def catch_up_task(m: Migration) -> dict[str, int]:
    stats = m.catch_up()
    return {"written": stats.written, "deleted": stats.deleted, "embedded": stats.embedded}


@_task(name="validate", task_run_name="validate")
def validate_task(m: Migration, golden: str | None, tolerance: float | None) -> ValidationReport:
    report = m.validate(Path(golden) if golden else None, tolerance)
    create_table_artifact(
        table=report.table(),
        key=f"validation-{slug(m.target.collection if m.target else m.index)}",
        description=(
            f"Validation of {report.new_collection} against {report.old_collection}: "
            f"{'PASSED' if report.checks_passed else 'FAILED'}"
            + (" (cut over with --force)" if report.forced else "")
            + ("" if report.old_can_query else f". Old model cannot embed queries: {report.old_reason}")
        ),
    )
    return report


@_task(name="cutover", task_run_name="cutover")
def cutover_task(m: Migration, report: ValidationReport) -> None:
    m.cutover(report)


@flow(name="embedpipe-migrate", flow_run_name="migrate-{index}-to-{to}", persist_result=False,
      validate_parameters=False)
def migrate_flow(
    index: str,
    to: str,
    config: str | None = None,
    golden: str | None = None,
    force: bool = False,
    tolerance: float | None = None,
    plan: dict[str, Any] | None = None,
    executor: str | None = None,
    resubmit: bool = True,
) -> dict[str, Any]:
    """Move ``index`` to profile ``to``; returns the migration report as a dict.
    ``executor`` ("local", "ray", "batch"; default ``[execution] engine``) embeds the
    backfill; ``resubmit``: a batch run submits again what failed, expired or cancelled
    batches did not complete (else reports it)."""
    settings = load_settings(config)
    with migration_lock(settings, index):
        m = Migration(settings, index, to, force=force)
        progress = _progress.get(index)
        m.progress = progress
        plan = plan or plan_task(m)
        todo = prepare_task(m)
        executor = resolve_executor(settings, executor)
        advance = progress(len(todo)) if progress and todo else None
        slices = m.slices(todo)
        # the backfill bar tracks both: with Ray its works wait for the cluster's vectors
        with m.embed_ahead(slices, executor, resubmit=resubmit) as ahead:  # a no-op for "local"
            for number, ids in enumerate(slices, start=1):
                backfill_task(m, ids, number, advance, ahead if ahead.active else None)
        catch_up_task(m)
        report = validate_task(m, golden, tolerance)
        try:
            cutover_task(m, report)
        except MigrationError as exc:  # the report (with every failure's reason) still lands
            status = "validation_failed" if isinstance(exc, ValidationFailed) else "failed"
            exc.report = m.report(status, report, plan).to_dict()  # type: ignore[attr-defined]
            raise
        return m.report("live", report, plan).to_dict()


def run_migration(
    settings: Settings,
    index: str,
    to: str,
    golden: Path | None = None,
    force: bool = False,
    tolerance: float | None = None,
    plan: dict[str, Any] | None = None,
    progress: ProgressFactory | None = None,
    executor: str | None = None,
    resubmit: bool = True,
) -> dict[str, Any]:
    """Run :func:`migrate_flow` in this process; errors propagate as embedpipe errors."""
    check_prefect()
    if progress is not None:
        _progress[index] = progress
    try:
        return migrate_flow(
            index=index,
            to=to,
            config=str(settings.config_path) if settings.config_path else None,
            golden=str(golden) if golden else None,
            force=force,
            tolerance=tolerance,
            plan=plan,
            executor=executor,
            resubmit=resubmit,
        )
    finally:
        _progress.pop(index, None)
