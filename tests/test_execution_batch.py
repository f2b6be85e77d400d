"""``--batch``: a migration and an ingest embedded through the Batch API of the real
loopback OpenAI server, end to end through the CLI: both prices in the plan, the index
written from the batches, the ledger at the batch price, ``status`` showing batches in
flight, a ``kill -9`` while polling and a resume that submits nothing new, and the write
path never falling back to the synchronous API."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from embedpipe.backends.hosted import HostedEmbedder
from embedpipe.corpus import CorpusStore
from embedpipe.index import IndexVersions
from embedpipe.ingest import ingest
from embedpipe.layout import Layout
from embedpipe.profiles import fingerprint
from embedpipe.usage import UsageLedger
from embedpipe.vectors import VectorStore

from conftest import (EXAMPLES, cli, files_under, hosted_profile_toml, kill_9_once_batches_are_submitted,
                      static_profile_toml)

CORPUS = EXAMPLES / "corpus" / "docs.jsonl"
FAST_POLL = "[profiles.hosted.batch]\npoll_initial_s = 0.01\npoll_max_s = 0.05\nmax_inputs_per_batch = 16\n"


@pytest.fixture
def cfg(make_settings, openai_server, static_model_dir: Path):
    """The example corpus live on the static model; a hosted profile on the loopback server."""
    settings = make_settings(static_profile_toml(static_model_dir) + "\n[migration]\nsample_size = 40\n"
                             + hosted_profile_toml(openai_server.base_url) + FAST_POLL)
    ingest(settings, "kb", CORPUS, profile="static")
    return settings


def _texts(settings) -> dict[str, str]:
    out: dict[str, str] = {}
    for batch in CorpusStore.for_index(settings.data_dir, "kb").iter_batches(columns=["text", "content_hash"]):
        out.update(zip(batch.column("content_hash").to_pylist(), batch.column("text").to_pylist()))
    return out


def _batch_records(settings) -> list:
    return [r for r in UsageLedger(settings.data_dir).records() if r.api == "batch"]


def test_the_plan_shows_both_prices_and_both_times(cfg, capsys, monkeypatch) -> None:
    code, out, _ = cli(capsys, monkeypatch, "migrate", "--to", "hosted", "--index", "kb", "--dry-run", "--json")
    plan = json.loads(out)["plan"]
    assert code == 0 and plan["estimated_usd"] > 0
    assert plan["estimated_usd_batch"] == pytest.approx(plan["estimated_usd"] / 2)  # default: half
    assert plan["batch_window_s"] == 24 * 3600
    code, out, _ = cli(capsys, monkeypatch, "migrate", "--to", "hosted", "--index", "kb", "--dry-run")
    assert "with --batch" in out and "24.0 h" in out


def test_migrate_batch_writes_the_version_from_the_batches_at_the_batch_price(
        cfg, openai_server, capsys, monkeypatch) -> None:
    texts = _texts(cfg)
    code, out, err = cli(capsys, monkeypatch, "migrate", "--to", "hosted", "--index", "kb", "--batch",
                         "--yes", "--json")
    assert code == 0, err
    report = json.loads(out)
    counters = openai_server.counters()
    ran = report["executor"]
    assert ran["executor"] == "batch" and ran["failed"] == 0
    assert ran["embedded"] + report.get("plan", {}).get("probe_kept", 0) <= len(texts)
    # every text came from a batch: none of the corpus went through /v1/embeddings
    assert counters["batch_inputs_billed"] == ran["embedded"] == len(texts)
    assert ran["batch"]["batches"] == counters["batches_created"] >= -(-len(texts) // 16)
    assert report["embedded"] == len(texts) and report["failed"] == 0
    live = IndexVersions.open(cfg).require_live("kb")
    assert live.profile == "hosted" and live.fingerprint == fingerprint(cfg.profile("hosted"))
    assert len(IndexVersions.open(cfg).contents(live.collection)) == report["documents"]
    # the ledger bills what the provider billed, at half the synchronous price
    records = _batch_records(cfg)
    assert sum(r.tokens for r in records) == counters["batch_tokens_billed"] == ran["batch"]["tokens"]
    assert sum(r.usd for r in records) == pytest.approx(counters["batch_tokens_billed"] * 0.01 / 1e6)
    # the vectors are the synchronous API's
    hashes = sorted(texts)[:8]
    stored = VectorStore(cfg.data_dir, live.fingerprint, 256, "hosted").lookup(hashes)
    sync = HostedEmbedder(cfg.profile("hosted")).embed_documents([texts[h] for h in hashes]).vectors
    np.testing.assert_allclose(np.stack([stored[h] for h in hashes]), sync, atol=1e-6)


def test_texts_the_batches_could_not_embed_are_reported_not_sent_synchronously(
        cfg, openai_server, capsys, monkeypatch) -> None:
    from embedpipe.migration import Migration

    openai_server.configure(batch_fail_rate=1.0, batch_faulty_batches=1)  # the first batch fails
    m = Migration(cfg, "kb", "hosted")
    m.prepare()
    todo = m.todo()
    served = openai_server.counters()["inputs_served"]
    with m.embed_ahead([todo], "batch", resubmit=False) as ahead:
        backfill = m.backfill(todo, ahead=ahead)
    catch_up = m.catch_up()
    # the backfill and the catch-up report the first batch's texts with its reason...
    assert len(backfill.failures) == 16 and len(m.unembeddable) == 16
    assert all("resubmit is off" in r for r in backfill.failures.values()), backfill.failures
    assert catch_up.written == 0 and backfill.written == len(todo) - 16
    # ...and neither re-sent them to /v1/embeddings at the full price
    assert openai_server.counters()["inputs_served"] == served
    assert m.executor["failed"] == 16 and m.executor["batch"]["stored"] == len(todo) - 16
    # status shows the 16 as waiting for a run that resubmits, from the state file alone
    code, out, _ = cli(capsys, monkeypatch, "status", "--index", "kb", "--json")
    [batches] = json.loads(out)[0]["batches"]
    assert (batches["unsent"], batches["pending"], batches["in_flight"]) == (16, 16, 0)
    code, out, _ = cli(capsys, monkeypatch, "status", "--index", "kb")
    assert "16 to retry" in out
    # the CLI, resubmitting: only what failed goes again, and the index goes live
    code, out, err = cli(capsys, monkeypatch, "migrate", "--to", "hosted", "--index", "kb", "--batch",
                         "--yes", "--json")
    assert code == 0, err
    assert json.loads(out)["executor"]["batch"]["inputs"] == 16
    assert openai_server.counters()["batch_inputs_billed"] == len(_texts(cfg))  # failed lines bill nothing
    assert IndexVersions.open(cfg).require_live("kb").profile == "hosted"
    # nothing left at the provider or to retry: status no longer lists the batches
    code, out, _ = cli(capsys, monkeypatch, "status", "--index", "kb", "--json")
    assert json.loads(out)[0]["batches"] == []


def test_a_stopped_run_uploads_nothing_more_and_the_next_run_submits_it(cfg, openai_server, tmp_path) -> None:
    """The write path left (failed or interrupted) before the uploads: no file goes up
    behind its back, and the state lets the next run submit everything."""
    import threading

    from embedpipe.execution.batch_embed import Stopped, embed_on_batch_api

    profile = cfg.profiles["hosted"]
    texts = _texts(cfg)
    store = VectorStore(cfg.data_dir, fingerprint(profile), profile.dims, profile.name)
    state = Layout(cfg.data_dir).batch_state("kb", fingerprint(profile))
    stop = threading.Event()
    stop.set()
    with pytest.raises(Stopped, match="the same command resumes"):
        embed_on_batch_api(cfg, profile, fingerprint(profile), texts, store, stop=stop, state_path=state)
    assert openai_server.counters()["files_uploaded"] == 0
    assert openai_server.counters()["batches_created"] == 0
    stats = embed_on_batch_api(cfg, profile, fingerprint(profile), texts, store, state_path=state)
    assert stats.embedded == len(texts) and stats.failed == 0
    assert openai_server.counters()["batch_inputs_billed"] == len(texts)


def test_batch_needs_an_openai_profile_and_changes_nothing(cfg, capsys, monkeypatch) -> None:
    before = files_under(cfg.data_dir)
    code, _, err = cli(capsys, monkeypatch, "migrate", "--to", "local-minilm", "--index", "kb", "--batch", "--yes")
    assert code == 2 and "Batch API" in err and len(err.strip().splitlines()) == 1
    code, _, err = cli(capsys, monkeypatch, "migrate", "--to", "hosted", "--index", "kb", "--batch",
                       "--executor", "ray", "--yes")
    assert code == 2 and "--batch and --executor" in err
    assert files_under(cfg.data_dir) == before


def test_ingest_batch_builds_a_new_index_and_a_rerun_embeds_nothing(cfg, openai_server, capsys, monkeypatch) -> None:
    code, out, err = cli(capsys, monkeypatch, "ingest", str(CORPUS), "--index", "fresh", "--profile", "hosted",
                         "--batch", "--json")
    assert code == 0, err
    report = json.loads(out)
    distinct = len(_texts(cfg))
    assert report["executor"]["executor"] == "batch" and report["embedded"] == distinct
    assert openai_server.counters()["batch_inputs_billed"] == distinct
    code, out, _ = cli(capsys, monkeypatch, "ingest", str(CORPUS), "--index", "fresh", "--batch", "--json")
    assert code == 0 and json.loads(out)["embedded"] == 0
    assert openai_server.counters()["batches_created"] == report["executor"]["batch"]["batches"]


_CHILD = "import sys; from embedpipe.cli import main; sys.argv = ['embedpipe', *sys.argv[1:]]; main()"


def _kill_9_while_polling(cfg, openai_server, args: list[str], state: Path, env: dict[str, str]) -> dict:
    """Run ``embedpipe *args`` in a child, kill -9 it once every batch is submitted and
    polled a few times; the server's counters then."""
    from embedpipe.engine import close_all

    openai_server.configure(batch_delay_s=3600.0)  # held in progress until the test says
    close_all()  # the engine is one process's at a time: the child's now
    env = {**os.environ, "EMBEDPIPE_CONFIG": str(cfg.config_path), **env}
    child = subprocess.Popen([sys.executable, "-c", _CHILD, *args], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    kill_9_once_batches_are_submitted(child, state)
    counters = openai_server.counters()
    assert counters["batches_created"] >= 1 and counters["batch_lines_completed"] == 0
    return counters


def test_kill_9_of_an_ingest_while_polling_then_the_same_command_resumes_and_submits_nothing_new(
        cfg, openai_server, capsys, monkeypatch) -> None:
    args = ["ingest", str(CORPUS), "--index", "fresh", "--profile", "hosted", "--batch", "--json"]
    state = Layout(cfg.data_dir).batch_state("fresh", fingerprint(cfg.profile("hosted")))
    before = _kill_9_while_polling(cfg, openai_server, args, state, {})
    code, out, _ = cli(capsys, monkeypatch, "status", "--index", "fresh", "--json")
    [batches] = json.loads(out)[0]["batches"]
    assert batches["in_flight"] > 0 and batches["stored"] == 0
    openai_server.configure(batch_delay_s=0.0)
    code, out, err = cli(capsys, monkeypatch, *args)
    assert code == 0, err
    after = openai_server.counters()
    assert (after["batches_created"], after["files_uploaded"]) == (before["batches_created"],
                                                                     before["files_uploaded"])
    distinct = len(_texts(cfg))
    assert after["batch_inputs_billed"] == distinct  # each text billed once
    report = json.loads(out)
    assert report["executor"]["batch"]["resumed"] == before["batches_created"]
    assert report["embedded"] == distinct and report["failed"] == 0
    assert sum(r.tokens for r in _batch_records(cfg)) == after["batch_tokens_billed"]


@pytest.mark.slow  # two Prefect flow runs in subprocesses
def test_kill_9_while_polling_then_the_same_command_resumes_and_submits_nothing_new(
        cfg, openai_server, prefect_api, capsys, monkeypatch) -> None:
    texts = _texts(cfg)
    state = Layout(cfg.data_dir).batch_state("kb", fingerprint(cfg.profile("hosted")))
    args = ["migrate", "--to", "hosted", "--index", "kb", "--batch", "--yes", "--json"]
    before = _kill_9_while_polling(cfg, openai_server, args, state, {"PREFECT_API_URL": prefect_api})
    # no throughput probe at the full price: only the model check's one input went synchronously
    assert sum(r.inputs for r in UsageLedger(cfg.data_dir).records() if r.api == "sync") <= 1
    # status shows the batches in flight, from the state file alone
    code, out, _ = cli(capsys, monkeypatch, "status", "--index", "kb", "--json")
    [entry] = json.loads(out)
    [batches] = entry["batches"]
    assert batches["in_flight"] > 0 and batches["stored"] == 0
    openai_server.configure(batch_delay_s=0.0)  # now the batches finish
    code, out, err = cli(capsys, monkeypatch, *args)
    assert code == 0, err
    after = openai_server.counters()
    assert (after["batches_created"], after["files_uploaded"]) == (before["batches_created"],
                                                                     before["files_uploaded"])
    assert after["batch_inputs_billed"] == len(texts)  # each text billed once
    report = json.loads(out)
    assert report["executor"]["batch"]["resumed"] == before["batches_created"]
    assert IndexVersions.open(cfg).require_live("kb").profile == "hosted"
    assert sum(r.tokens for r in _batch_records(cfg)) == after["batch_tokens_billed"]
