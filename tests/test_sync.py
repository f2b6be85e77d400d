"""Syncing an index with its source (no Prefect): a real static model, real Qdrant local mode.

Each test edits a real folder of files between runs and checks the corpus and every
version of the index after each run.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from embedpipe.corpus import CorpusStore
from embedpipe.errors import MassDeleteRefused, SourceUnavailable
from embedpipe.index import Index, IndexVersions
from embedpipe.migration import Migration, migration_lock
from embedpipe.engine import close_all
from embedpipe.sync import last_runs, sync

from conftest import payloads, static_profile_toml

LONG = " ".join(
    f"Paragraph {n} explains how the probe measured the atmosphere of planet {n} in detail."
    for n in range(40)
)
FILES = {
    "venus.txt": "Venus has a runaway greenhouse effect and a surface hot enough to melt lead.",
    "notes/bread.md": "# Bread\n\nSourdough bread rises because wild yeast ferments the dough.",
    "notes/tcp.md": "TCP retransmits lost segments and orders bytes for the application.",
    "long.txt": LONG,
}


def _write(src: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = src / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")


@pytest.fixture
def src(tmp_path: Path) -> Path:
    folder = tmp_path / "src"
    folder.mkdir()
    _write(folder, FILES)
    return folder


@pytest.fixture
def cfg(make_settings, static_model_dir: Path, src: Path):
    """The static model, and index ``docs`` syncing ``src`` in chunks of 24 tokens."""
    return make_settings(
        'default_profile = "static"\n' + static_profile_toml(static_model_dir)
        + f'\n[indexes.docs]\nsource = "{src}"\nchunk_tokens = 24\nchunk_overlap = 4\n'
        + "max_delete_fraction = 0.5\n"
    )


def _versions(settings) -> IndexVersions:
    return IndexVersions.open(settings)


def _corpus(settings, index: str = "docs") -> dict[str, str]:
    return {i: k.record_hash for i, k in CorpusStore.for_index(settings.data_dir, index).known().items()}


def _chunk_ids(settings, collection: str) -> set[str]:
    return {p["chunk_id"] for p in payloads(settings, collection, ["chunk_id"])}


def _whole(settings, collection: str) -> dict[str, str | None]:
    """document -> record hash held by a version (None: some chunk missing or stale)."""
    return _versions(settings).contents(collection)


def test_sync_adds_changes_and_deletes_across_runs(cfg, src: Path) -> None:
    first = sync(cfg, "docs")
    assert (first.added, first.updated, first.deleted, first.unchanged, first.failed) == (4, 0, 0, 0, 0)
    live = _versions(cfg).require_live("docs")
    assert live.chunking == {"max_tokens": 24, "overlap": 4}
    assert _whole(cfg, live.collection) == _corpus(cfg) and len(_corpus(cfg)) == 4
    chunks = _chunk_ids(cfg, live.collection)
    long_chunks = {c for c in chunks if c.startswith("long.txt#")}
    assert len(long_chunks) > 10 and "venus.txt#0" in chunks

    again = sync(cfg, "docs")  # nothing changed: nothing embedded, same chunk ids
    assert (again.unchanged, again.embedded, again.added, again.updated, again.deleted) == (4, 0, 0, 0, 0)
    assert _chunk_ids(cfg, live.collection) == chunks

    (src / "notes" / "tcp.md").unlink()
    _write(src, {"venus.txt": FILES["venus.txt"] + " Its day is longer than its year.",
                 "mars.txt": "Mars has the largest dust storms in the solar system."})
    third = sync(cfg, "docs")
    assert (third.added, third.updated, third.deleted, third.unchanged) == (1, 1, 1, 2)
    corpus = _corpus(cfg)
    assert set(corpus) == {"venus.txt", "notes/bread.md", "long.txt", "mars.txt"}
    assert _whole(cfg, live.collection) == corpus
    after = _chunk_ids(cfg, live.collection)
    assert not {c for c in after if c.startswith("notes/tcp.md")}
    assert {c for c in after if c.startswith("long.txt#")} == long_chunks  # untouched document
    hit = Index("docs", cfg).search("dust storms on the red planet", k=1)[0]
    assert (hit.id, hit.chunk_id) == ("mars.txt", "mars.txt#0")


def test_a_shorter_text_leaves_no_stale_chunks(cfg, src: Path) -> None:
    sync(cfg, "docs")
    collection = _versions(cfg).require_live("docs").collection
    before = {c for c in _chunk_ids(cfg, collection) if c.startswith("long.txt#")}
    _write(src, {"long.txt": LONG[: len(LONG) // 4]})
    report = sync(cfg, "docs")
    assert report.updated == 1
    after = {c for c in _chunk_ids(cfg, collection) if c.startswith("long.txt#")}
    assert after < before and after == {f"long.txt#{n}" for n in range(len(after))}
    assert _whole(cfg, collection) == _corpus(cfg)
    # only the chunks whose text changed were embedded; the first ones were reused
    assert report.reused >= 1 and report.embedded < len(after)


def test_group_by_doc_returns_the_best_chunk_of_each_document(cfg) -> None:
    sync(cfg, "docs")
    idx = Index("docs", cfg)
    plain = idx.search("probe measured the atmosphere of a planet", k=5)
    assert [h.id for h in plain].count("long.txt") >= 2  # several chunks of one document
    grouped = idx.search("probe measured the atmosphere of a planet", k=3, group_by_doc=True)
    ids = [h.id for h in grouped]
    assert len(ids) == len(set(ids)) == 3
    assert grouped[0].id == "long.txt" and grouped[0].score == plain[0].score
    best = grouped[0]
    assert best.chunk_id == f"long.txt#{best.chunk}" and LONG[best.start:best.end] == best.text


def test_unreadable_file_is_reported_kept_and_retried(cfg, src: Path) -> None:
    sync(cfg, "docs")
    collection = _versions(cfg).require_live("docs").collection
    indexed = _whole(cfg, collection)["venus.txt"]
    (src / "venus.txt").write_bytes(b"Venus caf\xe9 latin-1 bytes")  # now undecodable
    (src / "new.txt").write_text("A new note about comets and their tails.", encoding="utf-8")
    report = sync(cfg, "docs")
    assert report.status == "partial" and report.failed == 1 and report.added == 1
    assert report.deleted == 0  # a file that failed to read is never taken for deleted
    failure = report.failures[0]
    assert failure["path"] == "venus.txt" and "not valid UTF-8" in failure["reason"]
    assert _whole(cfg, collection)["venus.txt"] == indexed  # kept as it was indexed
    assert "new.txt" in _corpus(cfg)

    (src / "venus.txt").write_text("Venus, fixed and re-encoded as UTF-8.", encoding="utf-8")
    retried = sync(cfg, "docs")  # the next run picks it up
    assert (retried.failed, retried.updated) == (0, 1)
    assert _whole(cfg, collection) == _corpus(cfg)


def test_a_source_that_comes_back_empty_does_not_delete_the_index(cfg, src: Path) -> None:
    sync(cfg, "docs")
    collection = _versions(cfg).require_live("docs").collection
    before = (_corpus(cfg), _whole(cfg, collection))
    for path in sorted(src.rglob("*"), reverse=True):  # a failed mount: the folder is empty
        path.unlink() if path.is_file() else path.rmdir()
    with pytest.raises(MassDeleteRefused, match="would delete 4 of its 4 documents.*--allow-mass-delete"):
        sync(cfg, "docs")
    assert (_corpus(cfg), _whole(cfg, collection)) == before
    src.rmdir()  # the mount point itself is gone
    with pytest.raises(SourceUnavailable, match="does not exist"):
        sync(cfg, "docs")
    assert (_corpus(cfg), _whole(cfg, collection)) == before
    runs = last_runs(cfg, "docs")
    assert [r["status"] for r in runs[:2]] == ["error", "error"]
    assert "would delete 4" in runs[1]["error"]

    src.mkdir()
    _write(src, {"venus.txt": FILES["venus.txt"]})  # 3 of 4 really gone: above 0.5
    with pytest.raises(MassDeleteRefused):
        sync(cfg, "docs")
    report = sync(cfg, "docs", allow_mass_delete=True)
    assert report.deleted == 3 and report.warnings
    assert set(_corpus(cfg)) == {"venus.txt"} == set(_whole(cfg, collection))


def test_dry_run_says_what_would_change_and_writes_nothing(cfg, src: Path) -> None:
    sync(cfg, "docs")
    collection = _versions(cfg).require_live("docs").collection
    before = (_corpus(cfg), _whole(cfg, collection), last_runs(cfg, "docs"))
    (src / "notes" / "tcp.md").unlink()
    _write(src, {"mars.txt": "Mars has dust storms."})
    plan = sync(cfg, "docs", dry_run=True)
    assert (plan.dry_run, plan.added, plan.deleted, plan.unchanged) == (True, 1, 1, 3)
    assert (_corpus(cfg), _whole(cfg, collection), last_runs(cfg, "docs")) == before


def test_deletions_leave_every_version(cfg, src: Path) -> None:
    sync(cfg, "docs")
    # migrate to MiniLM (unchunked... no: chunked as configured) so a standby exists
    m = Migration(cfg, "docs", "local-minilm")
    m.prepare()
    for ids in m.slices(m.todo()):
        m.backfill(ids)
    m.catch_up()
    m.cutover(m.validate())
    versions = _versions(cfg).versions("docs")
    assert {v.state for v in versions} == {"live", "standby"}
    (src / "notes" / "bread.md").unlink()
    assert sync(cfg, "docs").deleted == 1
    for version in versions:
        held = _whole(cfg, version.collection)
        assert "notes/bread.md" not in held and set(held) == set(_corpus(cfg))


def test_a_sync_during_a_migration_writes_both_versions(cfg, src: Path) -> None:
    sync(cfg, "docs")
    with migration_lock(cfg, "docs"):  # a migration is running
        m = Migration(cfg, "docs", "local-minilm")
        target = m.prepare()
        for ids in m.slices(m.todo()):
            m.backfill(ids)
        _write(src, {"comet.txt": "Comets grow bright tails of gas and dust near the sun."})
        (src / "notes" / "tcp.md").unlink()
        report = sync(cfg, "docs")
        assert report.added == 1 and report.deleted == 1
        assert report.migration_writes == {target.collection: 1}
        held = _whole(cfg, target.collection)  # before any catch-up
        assert held["comet.txt"] == _corpus(cfg)["comet.txt"] and "notes/tcp.md" not in held
        caught = m.catch_up()
        assert (caught.written, caught.deleted, caught.embedded) == (0, 0, 0)
        m.cutover(m.validate())
    hit = Index("docs", cfg).search("bright tails of comets", k=1, group_by_doc=True)[0]
    assert hit.id == "comet.txt"
    assert _versions(cfg).require_live("docs").profile == "local-minilm"


@pytest.mark.parametrize("kind", ["jsonl", "csv", "parquet"])
def test_record_files_with_configured_fields(make_settings, static_model_dir, tmp_path, kind) -> None:
    rows = [
        {"key": "a1", "body": "Venus is hot.", "lang": "en", "secret_note": "x"},
        {"key": "a2", "body": "Mars is cold.", "lang": "en", "secret_note": "y"},
    ]
    path = tmp_path / f"docs.{kind}"
    if kind == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    elif kind == "csv":
        path.write_text("key,body,lang,secret_note\n" + "".join(
            f"{r['key']},{r['body']},{r['lang']},{r['secret_note']}\n" for r in rows), encoding="utf-8")
    else:
        pq.write_table(pa.Table.from_pylist(rows), path)
    cfg = make_settings(
        'default_profile = "static"\n' + static_profile_toml(static_model_dir)
        + f'\n[indexes.rec]\nsource = "{path}"\nid_field = "key"\ntext_field = "body"\n'
        + 'metadata_fields = ["lang"]\n'
    )
    report = sync(cfg, "rec")
    assert (report.added, report.failed) == (2, 0)
    hit = Index("rec", cfg).search("a cold planet", k=1, filter={"lang": "en"})[0]
    assert hit.id == "a2" and hit.metadata == {"lang": "en"} and hit.chunk_id is None


def test_cli_sync_json_summary_exit_codes_and_status(cfg, src: Path, tmp_path: Path) -> None:
    close_all()  # the CLI runs in another process: release Qdrant's local-mode lock

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "embedpipe.cli", "-c", str(cfg.config_path), *args],
                              capture_output=True, text=True, timeout=300)

    done = cli("sync", "--index", "docs", "--json")
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert {k: summary[k] for k in ("added", "updated", "deleted", "unchanged", "failed", "embedded")} == {
        "added": 4, "updated": 0, "deleted": 0, "unchanged": 0, "failed": 0, "embedded": summary["embedded"]}
    assert summary["embedded"] > 4 and "seconds" in summary and "tokens" in summary
    (src / "bad.txt").write_bytes(b"\xff\xfe broken")
    partial = cli("sync", "--index", "docs")
    assert partial.returncode == 3 and "failed: bad.txt: not valid UTF-8" in partial.stderr
    (src / "bad.txt").unlink()
    for name in FILES:
        (src / name).unlink()
    refused = cli("sync", "--index", "docs")
    assert refused.returncode == 5
    assert refused.stderr.startswith("error: sync of 'docs' would delete 4") and "Traceback" not in refused.stderr
    status = cli("status", "--json")
    runs = json.loads(status.stdout)[0]["runs"]
    assert [r["status"] for r in runs] == ["error", "partial", "ok"]
    assert json.loads(status.stdout)[0]["source"]["path"] == str(src)
    no_source = cli("sync", "--index", "other")
    assert no_source.returncode == 2 and "has no source" in no_source.stderr


def test_one_sync_per_index_at_a_time(cfg, src: Path) -> None:
    from embedpipe.errors import IndexBusy
    from embedpipe.locks import index_lock

    sync(cfg, "docs")
    before = _corpus(cfg)
    _write(src, {"mars.txt": "Mars has dust storms."})
    with index_lock(cfg, "docs"):  # another sync (or ingest, or a cutover) holds the index
        with pytest.raises(IndexBusy, match="already running on index 'docs'"):
            sync(cfg, "docs")
    assert _corpus(cfg) == before
    assert last_runs(cfg, "docs")[0]["status"] == "error"
    assert sync(cfg, "docs").added == 1  # once free, the next run does the work


def test_hosted_profile_chunks_by_its_own_tokenizer(make_settings, openai_server, src: Path) -> None:
    from conftest import hosted_profile_toml
    from embedpipe.tokens import TokenCounter

    cfg = make_settings(
        'default_profile = "hosted"\n' + hosted_profile_toml(openai_server.base_url)
        + f'\n[indexes.docs]\nsource = "{src}"\nchunk_tokens = 20\nchunk_overlap = 4\n'
    )
    report = sync(cfg, "docs")
    assert (report.added, report.failed) == (4, 0)
    collection = _versions(cfg).require_live("docs").collection
    points = payloads(cfg, collection, ["chunk_id", "text"])
    counts = TokenCounter().count([p["text"] for p in points])
    assert len(points) > 8 and max(counts) <= 20  # cl100k tokens, as the API counts them
    # the tokens reported are exactly the ones the server billed, less the model check's probe
    from embedpipe.backends.hosted import PROBE_TEXT

    probe = TokenCounter().count([PROBE_TEXT])[0]
    assert report.tokens + probe == openai_server.counters()["tokens_billed"]
    assert sync(cfg, "docs").embedded == 0


def test_a_run_killed_mid_write_is_repaired_by_the_next(cfg, src: Path, monkeypatch) -> None:
    import embedpipe.ingest as ingest_mod

    sync(cfg, "docs")
    collection = _versions(cfg).require_live("docs").collection
    original = _whole(cfg, collection)["long.txt"]
    real_upsert = IndexVersions.upsert

    def half_then_die(self, coll, ids, vectors, payloads, batch=512):
        half = max(1, len(ids) // 2)
        real_upsert(self, coll, ids[:half], vectors[:half], payloads[:half])
        raise RuntimeError("killed mid-write")

    # 1. a shrinking edit dies half-written: old and new chunks mixed in the live index
    _write(src, {"long.txt": LONG[: len(LONG) // 3]})
    monkeypatch.setattr(IndexVersions, "upsert", half_then_die)
    with pytest.raises(RuntimeError):
        sync(cfg, "docs")
    monkeypatch.undo()
    assert _whole(cfg, collection)["long.txt"] is None  # half-written
    _write(src, {"long.txt": LONG})  # the edit is undone before the next run
    repaired = sync(cfg, "docs")
    assert any("interrupted run" in w for w in repaired.warnings)
    assert _whole(cfg, collection)["long.txt"] == original == _corpus(cfg)["long.txt"]

    # 2. a new document is written, the run dies before the corpus has it, the file goes
    _write(src, {"new.txt": "A short-lived note about comets."})
    monkeypatch.setattr(ingest_mod, "_commit_corpus", lambda *a: (_ for _ in ()).throw(RuntimeError("killed")))
    with pytest.raises(RuntimeError):
        sync(cfg, "docs")
    monkeypatch.undo()
    assert "new.txt" in _whole(cfg, collection) and "new.txt" not in _corpus(cfg)
    (src / "new.txt").unlink()
    sync(cfg, "docs")
    assert _whole(cfg, collection) == _corpus(cfg) and "new.txt" not in _whole(cfg, collection)
    assert not (cfg.data_dir / "pending" / "docs.json").exists()


def test_settle_puts_the_live_version_back_to_its_corpus_without_another_run(cfg, src: Path, monkeypatch) -> None:
    """What `embedpipe serve` does when it starts after a kill: the documents a cut run was
    writing are made as the corpus says, at once, not at the next sync."""
    import embedpipe.ingest as ingest_mod
    from embedpipe.ingest import settle, unsettled

    sync(cfg, "docs")
    collection = _versions(cfg).require_live("docs").collection
    before, chunks = _whole(cfg, collection), _chunk_ids(cfg, collection)
    assert before == _corpus(cfg) and unsettled(cfg) == [] and settle(cfg, "docs") is None
    # A shrinking edit and a new document, both written into the live version; the run
    # dies before the corpus has either.
    _write(src, {"long.txt": LONG[: len(LONG) // 3], "new.txt": "A short-lived note about comets."})
    monkeypatch.setattr(ingest_mod, "_commit_corpus", lambda *a: (_ for _ in ()).throw(RuntimeError("killed")))
    with pytest.raises(RuntimeError):
        sync(cfg, "docs")
    monkeypatch.undo()
    assert unsettled(cfg) == ["docs"]
    held = _whole(cfg, collection)
    assert "new.txt" in held and held["long.txt"] != before["long.txt"] and _corpus(cfg) == before

    said = settle(cfg, "docs")
    assert said == ("index 'docs': an interrupted write left 2 documents unsettled; removed 1 the corpus "
                    "never received, rewrote 1 from the corpus")
    assert _whole(cfg, collection) == _corpus(cfg) == before  # the old text, whole, each document once
    assert _chunk_ids(cfg, collection) == chunks  # the shrunk text's chunks back, none left over
    assert unsettled(cfg) == [] and settle(cfg, "docs") is None
    report = sync(cfg, "docs")  # the files still hold the edit: the next run applies it
    assert (report.added, report.updated) == (1, 1) and not report.warnings


def test_a_document_that_fails_to_embed_keeps_its_old_chunks(make_settings, openai_server, src: Path) -> None:
    from conftest import hosted_profile_toml

    cfg = make_settings(
        'default_profile = "hosted"\n' + hosted_profile_toml(
            openai_server.base_url, limits="max_retries = 0\nconcurrency = 1\n")
        + f'\n[indexes.docs]\nsource = "{src}"\nchunk_tokens = 20\nchunk_overlap = 4\n'
    )
    sync(cfg, "docs")
    collection = _versions(cfg).require_live("docs").collection
    before = _whole(cfg, collection)
    chunks = _chunk_ids(cfg, collection)
    _write(src, {"long.txt": LONG.replace("atmosphere", "magnetosphere")})  # every chunk changes
    server = openai_server.config
    server.faults_after_requests = openai_server.counters()["requests"] + 1  # spare the probe
    server.rate_500 = 1.0
    report = sync(cfg, "docs")
    assert (report.failed, report.updated) == (1, 0) and report.failures[0]["id"] == "long.txt"
    assert _whole(cfg, collection) == before  # the old version, whole
    assert _chunk_ids(cfg, collection) == chunks
    server.rate_500 = 0.0
    assert sync(cfg, "docs").updated == 1  # retried next run
    assert _whole(cfg, collection) == _corpus(cfg)


def test_a_chunk_size_the_model_cannot_take_creates_nothing(make_settings, src: Path) -> None:
    from embedpipe.errors import ConfigError

    body = f'[indexes.docs]\nsource = "{src}"\nchunk_tokens = %d\n'
    with pytest.raises(ConfigError, match="chunk_tokens = 300 exceeds .* 254"):
        sync(make_settings(body % 300), "docs")
    close_all()
    cfg = make_settings(body % 200)  # fixed in the config: the next run just works
    assert _versions(cfg).versions("docs") == []
    assert sync(cfg, "docs").added == 4
    assert _versions(cfg).require_live("docs").chunking == {"max_tokens": 200, "overlap": 32}


def _linking(make_settings, static_model_dir: Path, src: Path, follow: bool):
    close_all()  # a fresh Settings object opens the Qdrant folder again
    return make_settings(
        'default_profile = "static"\n' + static_profile_toml(static_model_dir)
        + f'\n[indexes.docs]\nsource = "{src}"\nfollow_symlinks = {str(follow).lower()}\n')


def test_links_out_of_the_source_are_skipped_reported_and_never_a_deletion(
    make_settings, static_model_dir: Path, src: Path, tmp_path: Path,
) -> None:
    private = tmp_path / "private"
    private.mkdir()
    (private / "secret.txt").write_text("The vault code is 7-4-1-9.", encoding="utf-8")
    (src / "leak.txt").symlink_to(private / "secret.txt")
    (src / "shared").symlink_to(private, target_is_directory=True)
    cfg = _linking(make_settings, static_model_dir, src, follow=False)
    report = sync(cfg, "docs")
    assert report.status == "ok" and report.failed == 0 and report.added == len(FILES)
    assert {s["path"] for s in report.skipped} == {"leak.txt", "shared/"}
    assert any(w.startswith("skipped leak.txt: symbolic link to ") for w in report.warnings)
    points = payloads(cfg, report.collection)
    assert not any("vault" in json.dumps(p) for p in points)
    assert "leak.txt" not in _corpus(cfg)

    followed = sync(_linking(make_settings, static_model_dir, src, follow=True), "docs")
    assert (followed.added, followed.skipped) == (2, [])  # leak.txt and shared/secret.txt
    cfg = _linking(make_settings, static_model_dir, src, follow=False)
    again = sync(cfg, "docs")  # the links are skipped again: what they gave stays indexed
    assert again.deleted == 0 and {"leak.txt", "shared/secret.txt"} <= _corpus(cfg).keys()
    assert {"leak.txt", "shared/secret.txt"} <= _whole(cfg, again.collection).keys()


def test_unlistable_folders_and_broken_links_are_kept_not_deleted(
    make_settings, static_model_dir: Path, src: Path, tmp_path: Path,
) -> None:
    cfg = _linking(make_settings, static_model_dir, src, follow=True)
    share = tmp_path / "share"
    share.mkdir()
    (share / "remote.txt").write_text("A file that lives on another share.", encoding="utf-8")
    (src / "remote.txt").symlink_to(share / "remote.txt")
    sync(cfg, "docs")
    assert "remote.txt" in _corpus(cfg)
    share.rename(tmp_path / "share-unmounted")  # the link's target is gone
    report = sync(cfg, "docs")
    assert report.deleted == 0 and report.failed == 1
    assert report.failures[0]["path"] == "remote.txt" and "broken symbolic link" in report.failures[0]["reason"]
    assert "remote.txt" in _whole(cfg, _versions(cfg).require_live("docs").collection)
