"""Scheduled sync on a real ``prefect server start`` served by a real ``embedpipe schedule``.

The server is a subprocess with its own PREFECT_HOME (one per module, ~20 s to start:
it builds its database). ``embedpipe schedule`` runs as a subprocess too; each flow run
is a child process of it, so this process reads the Qdrant folder only once that child
has exited (local mode allows one process per folder). Validation of the configuration
needs no server.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from embedpipe.config import Settings, load_settings
from embedpipe.errors import ConfigError, PrefectUnavailable
from embedpipe.index import Index, IndexVersions
from embedpipe.engine import close_all

from conftest import static_profile_toml, write_config

DEPLOYMENT = "sync-index/sync-docs"
YEARLY = "0 0 1 1 *"  # never comes due during a test: every run here is triggered by hand
DOCS = {
    "venus.txt": "Venus has a runaway greenhouse effect under thick clouds of carbon dioxide.",
    "bread.txt": "Sourdough bread rises because wild yeast and lactobacilli ferment the flour.",
    "tides.txt": "Ocean tides follow the pull of the Moon and, more weakly, of the Sun.",
}
NEW_DOC = ("westphalia.txt", "The Peace of Westphalia ended the Thirty Years War in 1648.")


# --- helpers -------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _tail(path: Path, chars: int = 4000) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace")[-chars:]
    except OSError:
        return "(no output)"


def _clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without Prefect settings, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_SERVER_ANALYTICS_ENABLED="false", **extra)
    return env


def _descendants(pid: int) -> set[int]:
    """Every process below ``pid`` (Linux /proc)."""
    found: set[int] = set()
    for listing in Path(f"/proc/{pid}/task").glob("*/children"):
        with contextlib.suppress(OSError):
            found |= {int(child) for child in listing.read_text().split()}
    for child in list(found):
        found |= _descendants(child)
    return found


def _stop(proc: subprocess.Popen[bytes], grace_s: float = 30) -> None:
    """SIGTERM the process group this test started (the server's uvicorn, the runs), then SIGKILL."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@contextlib.contextmanager
def _prefect_api(url: str) -> Iterator[None]:
    """Point this process's Prefect client at ``url`` (over any session-wide test harness)."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: url}):
        yield


# --- the server ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real ``prefect server start`` (scheduler on, UI off) on a free port; yields the API URL."""
    home = tmp_path_factory.mktemp("prefect-server")
    port = _free_port()
    log = home / "server.log"
    env = _clean_env(PREFECT_HOME=str(home), PREFECT_SERVER_UI_ENABLED="false")
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}/api"
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                pytest.fail(f"`prefect server start` exited with {proc.returncode}:\n{_tail(log)}")
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            if time.monotonic() > deadline:
                pytest.fail(f"`prefect server start` did not answer {url}/health within 120 s:\n{_tail(log)}")
            time.sleep(0.25)
        yield url
    finally:
        _stop(proc)


class Serving:
    """``embedpipe -c CONFIG schedule ARGS`` running as a subprocess against a server."""

    def __init__(self, config: Path, api: str, log: Path, *args: str) -> None:
        self.log = log
        env = _clean_env(
            PREFECT_API_URL=api,
            PREFECT_HOME=str(log.parent / "prefect-client"),
            PREFECT_RUNNER_POLL_FREQUENCY="1",  # pick up triggered runs within a second
            PREFECT_LOGGING_LEVEL="INFO",  # the runs' logs land in the log file and on the server
        )
        with log.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "embedpipe.cli", "-c", str(config), "schedule", *args],
                env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True, cwd=config.parent,
            )

    def output(self) -> str:
        return _tail(self.log)

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            pytest.fail(f"`embedpipe schedule` exited with {self.proc.returncode}:\n{self.output()}")

    def wait_idle(self, timeout_s: float = 60) -> None:
        """Until no flow-run process of this command is left (they exit after their final state)."""
        deadline = time.monotonic() + timeout_s
        while _descendants(self.proc.pid):
            self.check_alive()
            if time.monotonic() > deadline:
                pytest.fail(f"flow-run processes still running after {timeout_s} s:\n{self.output()}")
            time.sleep(0.2)

    def stop(self) -> None:
        _stop(self.proc)


@contextlib.contextmanager
def serving(config: Path, api: str, *args: str) -> Iterator[Serving]:
    served = Serving(config, api, config.parent / "schedule.log", *args)
    try:
        yield served
    finally:
        served.stop()


def wait_for_deployment(served: Serving, name: str = DEPLOYMENT, timeout_s: float = 90) -> Any:
    """The deployment once ``embedpipe schedule`` has registered it (and unpaused it)."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    deadline = time.monotonic() + timeout_s
    with get_client(sync_client=True) as client:
        while True:
            served.check_alive()
            with contextlib.suppress(ObjectNotFound):
                deployment = client.read_deployment_by_name(name)
                if not deployment.paused:
                    return deployment
            if time.monotonic() > deadline:
                pytest.fail(f"deployment {name} not served within {timeout_s} s:\n{served.output()}")
            time.sleep(0.5)


def wait_for_runs(served: Serving, run_ids: list[Any], timeout_s: float = 180) -> list[Any]:
    """The flow runs once every one is in a final state."""
    from prefect.client.orchestration import get_client

    deadline = time.monotonic() + timeout_s
    with get_client(sync_client=True) as client:
        while True:
            runs = [client.read_flow_run(run_id) for run_id in run_ids]
            if all(run.state is not None and run.state.is_final() for run in runs):
                return runs
            served.check_alive()
            if time.monotonic() > deadline:
                states = ", ".join(f"{r.name}: {r.state.name if r.state else None}" for r in runs)
                pytest.fail(f"runs not finished within {timeout_s} s ({states}):\n{served.output()}")
            time.sleep(0.5)


def run_logs(run_id: Any) -> str:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    with get_client(sync_client=True) as client:
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id])))
    return "\n".join(f"{entry.level} {entry.message}" for entry in logs)


def assert_completed(served: Serving, run: Any) -> None:
    assert run.state.is_completed(), (
        f"flow run {run.name} ended {run.state.name}: {run.state.message}\n"
        f"--- run logs ---\n{run_logs(run.id)}\n--- embedpipe schedule ---\n{served.output()}"
    )


def trigger(deployment_id: Any, count: int = 1, parameters: dict[str, Any] | None = None) -> list[Any]:
    """Create ``count`` runs of the deployment now, as `prefect deployment run` does."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return [client.create_flow_run_from_deployment(deployment_id, parameters=parameters).id
                for _ in range(count)]


# --- end to end ----------------------------------------------------------------------


@pytest.fixture
def project(tmp_path: Path, static_model_dir: Path) -> tuple[Path, Path]:
    """(config, source folder): index ``docs`` on the static model, synced from ``src/`` yearly."""
    source = tmp_path / "src"
    source.mkdir()
    for name, text in DOCS.items():
        (source / name).write_text(text, encoding="utf-8")
    config = write_config(
        tmp_path,
        static_profile_toml(static_model_dir)
        + f'\n[indexes.docs]\nprofile = "static"\nsource = "src"\nschedule = "{YEARLY}"\n',
    )
    return config, source


def _contents(settings: Settings) -> dict[str, str | None]:
    versions = IndexVersions.open(settings)
    live = versions.require_live("docs")
    return versions.contents(live.collection)


@pytest.mark.timeout(600)
def test_served_schedule_syncs_the_index_when_a_run_is_triggered(
    prefect_server: str, project: tuple[Path, Path]
) -> None:
    from prefect.client.schemas.objects import ConcurrencyLimitStrategy

    config, source = project
    settings = load_settings(config)
    with _prefect_api(prefect_server), serving(config, prefect_server, "--index", "docs") as served:
        deployment = wait_for_deployment(served)
        assert [s.schedule.cron for s in deployment.schedules] == [YEARLY]
        assert deployment.parameters == {"index": "docs", "config": str(config)}
        assert set(deployment.tags) >= {"embedpipe", "index:docs"}
        assert deployment.global_concurrency_limit is not None
        assert deployment.global_concurrency_limit.limit == 1
        assert deployment.concurrency_options.collision_strategy == ConcurrencyLimitStrategy.CANCEL_NEW

        (first,) = wait_for_runs(served, trigger(deployment.id))
        assert_completed(served, first)
        assert first.parameters == {"index": "docs", "config": str(config)}
        served.wait_idle()  # the run's process is gone; the serving process never opens Qdrant
        assert set(_contents(settings)) == set(DOCS)
        close_all()

        # Anyone with the Prefect API can ask for other parameters; the served run refuses.
        (source / "bread.txt").rename(source.parent / "bread.txt")
        (source.parent / "elsewhere").mkdir()
        other = write_config(source.parent / "elsewhere")
        asked = [{"allow_mass_delete": True}, {"config": str(other)}, {"index": "kb"}]
        refused = []  # one at a time: the deployment cancels a run due while another goes
        for params in asked:
            refused += wait_for_runs(served, trigger(deployment.id, parameters=params))
        assert [r.state.type.value for r in refused] == ["FAILED"] * 3, served.output()
        logs = "\n".join(f"{r.state.message}\n{run_logs(r.id)}" for r in refused)
        for why in ("allow_mass_delete = true", "config is not the file", "is not the index of deployment"):
            assert why in logs, logs
        served.wait_idle()
        assert set(_contents(settings)) == set(DOCS)  # nothing deleted, nothing written
        assert not (other.parent / "data").exists()
        close_all()
        (source.parent / "bread.txt").rename(source / "bread.txt")

        (source / NEW_DOC[0]).write_text(NEW_DOC[1], encoding="utf-8")
        (source / "bread.txt").unlink()
        # Two runs at once: one syncs, the other is cancelled instead of queued.
        runs = wait_for_runs(served, trigger(deployment.id, count=2))
        for run in runs:
            if not run.state.is_cancelled():
                assert_completed(served, run)
        assert sorted(r.state.type.value for r in runs) == ["CANCELLED", "COMPLETED"], served.output()
        (skipped,) = [r for r in runs if r.state.is_cancelled()]
        assert "concurrency limit" in (skipped.state.message or "")
        served.wait_idle()
        assert set(_contents(settings)) == set(DOCS) - {"bread.txt"} | {NEW_DOC[0]}
        close_all()
        hits = Index("docs", settings).search("which war ended with the treaty of 1648?", k=1)
        assert hits[0].id == NEW_DOC[0]


# --- configuration checks (no server) -----------------------------------------------


SOURCED = '[indexes.docs]\nsource = "src"\n'


@pytest.mark.timeout(60)
def test_deployments_cover_every_scheduled_index(make_settings) -> None:
    from prefect.client.schemas.objects import ConcurrencyLimitStrategy

    from embedpipe.flows.schedule import deployments

    settings = make_settings(
        '[indexes.docs]\nsource = "src"\nschedule = "*/15 * * * *"\n'
        '[indexes.kb]\nsource = "kb.jsonl"\nschedule = "0 3 * * 1-5"\n'
        '[indexes.adhoc]\nsource = "adhoc"\n'
    )
    served = deployments(settings)
    assert [(d.flow_name, d.name) for d in served] == [("sync-index", "sync-docs"), ("sync-index", "sync-kb")]
    docs, kb = served
    assert [s.schedule.cron for s in docs.schedules] == ["*/15 * * * *"]
    assert [s.schedule.cron for s in kb.schedules] == ["0 3 * * 1-5"]
    assert kb.parameters == {"index": "kb", "config": str(settings.config_path)}
    assert kb.tags == ["embedpipe", "index:kb"] and "kb" in (kb.description or "")
    assert kb.concurrency_limit == 1
    assert kb.concurrency_options.collision_strategy == ConcurrencyLimitStrategy.CANCEL_NEW
    assert kb.entrypoint == "embedpipe.flows.ingest.sync_flow"  # importable from any working directory

    (adhoc,) = deployments(settings, index="adhoc", cron="30 2 * * *")
    assert adhoc.name == "sync-adhoc" and [s.schedule.cron for s in adhoc.schedules] == ["30 2 * * *"]
    (overridden,) = deployments(settings, index="docs", cron="0 * * * *")
    assert [s.schedule.cron for s in overridden.schedules] == ["0 * * * *"]


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("body", "index", "cron", "message"),
    [
        (SOURCED + 'schedule = "every hour"\n', None, None, "'every hour' is not a valid cron expression"),
        (SOURCED + 'schedule = "61 * * * *"\n', "docs", None, "'61 * * * *' is not a valid cron expression"),
        (SOURCED, "docs", "* * *", "'* * *' is not a valid cron expression"),
        (SOURCED, "docs", None, "index 'docs' has no schedule; set schedule = "),
        (SOURCED, None, None, "no index has a schedule in "),
        ("", None, None, "no index has a schedule in "),
        ('[indexes.docs]\nschedule = "0 * * * *"\n', None, None, "index 'docs' has a schedule but no source"),
        (SOURCED, "nope", "0 * * * *", "index 'nope' has no source to sync"),
        (SOURCED + '[indexes.kb]\nsource = "kb"\n', None, "0 * * * *", "--cron sets the schedule of one index"),
    ],
    ids=["bad-cron", "out-of-range", "cli-cron", "no-schedule", "none-scheduled", "no-indexes",
         "no-source", "unknown-index", "cron-needs-index"],
)
def test_bad_schedules_are_one_line_config_errors(make_settings, body, index, cron, message) -> None:
    from embedpipe.flows.schedule import deployments

    with pytest.raises(ConfigError) as caught:
        deployments(make_settings(body), index=index, cron=cron)
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


@pytest.mark.timeout(60)
def test_a_lone_sourced_index_takes_cron_without_index(make_settings) -> None:
    from embedpipe.flows.schedule import deployments

    (only,) = deployments(make_settings(SOURCED), cron="0 * * * *")
    assert only.name == "sync-docs"


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("url", "message"),
    [(None, "schedules need a running Prefect server"),
     ("http://127.0.0.1:9/api", "cannot reach the Prefect server at http://127.0.0.1:9/api")],
    ids=["unset", "unreachable"],
)
def test_schedules_need_a_reachable_prefect_server(make_settings, url, message) -> None:
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from embedpipe.flows.schedule import serve_schedules

    settings = make_settings(SOURCED + 'schedule = "0 * * * *"\n')
    overrides = temporary_settings({PREFECT_API_URL: url}) if url else temporary_settings(
        restore_defaults={PREFECT_API_URL})
    with overrides, pytest.raises(PrefectUnavailable, match="prefect server start") as caught:
        serve_schedules(settings)
    assert message in str(caught.value)
