"""Syncing an index from its source as a Prefect flow: read the source, apply the
changes, record the run (a markdown artifact and the run log).

``embedpipe sync`` runs it once (through Prefect when ``PREFECT_API_URL`` names a
server, else the same steps in-process); ``embedpipe schedule`` serves it as one
deployment per index with a cron schedule (``embedpipe/flows/schedule.py``). The logic is in
``embedpipe.sync``; the tasks are its two steps, each a whole batch of work.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NONE

from embedpipe.config import load_settings
from embedpipe.ingest import ProgressFactory
from embedpipe.layout import check_index_name
from embedpipe.sync import Staged, SyncReport, apply, read_source, recorded
from embedpipe.flows._prefect import check_prefect, slug

__all__ = ["SERVED_ENV", "artifact_markdown", "check_served_parameters", "run_sync", "sync_flow"]

# Set by run_sync for the caller's progress (the CLI's bar, a server job's record), by
# index: a server may sync several indexes at once. Tasks run in the flow's process.
_progress: dict[str, ProgressFactory] = {}

_task = task(cache_policy=NONE, persist_result=False, retries=0)


@_task(name="read-source", task_run_name="read-source-{index}")
def read_task(settings: Any, index: str, dry_run: bool = False) -> Staged:
    return read_source(settings, index, dry_run)


@_task(name="apply-changes", task_run_name="apply-changes-{index}")
def apply_task(settings: Any, index: str, staged: Staged, allow_mass_delete: bool, dry_run: bool) -> SyncReport:
    return apply(settings, index, staged, allow_mass_delete=allow_mass_delete, dry_run=dry_run,
                 progress=_progress.get(index))


@flow(name="sync-index", flow_run_name="sync-{index}", persist_result=False, validate_parameters=False)
def sync_flow(
    index: str, config: str | None = None, allow_mass_delete: bool = False, dry_run: bool = False
) -> dict[str, Any]:
    """Sync ``index`` from the source under ``[indexes.<index>]`` of ``config``; returns the
    run's summary (added, updated, deleted, unchanged, failed, embedded, tokens, seconds)."""
    check_served_parameters(index, config, allow_mass_delete, dry_run)
    settings = load_settings(config)
    check_index_name(index)  # before anything is recorded under that name
    report = recorded(settings, index, dry_run, lambda: apply_task(
        settings, index, read_task(settings, index, dry_run), allow_mass_delete, dry_run))
    create_markdown_artifact(
        markdown=artifact_markdown(report),
        key=f"sync-{slug(index)}",
        description=f"sync of {index}: {report.status}",
    )
    return report.to_dict()


# Set by `embedpipe schedule` for the runs it serves (its child processes): the config
# and indexes it serves, the only parameters a deployment run may carry.
SERVED_ENV = "EMBEDPIPE_SERVED_SCHEDULE"


def check_served_parameters(index: str, config: str | None, allow_mass_delete: bool,
                            dry_run: bool) -> None:
    """Refuse a deployment run whose parameters are not the ones ``embedpipe schedule``
    fixed. Anyone who can reach the Prefect API can start a deployment run with other
    parameters; the serving process, not the API, is the authority on what a scheduled
    sync may do: its index and config, never ``allow_mass_delete``. Runs that are not
    deployment runs (``embedpipe sync``) pass."""
    import json
    import os

    from prefect.runtime import deployment

    if not deployment.id:
        return
    served = json.loads(os.environ.get(SERVED_ENV) or "{}")
    problems = []
    if not served:
        problems.append("it was not started by `embedpipe schedule`")
    if allow_mass_delete:
        problems.append("allow_mass_delete = true (run `embedpipe sync --allow-mass-delete` by hand)")
    if dry_run:
        problems.append("dry_run = true")
    if served and config != served.get("config"):
        problems.append("config is not the file `embedpipe schedule` serves")
    if served and (index not in served.get("indexes", []) or deployment.name != f"sync-{index}"):
        problems.append(f"index {index!r} is not the index of deployment {deployment.name!r}")
    if problems:
        from embedpipe.errors import ConfigError

        raise ConfigError("refusing a scheduled sync with parameters it may not carry: "
                          + "; ".join(problems) + "; nothing was read or written")


def artifact_markdown(report: SyncReport) -> str:
    """The run's summary as a markdown table (what Prefect's UI shows), failures below."""
    rows = [("source", report.source), ("collection", report.collection or "-"),
            ("status", report.status + (" (dry run)" if report.dry_run else ""))]
    rows += [(k, str(getattr(report, k))) for k in (
        "added", "updated", "deleted", "unchanged", "failed", "embedded", "reused", "tokens")]
    rows.append(("duration", f"{report.seconds:.2f} s"))
    lines = [f"# sync of `{report.index}`", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {_cell(v)} |" for k, v in rows]
    if report.failures:
        lines += ["", f"## failures ({len(report.failures)})", ""]
        lines += [f"- `{f.get('path') or f.get('id')}`: {_cell(f['reason'])}" for f in report.failures[:50]]
    for warning in report.warnings:
        lines += ["", f"> warning: {_cell(warning)}"]
    return "\n".join(lines)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def run_sync(
    settings: Any,
    index: str,
    allow_mass_delete: bool = False,
    dry_run: bool = False,
    progress: ProgressFactory | None = None,
) -> dict[str, Any]:
    """Run :func:`sync_flow` in this process (reporting to PREFECT_API_URL's server)."""
    check_prefect()
    if progress is not None:
        _progress[index] = progress
    try:
        return sync_flow(
            index=index,
            config=str(settings.config_path) if settings.config_path else None,
            allow_mass_delete=allow_mass_delete,
            dry_run=dry_run,
        )
    finally:
        _progress.pop(index, None)
