"""The deprecation watch as a Prefect flow: check every live index's model, record the
report as a markdown artifact, log one warning per action.

``embedpipe schedule`` serves it as the deployment ``deprecation-watch/watch`` on
``[watch] schedule`` (or ``--watch-cron``); a run can be started by hand with
``prefect deployment run deprecation-watch/watch``. The logic is
:func:`embedpipe.watch.watch` (which goes through ``embedpipe serve`` when one owns the
data directory); ``embedpipe watch`` runs it without Prefect. A run that finds something
to do still completes: the artifact ``deprecation-watch`` and the run's WARNING logs say
what (a Prefect automation can act on either); only a watch that cannot run at all fails.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NONE

from embedpipe.config import load_settings
from embedpipe.watch import WatchReport, describe_plan, watch
from embedpipe.flows._prefect import check_prefect

__all__ = ["ARTIFACT_KEY", "FLOW_NAME", "check_served_watch", "report_markdown", "run_watch", "watch_flow"]

FLOW_NAME = "deprecation-watch"
ARTIFACT_KEY = "deprecation-watch"


@task(name="check-indexes", task_run_name="check-indexes", cache_policy=NONE, persist_result=False, retries=0)
def check_task(settings: Any, warn_days: int | None) -> WatchReport:
    """Every live index, one batch: the catalogue, the provider, the plan, the adapter."""
    return watch(settings, warn_days=warn_days)


@flow(name=FLOW_NAME, flow_run_name=FLOW_NAME, persist_result=False, validate_parameters=False)
def watch_flow(config: str | None = None, warn_days: int | None = None) -> dict[str, Any]:
    """Check the model of every live index of ``config``'s data directory; returns the
    report (what ``embedpipe watch --json`` prints)."""
    check_served_watch(config)
    settings = load_settings(config)
    report = check_task(settings, warn_days)
    need = sum(row.needs_action for row in report.rows)
    create_markdown_artifact(
        markdown=report_markdown(report),
        key=ARTIFACT_KEY,
        description=f"deprecation watch: {need} of {len(report.rows)} indexes need action",
    )
    logger = get_run_logger()
    for action in report.actions:
        logger.warning("%s", action)
    if not report.needs_action:
        logger.info("deprecation watch: nothing needs doing (%d indexes checked)", len(report.rows))
    return report.to_dict()


def check_served_watch(config: str | None) -> None:
    """Refuse a deployment run of the watch that ``embedpipe schedule`` did not set up, or
    with another config file: the serving process, not the Prefect API, decides which data
    directory a scheduled run reads (as for the sync deployments)."""
    import json
    import os

    from prefect.runtime import deployment

    from embedpipe.flows.ingest import SERVED_ENV

    if not deployment.id:
        return
    served = json.loads(os.environ.get(SERVED_ENV) or "{}")
    problems = []
    if not served.get("watch"):
        problems.append("it was not started by `embedpipe schedule` serving the watch")
    elif config != served.get("config"):
        problems.append("config is not the file `embedpipe schedule` serves")
    if problems:
        from embedpipe.errors import ConfigError

        raise ConfigError("refusing a scheduled deprecation watch: " + "; ".join(problems)
                          + "; nothing was checked")


def report_markdown(report: WatchReport) -> str:
    """The report as Prefect's UI shows it: a table, then the actions."""
    need = sum(row.needs_action for row in report.rows)
    lines = [f"# deprecation watch: {need} of {len(report.rows)} indexes need action", "",
             f"checked {report.checked_at}, warn_days {report.warn_days}", ""]
    if not report.rows:
        lines.append("no live index to watch")
    else:
        lines += ["| index | profile (model) | status | days left | plan | adapter |",
                  "|---|---|---|---|---|---|"]
        for r in report.rows:
            plan = describe_plan(r.plan) if r.plan else (f"no plan: {r.plan_error}" if r.plan_error else "-")
            status = r.status + (" (needs action)" if r.needs_action else "")
            cells = [r.index, f"{r.profile} ({r.model or '?'})", status,
                     "-" if r.days_left is None else str(r.days_left), plan, r.adapter_note]
            lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    reasons = [f"- `{r.index}`: {_cell(reason)}" for r in report.rows for reason in r.reasons]
    if reasons:
        lines += ["", "## findings", "", *reasons]
    if report.actions:
        lines += ["", "## actions", "", *[f"- {_cell(a)}" for a in report.actions]]
    return "\n".join(lines)


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def run_watch(settings: Any, warn_days: int | None = None) -> dict[str, Any]:
    """Run :func:`watch_flow` in this process (reporting to PREFECT_API_URL's server)."""
    check_prefect()
    return watch_flow(config=str(settings.config_path) if settings.config_path else None,
                      warn_days=warn_days)
