"""The deprecation watch as the Prefect flow ``deprecation-watch``: its markdown artifact
on Prefect's test server, its deployment beside the sync ones, and a scheduled run served
by a real ``embedpipe schedule`` against a real ``prefect server start``.

The checks themselves are tested without Prefect in tests/test_watch.py.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest

from embedpipe.engine import close_all
from embedpipe.errors import ConfigError
from embedpipe.ingest import ingest

from conftest import LOOPBACK_KEY, hosted_profile_toml, prefect_records, static_profile_toml, write_config, write_jsonl
from test_schedule import (  # noqa: F401 - prefect_server is a fixture
    YEARLY,
    _prefect_api,
    assert_completed,
    prefect_server,
    run_logs,
    serving,
    trigger,
    wait_for_deployment,
    wait_for_runs,
)

MODEL = "text-embedding-3-small"
DOCS = [{"id": f"d{n}", "text": f"Note {n}: {topic}."}
        for n, topic in enumerate(["glaciers carve valleys", "compilers emit code", "lava flows downhill"])]
WATCH = "deprecation-watch/watch"


def _day(offset: int) -> str:
    return (dt.date.today() + dt.timedelta(days=offset)).isoformat()


@pytest.mark.timeout(600)
def test_the_flow_records_the_report_as_a_markdown_artifact(prefect_api: str, make_settings, openai_server,
                                                             static_model_dir: Path, tmp_path: Path) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogHandler

    from embedpipe.flows.watch import run_watch

    openai_server.load_model()
    replaced = 'deprecation = { replacement = "static" }\n'
    settings = make_settings(hosted_profile_toml(openai_server.base_url, extra=replaced)
                             + static_profile_toml(static_model_dir))
    ingest(settings, "docs", write_jsonl(tmp_path / "docs.jsonl", DOCS), profile="hosted")
    openai_server.retire(MODEL, 410)

    report = run_watch(settings)
    assert report["needs_action"] is True and report["rows"][0]["status"] == "retired"

    run, tasks, artifacts = prefect_records("deprecation-watch")
    assert run.state.is_completed()  # something to do is a finding, not a failure
    assert [t.name for t in tasks] == ["check-indexes"]
    (artifact,) = [a for a in artifacts if a.key == "deprecation-watch"]
    assert artifact.type == "markdown"
    assert artifact.description == "deprecation watch: 1 of 1 indexes need action"
    assert f"| docs | hosted ({MODEL}) | retired (needs action) | 0 | {len(DOCS)} docs to embed" in artifact.data
    assert "- docs: migrate: `embedpipe migrate --to static --index docs`" in artifact.data
    assert "HTTP 410" in artifact.data
    APILogHandler().flush()  # the run's logs reach the server in the background
    with get_client(sync_client=True) as client:
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run.id])))
    warned = [entry.message for entry in logs if entry.level >= 30]
    assert any("embedpipe migrate --to static --index docs" in m for m in warned)
    for text in (artifact.data, str(run.parameters), "\n".join(e.message for e in logs), str(report)):
        assert LOOPBACK_KEY not in text


# --- the deployment (no server) -----------------------------------------------------------------


@pytest.mark.timeout(60)
def test_the_watch_is_served_beside_the_syncs_on_its_schedule(make_settings) -> None:
    from prefect.client.schemas.objects import ConcurrencyLimitStrategy

    from embedpipe.flows.schedule import deployments

    settings = make_settings('[watch]\nschedule = "0 6 * * *"\n'
                             '[indexes.docs]\nsource = "src"\nschedule = "*/15 * * * *"\n')
    sync, watch = deployments(settings)
    assert (sync.flow_name, sync.name) == ("sync-index", "sync-docs")
    assert (watch.flow_name, watch.name) == ("deprecation-watch", "watch")
    assert [s.schedule.cron for s in watch.schedules] == ["0 6 * * *"]
    assert watch.parameters == {"config": str(settings.config_path)}
    assert watch.entrypoint == "embedpipe.flows.watch.watch_flow"
    assert watch.concurrency_limit == 1
    assert watch.concurrency_options.collision_strategy == ConcurrencyLimitStrategy.CANCEL_NEW
    # one index served: the watch only when asked for on the command line
    assert [d.name for d in deployments(settings, index="docs")] == ["sync-docs"]
    served = deployments(settings, index="docs", watch_cron="30 5 * * 1")
    assert [s.schedule.cron for s in served[1].schedules] == ["30 5 * * 1"]
    # the watch alone, when no index has a schedule
    (alone,) = deployments(make_settings('[watch]\nschedule = "0 6 * * *"\n'))
    assert alone.name == "watch"
    (alone,) = deployments(make_settings(), watch_cron="0 7 * * *")
    assert [s.schedule.cron for s in alone.schedules] == ["0 7 * * *"]


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("body", "watch_cron", "message"), [
    ('[watch]\nschedule = "daily"\n', None, "[watch] in "),
    ("", "99 * * * *", "--watch-cron: schedule '99 * * * *' is not a valid cron expression"),
    ("", None, "[watch] schedule = \"0 6 * * *\" serves the deprecation watch"),
], ids=["bad-setting", "bad-option", "nothing-scheduled"])
def test_bad_watch_schedules_are_one_line_config_errors(make_settings, body, watch_cron, message) -> None:
    from embedpipe.flows.schedule import deployments

    with pytest.raises(ConfigError) as caught:
        deployments(make_settings(body), watch_cron=watch_cron)
    assert message in str(caught.value) and "\n" not in str(caught.value)


# --- served by `embedpipe schedule` -------------------------------------------------------------


@pytest.mark.timeout(600)
def test_embedpipe_schedule_serves_the_watch_and_a_run_writes_its_artifact(
    prefect_server: str, tmp_path: Path, static_model_dir: Path
) -> None:
    from embedpipe.config import load_settings
    from embedpipe.watch import last_report

    deprecated = f'[profiles.static.deprecation]\nshutdown = "{_day(30)}"\n'
    config = write_config(tmp_path, static_profile_toml(static_model_dir) + deprecated)
    settings = load_settings(config)
    ingest(settings, "docs", write_jsonl(tmp_path / "docs.jsonl", DOCS), profile="static")
    close_all()  # the runs are other processes: the engine is theirs now

    with _prefect_api(prefect_server), serving(config, prefect_server, "--watch-cron", YEARLY) as served:
        deployment = wait_for_deployment(served, WATCH)
        assert [s.schedule.cron for s in deployment.schedules] == [YEARLY]
        assert deployment.parameters == {"config": str(config)}
        (run,) = wait_for_runs(served, trigger(deployment.id))
        assert_completed(served, run)
        _, _, artifacts = prefect_records("deprecation-watch")
        (artifact,) = [a for a in artifacts if a.key == "deprecation-watch"]
        assert "| docs | static (local/static-256) | deprecated (needs action) | 30 |" in artifact.data
        assert "pick a replacement from `embedpipe models`" in artifact.data

        # another config through the Prefect API is refused before anything is read
        (tmp_path / "elsewhere").mkdir()
        other = write_config(tmp_path / "elsewhere")
        (refused,) = wait_for_runs(served, trigger(deployment.id, parameters={"config": str(other)}))
        assert refused.state.is_failed(), served.output()
        assert "config is not the file" in f"{refused.state.message}\n{run_logs(refused.id)}"
        served.wait_idle()
    assert last_report(settings.data_dir)["rows"]["docs"]["status"] == "deprecated"
    assert not (tmp_path / "elsewhere" / "data").exists()
