"""Scheduled sync: one Prefect deployment per index that has a ``schedule``, served here.

Each index with ``schedule = "CRON"`` (and a ``source``) under ``[indexes.NAME]`` in
embedpipe.toml becomes the deployment ``sync-index/sync-NAME``: the ``sync-index`` flow
(:func:`embedpipe.flows.ingest.sync_flow`) with ``index`` and ``config`` fixed, run on that cron
(five fields, UTC). ``embedpipe schedule`` serves them all and blocks; each run is a
fresh process that re-reads the config, so a changed source or profile is picked up by
the next run, while a changed schedule needs a restart of the command.

Schedules need a real Prefect server: the temporary server Prefect starts on its own
has no scheduler and goes away with the process. Run::

    prefect server start                                        # one terminal
    PREFECT_API_URL=http://127.0.0.1:4200/api embedpipe schedule  # another

``embedpipe schedule --index NAME --cron "*/15 * * * *"`` serves one index on a cron
given on the command line. A run can also be started by hand while the command serves:
``prefect deployment run sync-index/sync-NAME``.

Each deployment allows one run at a time; a run that comes due while the previous one
is still going is cancelled (``CANCEL_NEW``) rather than queued, so a slow sync never
piles up a backlog. Scheduled runs never pass ``allow_mass_delete``: a sync that would
delete most of an index fails and waits for ``embedpipe sync --allow-mass-delete``. A
deployment run started through the Prefect API with other parameters (``allow_mass_delete
= true``, ``dry_run``, another ``config`` or ``index``) is refused before anything is read:
the serving process, not the API, decides what a scheduled run may do.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
from prefect.client.schemas.schedules import CronSchedule
from pydantic import ValidationError

from embedpipe.config import Settings
from embedpipe.errors import ConfigError
from embedpipe.flows._prefect import check_prefect

if TYPE_CHECKING:
    from prefect.deployments.runner import RunnerDeployment

__all__ = ["deployment_name", "deployments", "serve_schedules", "validate_cron"]

FLOW_NAME = "sync-index"  # the name of embedpipe.flows.ingest.sync_flow
CRON_HELP = 'five fields, minute hour day-of-month month day-of-week, in UTC; e.g. "0 * * * *" is hourly'


def deployment_name(index: str) -> str:
    """The deployment of ``index``'s sync; Prefect calls it ``sync-index/sync-INDEX``."""
    return f"sync-{index}"


def validate_cron(expr: str, index: str) -> str:
    """``expr`` if Prefect accepts it as a cron schedule, else a ConfigError naming the index."""
    try:
        CronSchedule(cron=expr)
    except ValidationError as exc:
        raise ConfigError(f"index {index!r}: schedule {expr!r} is not a valid cron expression ({CRON_HELP})") from exc
    return expr


def _where(settings: Settings) -> str:
    return str(settings.config_path or "embedpipe.toml")


def _scheduled(settings: Settings, index: str | None, cron: str | None) -> dict[str, str]:
    """index -> cron for what should be served; every problem is a one-line ConfigError."""
    where = _where(settings)
    if index is None and cron is not None:
        sourced = sorted(name for name, cfg in settings.indexes.items() if cfg.source is not None)
        if len(sourced) != 1:
            raise ConfigError(
                "--cron sets the schedule of one index; add --index NAME"
                + (f" (indexes with a source: {', '.join(sourced)})" if sourced else "")
            )
        index = sourced[0]
    if index is not None:
        cfg = settings.indexes.get(index)
        if cfg is None or cfg.source is None:
            raise ConfigError(
                f"index {index!r} has no source to sync; set source = \"PATH\" under [indexes.{index}] in {where}"
            )
        expr = cron if cron is not None else cfg.schedule
        if expr is None:
            raise ConfigError(
                f"index {index!r} has no schedule; set schedule = \"0 * * * *\" under [indexes.{index}] "
                f"in {where} or pass --cron \"EXPR\""
            )
        return {index: validate_cron(expr, index)}
    planned: dict[str, str] = {}
    for name, cfg in sorted(settings.indexes.items()):
        if cfg.schedule is None:
            continue
        if cfg.source is None:
            raise ConfigError(
                f"index {name!r} has a schedule but no source to sync; set source = \"PATH\" under "
                f"[indexes.{name}] in {where}"
            )
        planned[name] = validate_cron(cfg.schedule, name)
    if not planned:
        raise ConfigError(
            f"no index has a schedule in {where}; add schedule = \"0 * * * *\" (cron, UTC) under "
            "[indexes.NAME] next to its source, or pass --index NAME --cron \"EXPR\""
        )
    return planned


def deployments(settings: Settings, index: str | None = None, cron: str | None = None) -> list[RunnerDeployment]:
    """The sync deployments to serve: every index with a schedule, or only ``index``
    (on ``cron`` when given, else its configured schedule).

    Nothing is sent to Prefect here; :func:`prefect.serve` registers them.
    """
    planned = _scheduled(settings, index, cron)
    from prefect.types.entrypoint import EntrypointType

    from embedpipe.flows.ingest import sync_flow

    config = str(settings.config_path) if settings.config_path else None
    one_at_a_time = ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.CANCEL_NEW)
    return [
        sync_flow.to_deployment(
            name=deployment_name(name),
            cron=expr,
            parameters={"index": name, "config": config},
            concurrency_limit=one_at_a_time,
            tags=["embedpipe", f"index:{name}"],
            description=(
                f"Sync index {name!r} from {settings.indexes[name].source} on cron {expr!r} (UTC): "
                "new, changed and deleted documents; unchanged ones are not re-embedded. "
                "A run due while another is going is cancelled."
            ),
            # Imported by module path, so runs start from any working directory.
            entrypoint_type=EntrypointType.MODULE_PATH,
        )
        for name, expr in planned.items()
    ]


def serve_schedules(settings: Settings, index: str | None = None, cron: str | None = None) -> None:
    """Serve the sync deployments (see :func:`deployments`) until interrupted.

    The config is checked before the server, so a config mistake is reported first.
    On exit Prefect pauses the served schedules; the next ``embedpipe schedule``
    resumes them.
    """
    served = deployments(settings, index=index, cron=cron)
    url = check_prefect(require_server=True)
    import json
    import os

    from prefect import serve

    from embedpipe.flows.ingest import SERVED_ENV

    # The runs are this process's children: what they may be asked to do is fixed here,
    # whatever parameters a deployment run arrives with (see check_served_parameters).
    os.environ[SERVED_ENV] = json.dumps({
        "config": served[0].parameters["config"],
        "indexes": [d.parameters["index"] for d in served]})

    for deployment in served:
        name = deployment.parameters["index"]
        print(
            f"serving {FLOW_NAME}/{deployment.name}: index {name!r} from "
            f"{settings.indexes[name].source}, cron {_cron_of(deployment)!r} (UTC)",
            flush=True,
        )
    print(f"Prefect server: {url}; stop with Ctrl+C", flush=True)
    serve(*served)


def _cron_of(deployment: RunnerDeployment) -> str:
    return next((getattr(s.schedule, "cron", "") for s in deployment.schedules or []), "")
