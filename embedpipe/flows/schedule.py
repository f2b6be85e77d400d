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

The deprecation watch (:mod:`embedpipe.flows.watch`) is served beside them as
``deprecation-watch/watch`` when ``[watch] schedule = "CRON"`` is set (and neither
``--index`` nor ``--cron`` narrows the command to one index), or on ``--watch-cron
"CRON"``; with no index scheduled, it is served alone. It allows one run at a time too.
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
WATCH_DEPLOYMENT = "watch"  # deprecation-watch/watch: embedpipe.flows.watch.watch_flow
CRON_HELP = 'five fields, minute hour day-of-month month day-of-week, in UTC; e.g. "0 * * * *" is hourly'


def deployment_name(index: str) -> str:
    """The deployment of ``index``'s sync; Prefect calls it ``sync-index/sync-INDEX``."""
    return f"sync-{index}"


def validate_cron(expr: str, index: str, owner: str | None = None) -> str:
    """``expr`` if Prefect accepts it as a cron schedule, else a ConfigError naming the index
    (or ``owner``, e.g. ``"[watch]"``)."""
    try:
        CronSchedule(cron=expr)
    except ValidationError as exc:
        raise ConfigError(f"{owner or f'index {index!r}'}: schedule {expr!r} is not a valid cron "
                          f"expression ({CRON_HELP})") from exc
    return expr


def _where(settings: Settings) -> str:
    return str(settings.config_path or "embedpipe.toml")


def _watch_schedule(settings: Settings, index: str | None, cron: str | None,
                    watch_cron: str | None) -> str | None:
    """The cron of the deprecation watch to serve, or None: ``--watch-cron``, else
    ``[watch] schedule`` unless the command serves one index only."""
    if watch_cron is not None:
        return validate_cron(watch_cron, "", owner="--watch-cron")
    if index is None and cron is None and settings.watch.schedule is not None:
        return validate_cron(settings.watch.schedule, "", owner=f"[watch] in {_where(settings)}")
    return None


def _scheduled(settings: Settings, index: str | None, cron: str | None,
               watching: bool = False) -> dict[str, str]:
    """index -> cron for what should be served (none at all is fine when the watch is
    served); every problem is a one-line ConfigError."""
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
    if not planned and not watching:
        raise ConfigError(
            f"no index has a schedule in {where}; add schedule = \"0 * * * *\" (cron, UTC) under "
            "[indexes.NAME] next to its source, or pass --index NAME --cron \"EXPR\"; [watch] "
            "schedule = \"0 6 * * *\" serves the deprecation watch"
        )
    return planned


def deployments(settings: Settings, index: str | None = None, cron: str | None = None,
                watch_cron: str | None = None) -> list[RunnerDeployment]:
    """The sync deployments to serve: every index with a schedule, or only ``index``
    (on ``cron`` when given, else its configured schedule); then the deprecation watch's
    (see the module docstring).

    Nothing is sent to Prefect here; :func:`prefect.serve` registers them.
    """
    watching = _watch_schedule(settings, index, cron, watch_cron)
    planned = _scheduled(settings, index, cron, watching=watching is not None)
    from prefect.types.entrypoint import EntrypointType

    from embedpipe.flows.ingest import sync_flow

    config = str(settings.config_path) if settings.config_path else None
    one_at_a_time = ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.CANCEL_NEW)
    served = [
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
    if watching is not None:
        from embedpipe.flows.watch import watch_flow

        served.append(watch_flow.to_deployment(
            name=WATCH_DEPLOYMENT,
            cron=watching,
            parameters={"config": config},
            concurrency_limit=one_at_a_time,
            tags=["embedpipe", "deprecation-watch"],
            description=(f"Deprecation watch of every live index on cron {watching!r} (UTC): the "
                         "catalogue's dates, the provider's /v1/models and a probe, the migration plan "
                         "and the adapter; the artifact deprecation-watch lists what needs doing."),
            entrypoint_type=EntrypointType.MODULE_PATH,
        ))
    return served


def serve_schedules(settings: Settings, index: str | None = None, cron: str | None = None,
                    watch_cron: str | None = None) -> None:
    """Serve the sync deployments and the watch's (see :func:`deployments`) until interrupted.

    The config is checked before the server, so a config mistake is reported first.
    On exit Prefect pauses the served schedules; the next ``embedpipe schedule``
    resumes them.
    """
    served = deployments(settings, index=index, cron=cron, watch_cron=watch_cron)
    url = check_prefect(require_server=True)
    import json
    import os

    from prefect import serve

    from embedpipe.flows.ingest import SERVED_ENV

    # The runs are this process's children: what they may be asked to do is fixed here,
    # whatever parameters a deployment run arrives with (see check_served_parameters).
    os.environ[SERVED_ENV] = json.dumps({
        "config": served[0].parameters["config"],
        "indexes": [d.parameters["index"] for d in served if "index" in d.parameters],
        "watch": any(d.name == WATCH_DEPLOYMENT for d in served)})

    for deployment in served:
        if "index" not in deployment.parameters:
            print(f"serving deprecation-watch/{deployment.name}: every live index, cron "
                  f"{_cron_of(deployment)!r} (UTC)", flush=True)
            continue
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
