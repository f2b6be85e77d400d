"""The migration flow on Prefect's real test server, and `embedpipe migrate/rollback/retire`.

The CLI runs in-process (``embedpipe.cli.main``) where that is enough, and as a real
subprocess for the kill -9 test.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from embedpipe.corpus import CorpusStore
from embedpipe.errors import ModelDeprecated
from embedpipe.index import Index, IndexVersions
from embedpipe.ingest import ingest
from embedpipe.engine import close_all

from conftest import (
    EXAMPLES,
    cli,
    LOOPBACK_KEY,
    hosted_profile_toml,
    prefect_records,
    static_profile_toml,
    write_config,
    write_jsonl,
)

CORPUS = EXAMPLES / "corpus" / "docs.jsonl"


@pytest.fixture
def local_index(make_settings, static_model_dir: Path):
    settings = make_settings(static_profile_toml(static_model_dir)
                             + "\n[migration]\nsample_size = 40\nslice_size = 16\n")
    ingest(settings, "kb", CORPUS, profile="local-minilm")
    return settings


def test_flow_runs_as_batched_tasks_with_a_validation_artifact(prefect_api: str, local_index) -> None:
    from embedpipe.flows.migrate import run_migration

    totals: list[int] = []
    advanced: list[int] = []

    def progress(total: int):
        totals.append(total)
        return advanced.append

    report = run_migration(local_index, "kb", "static", progress=progress)
    assert report["status"] == "live" and report["collection"] == "kb__static__v2"
    assert (report["documents"], report["embedded"], report["reused"]) == (40, 40, 0)
    assert totals == [40] and sum(advanced) == 40
    assert report["plan"]["to_embed"] == 40 and report["validation"]["passed"]

    run, tasks, artifacts = prefect_records("migrate-kb-to-static")
    assert run.state.is_completed()
    names = sorted(t.name for t in tasks)
    assert names == ["backfill-1", "backfill-2", "backfill-3", "catch-up", "cutover", "plan", "prepare",
                     "validate"]
    assert all(t.state.is_completed() for t in tasks)
    table = next(a for a in artifacts if a.key == "validation-kb-static-v2")
    rows = table.data if isinstance(table.data, list) else json.loads(table.data)
    assert [r["check"] for r in rows][:2] == ["count parity", "stored = fresh vectors"]
    assert all(r["result"] in ("pass", "info") for r in rows)
    assert IndexVersions.open(local_index).live("kb").collection == "kb__static__v2"


def test_cli_migrate_dry_run_then_run_then_rollback_and_retire(
    prefect_api: str, local_index, capsys, monkeypatch
) -> None:
    config = str(local_index.config_path)
    code, out, _ = cli(capsys, monkeypatch, "-c", config, "migrate", "--to", "static", "--index", "kb",
                       "--dry-run", "--json")
    assert code == 0
    planned = json.loads(out)
    assert planned["status"] == "planned" and planned["plan"]["to_embed"] == 40
    assert [v.collection for v in IndexVersions.open(local_index).versions("kb")] == [
        "kb__local-minilm__v1"]

    code, out, err = cli(capsys, monkeypatch, "-c", config, "migrate", "--to", "static")
    assert code == 2 and "--yes" in err  # not a terminal: nothing is asked, nothing spent

    code, out, err = cli(capsys, monkeypatch, "-c", config, "migrate", "--to", "static", "--yes", "--json")
    assert code == 0, err
    report = json.loads(out)
    assert {"status", "from_profile", "to_profile", "collection", "documents", "embedded", "reused",
            "validation"} <= set(report)
    assert (report["status"], report["from_profile"], report["to_profile"]) == ("live", "local-minilm", "static")
    assert report["validation"]["table"][0]["check"] == "count parity"

    code, out, _ = cli(capsys, monkeypatch, "-c", config, "search", "runaway greenhouse planet", "--index", "kb",
                       "-k", "1", "--json")
    assert code == 0 and json.loads(out)[0]["id"] == "astro-venus"

    code, out, _ = cli(capsys, monkeypatch, "-c", config, "rollback", "--index", "kb", "--json")
    assert code == 0 and json.loads(out)["collection"] == "kb__local-minilm__v1"
    code, out, _ = cli(capsys, monkeypatch, "-c", config, "retire", "--index", "kb", "--keep", "0", "--yes", "--json")
    assert code == 0 and json.loads(out)["deleted"] == ["kb__static__v2"]
    code, out, _ = cli(capsys, monkeypatch, "-c", config, "status", "--json")
    assert [v["collection"] for v in json.loads(out)[0]["versions"]] == ["kb__local-minilm__v1"]


def test_cli_prints_the_failed_gate_and_exits_4(prefect_api: str, make_settings, static_model_dir,
                                                capsys, monkeypatch) -> None:
    bad = static_profile_toml(static_model_dir, "static-bad") + (
        'query_prompt = "' + "zq xv kj wp qz vb xj " * 30 + '"\n[migration]\nsample_size = 40\n')
    settings = make_settings(bad)
    ingest(settings, "kb", CORPUS, profile="local-minilm")
    code, out, err = cli(capsys, monkeypatch, "-c", str(settings.config_path), "migrate", "--to", "static-bad",
                         "--yes")
    assert code == 4
    assert "FAIL" in out and "self-retrieval@10" in out
    assert "failed validation" in err and "--force" in err and "Traceback" not in err
    assert IndexVersions.open(settings).live("kb").collection == "kb__local-minilm__v1"
    run, _, _ = prefect_records("migrate-kb-to-static-bad")
    assert run.state.is_failed()
    code, out, _ = cli(capsys, monkeypatch, "-c", str(settings.config_path), "status")
    assert "validation_failed" in out and "--abandon" in out


def test_deprecated_hosted_model_migrates_to_a_local_one_and_back_for_free(
    prefect_api: str, openai_server, make_settings, static_model_dir: Path, capsys, monkeypatch
) -> None:
    """The canonical scenario (issue 4, item 9)."""
    hosted = hosted_profile_toml(openai_server.base_url, name="hosted",
                                 extra='[profiles.hosted.deprecation]\nreplacement = "static"\n')
    settings = make_settings(hosted + static_profile_toml(static_model_dir) + "[migration]\nsample_size = 40\n")
    config = str(settings.config_path)
    ingest(settings, "kb", CORPUS, profile="hosted")
    assert Index("kb", settings).search("runaway greenhouse planet", k=1)[0].id == "astro-venus"

    openai_server.configure(deprecated_models=("text-embedding-3-small",))
    with pytest.raises(ModelDeprecated, match="migrate --to static"):
        Index("kb", settings).search("runaway greenhouse planet", k=1)
    code, _, err = cli(capsys, monkeypatch, "-c", config, "search", "runaway greenhouse planet", "--index", "kb")
    assert code == 2 and "migrate --to static" in err and "Traceback" not in err

    # --no-adapter: the migration alone (tests/test_adapters.py covers the adapter it offers)
    code, out, err = cli(capsys, monkeypatch, "-c", config, "migrate", "--to", "static", "--index", "kb",
                         "--yes", "--no-adapter", "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["status"] == "live" and report["embedded"] == 40
    validation = report["validation"]
    assert validation["old_can_query"] is False and "no longer serves" in validation["old_reason"]
    self_check = next(r for r in validation["table"] if r["check"] == "self-retrieval@10")
    assert self_check["result"] == "pass" and self_check["old"] == "-"

    close_all()  # a fresh process's view: the library and the CLI both search the new space
    assert Index("kb", settings).search("runaway greenhouse planet", k=1)[0].id == "astro-venus"
    code, out, _ = cli(capsys, monkeypatch, "-c", config, "search", "runaway greenhouse planet", "--index", "kb",
                       "--json")
    assert code == 0 and json.loads(out)[0]["id"] == "astro-venus"

    code, out, err = cli(capsys, monkeypatch, "-c", config, "rollback", "--index", "kb")
    assert code == 1 and "cannot serve searches" in err and "--force" in err  # searches would break
    openai_server.reset_counters()
    code, out, err = cli(capsys, monkeypatch, "-c", config, "rollback", "--index", "kb", "--force", "--json")
    assert code == 0, err
    assert json.loads(out)["embedded"] == 0
    assert openai_server.counters()["requests"] == 0  # rollback needed no model at all
    code, out, err = cli(capsys, monkeypatch, "-c", config, "migrate", "--to", "static", "--index", "kb",
                         "--yes", "--json")
    assert code == 0, err
    again = json.loads(out)
    assert (again["embedded"], again["plan"]["to_embed"], again["plan"]["probe_embedded"]) == (0, 0, 0)
    assert again["collection"] == report["collection"] and again["validation"]["passed"]
    counters = openai_server.counters()
    assert counters["embedding_ok"] == 0 and counters["inputs_served"] == 0  # nothing embedded or billed

    # The key never reaches the data directory (Qdrant's files included) or Prefect's records.
    for path in settings.data_dir.rglob("*"):
        if path.is_file():
            assert LOOPBACK_KEY.encode() not in path.read_bytes(), path
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        blob = json.dumps([
            [r.model_dump(mode="json") for r in client.read_flow_runs()],
            [t.model_dump(mode="json") for t in client.read_task_runs()],
            [a.model_dump(mode="json") for a in client.read_artifacts()],
            [entry.model_dump(mode="json") for entry in client.read_logs()],
        ])
    assert "migrate-kb-to-static" in blob and LOOPBACK_KEY not in blob


def test_kill_9_mid_backfill_then_the_same_command_resumes(prefect_api: str, tmp_path: Path,
                                                           static_model_dir: Path) -> None:
    base = [json.loads(line) for line in CORPUS.read_text().splitlines() if line.strip()]
    docs = [dict(d, id=f"{d['id']}-{n}", text=f"Part {n}. {d['text']}") for n in range(6) for d in base]
    corpus = write_jsonl(tmp_path / "docs.jsonl", docs)
    write_config(tmp_path, "window = 16\n" + static_profile_toml(static_model_dir)
                 + "[migration]\nsample_size = 20\nvector_sample = 8\n")
    env = {**os.environ, "PREFECT_API_URL": prefect_api, "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    command = [sys.executable, "-m", "embedpipe.cli", "migrate", "--to", "local-minilm", "--index", "kb",
               "--yes", "--json"]
    ingest_cmd = [sys.executable, "-m", "embedpipe.cli", "ingest", str(corpus), "--index", "kb",
                  "--profile", "static"]
    subprocess.run(ingest_cmd, cwd=tmp_path, env=env, check=True, capture_output=True)

    state = tmp_path / "data" / "migrations" / "kb" / "state.json"
    proc = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    written = 0
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            record = json.loads(state.read_text())
            written = record["written"] if record["phase"] == "building" else 0
        except (OSError, ValueError):
            written = 0
        if written >= 48:
            break
        time.sleep(0.05)
    assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert 48 <= written < len(docs)

    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout)
    assert report["status"] == "live" and report["resumed"] is True
    assert report["collection"] == "kb__local-minilm__v2"  # the same version, not a new one
    assert report["plan"]["already_written"] >= written
    assert report["embedded"] <= len(docs) - written  # finished work is not redone

    from embedpipe.config import load_settings

    settings = load_settings(tmp_path / "embedpipe.toml")
    versions = IndexVersions.open(settings)
    held = versions.contents("kb__local-minilm__v2")
    known = CorpusStore.for_index(settings.data_dir, "kb").known()
    assert held == {i: k.record_hash for i, k in known.items()} and len(held) == len(docs)
    assert versions.count("kb__local-minilm__v2") == len(docs)  # exactly once each


def test_an_unreachable_prefect_server_is_one_line_before_anything_is_spent(local_index, tmp_path) -> None:
    close_all()  # the subprocess needs the Qdrant folder
    env = {**os.environ, "PREFECT_API_URL": "http://127.0.0.1:9/api"}
    out = subprocess.run([sys.executable, "-m", "embedpipe.cli", "migrate", "--to", "static", "--index", "kb",
                          "--yes"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert out.returncode == 1
    assert out.stderr.strip().splitlines() == [out.stderr.strip()]  # one line, no traceback
    assert "cannot reach the Prefect server at http://127.0.0.1:9/api" in out.stderr
    assert [v.collection for v in IndexVersions.open(local_index).versions("kb")] == [
        "kb__local-minilm__v1"]
