"""Ingest and search end to end: real model, real Qdrant local mode, real Parquet files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from embedpipe.corpus import CorpusStore
from embedpipe.errors import (
    ConfigError,
    FingerprintMismatch,
    IndexNotFound,
    InputError,
    QdrantUnavailable,
    UnknownProfile,
)
from embedpipe.index import Index, IndexVersions
from embedpipe.ingest import ingest
from embedpipe.qdrant import connect

from conftest import EXAMPLES, static_profile_toml, write_config, write_jsonl

DOCS = [
    {"id": "bread", "text": "Sourdough bread rises thanks to wild yeast and lactic acid bacteria.", "topic": "food"},
    {"id": "venus", "text": "Venus has a thick carbon dioxide atmosphere and a runaway greenhouse effect.", "topic": "space"},
    {"id": "tcp", "text": "TCP retransmits lost packets and uses a sliding window for flow control.", "topic": "net"},
    {"id": "piano", "text": "A grand piano has 88 keys and strings struck by felt hammers.", "topic": "music"},
]


@pytest.fixture
def docs_file(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "docs.jsonl", DOCS)


def _snapshot(settings, index: str) -> tuple[dict, list]:
    corpus = {k: v.record_hash for k, v in CorpusStore.for_index(settings.data_dir, index).known().items()}
    versions = IndexVersions.open(settings)
    state = [(v.collection, v.state, versions.count(v.collection)) for v in versions.versions(index)]
    return corpus, state


def test_ingest_then_search_finds_the_right_document(settings, docs_file: Path) -> None:
    report = ingest(settings, "kb", docs_file)
    assert (report.added, report.embedded, report.created_version) == (4, 4, True)
    idx = Index("kb", settings)
    hits = idx.search("why does dough rise?", k=2)
    assert hits[0].id == "bread"
    assert hits[0].metadata == {"topic": "food"} and "Sourdough" in hits[0].text
    assert idx.search("planet with a greenhouse atmosphere", k=1)[0].id == "venus"
    assert [h.id for h in idx.search("keys and hammers", k=4, filter={"topic": "net"})] == ["tcp"]
    live = idx.live()
    assert live.state == "live" and live.collection == "kb__local-minilm__v1"


def test_reingest_of_unchanged_input_embeds_nothing(settings, docs_file: Path) -> None:
    ingest(settings, "kb", docs_file)
    again = ingest(settings, "kb", docs_file)
    assert (again.unchanged, again.embedded, again.added, again.updated) == (4, 0, 0, 0)
    assert len(CorpusStore.for_index(settings.data_dir, "kb").folder.segments()) == 1


def test_changed_text_is_reembedded_and_metadata_only_is_not(settings, tmp_path: Path) -> None:
    ingest(settings, "kb", write_jsonl(tmp_path / "a.jsonl", DOCS))
    changed = [dict(d) for d in DOCS]
    changed[2]["text"] = "Photosynthesis turns light, water and carbon dioxide into sugar."
    changed[3]["topic"] = "instruments"
    report = ingest(settings, "kb", write_jsonl(tmp_path / "b.jsonl", changed))
    assert (report.updated, report.unchanged, report.embedded) == (2, 2, 1)
    idx = Index("kb", settings)
    assert idx.search("how do plants make sugar from light", k=1)[0].id == "tcp"
    assert idx.search("piano", k=1)[0].metadata == {"topic": "instruments"}
    assert IndexVersions.open(settings).count("kb__local-minilm__v1") == 4


def test_text_reverted_to_an_earlier_version_reuses_the_stored_vector(settings, tmp_path) -> None:
    ingest(settings, "kb", write_jsonl(tmp_path / "a.jsonl", DOCS))
    edited = [dict(DOCS[0], text="Rye bread is dense.")]
    assert ingest(settings, "kb", write_jsonl(tmp_path / "b.jsonl", edited)).embedded == 1
    back = ingest(settings, "kb", write_jsonl(tmp_path / "c.jsonl", DOCS[:1]))
    assert (back.updated, back.embedded, back.reused) == (1, 0, 1)


def test_directory_and_parquet_inputs(settings, tmp_path: Path) -> None:
    report = ingest(settings, "notes", EXAMPLES / "notes")
    ids = set(CorpusStore.for_index(settings.data_dir, "notes").known())
    assert report.added == len(ids) >= 4 and "rag-basics.md" in ids
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"id": ["p1", "p2"], "text": ["alpha particle", "beta decay"], "lab": ["x", "y"]}),
                   tmp_path / "in.parquet")
    assert ingest(settings, "pq", tmp_path / "in.parquet").added == 2
    assert Index("pq", settings).search("beta", k=1)[0].metadata == {"lab": "y"}


def test_a_changed_model_is_refused_for_queries_and_ingest(tmp_path: Path, docs_file: Path) -> None:
    from embedpipe.config import load_settings

    ingest(load_settings(write_config(tmp_path)), "kb", docs_file)
    from embedpipe.engine import close_all

    close_all()
    # Same profile name, different space: a query prompt was added to it.
    changed = load_settings(write_config(tmp_path, '[profiles.local-minilm]\nquery_prompt = "q: "\n'))
    with pytest.raises(FingerprintMismatch) as err:
        Index("kb", changed).search("bread")
    assert "kb__local-minilm__v1" in str(err.value) and "migrate" in str(err.value)
    with pytest.raises(FingerprintMismatch):
        ingest(changed, "kb", docs_file)


def test_profile_change_on_a_live_index_points_to_migrate(settings, docs_file) -> None:
    ingest(settings, "kb", docs_file)
    with pytest.raises(ConfigError, match="embedpipe migrate --to local-bge"):
        ingest(settings, "kb", docs_file, profile="local-bge")


def _bad_inputs(tmp: Path) -> dict[str, tuple[Path, str]]:
    good = "".join(json.dumps(d) + "\n" for d in DOCS[:2])
    cases = {
        "empty text": ('{"id": "x", "text": ""}\n', "empty text"),
        "whitespace text": ('{"id": "x", "text": "  \\n\\t "}\n', "empty text"),
        "duplicate ids": ('{"id": "bread", "text": "again"}\n', "duplicate id 'bread'"),
        "malformed line": ("{not json\n", ":3: malformed JSON"),
        "missing text": ('{"id": "x"}\n', "missing 'text'"),
    }
    out = {}
    for name, (extra, match) in cases.items():
        path = tmp / f"{name.replace(' ', '_')}.jsonl"
        path.write_text(good + extra, encoding="utf-8")
        out[name] = (path, match)
    latin = tmp / "latin1.jsonl"
    latin.write_bytes(good.encode() + '{"id": "z", "text": "café"}\n'.encode("latin-1"))
    out["non-UTF-8 bytes"] = (latin, "not valid UTF-8")
    surrogate = tmp / "surrogate.jsonl"
    surrogate.write_text(good + '{"id": "s", "text": "half \\ud800 pair"}\n', encoding="utf-8")
    out["lone surrogate"] = (surrogate, ":3: contains a lone surrogate")
    nan = tmp / "nan.jsonl"
    nan.write_text(good + '{"id": "n", "text": "t", "score": NaN}\n', encoding="utf-8")
    out["NaN metadata"] = (nan, ":3: NaN is not valid JSON")
    out["missing path"] = (tmp / "nope.jsonl", "does not exist")
    return out


@pytest.mark.parametrize(
    "case", ["empty text", "whitespace text", "duplicate ids", "malformed line", "missing text",
             "non-UTF-8 bytes", "missing path", "lone surrogate", "NaN metadata"]
)
def test_bad_input_is_refused_and_changes_nothing(settings, docs_file, tmp_path, case) -> None:
    ingest(settings, "kb", docs_file)
    before = _snapshot(settings, "kb")
    path, match = _bad_inputs(tmp_path)[case]
    with pytest.raises(InputError, match=match):
        ingest(settings, "kb", path)
    assert _snapshot(settings, "kb") == before
    assert not list((settings.data_dir / "corpus" / "kb").glob(".tmp-*"))


def test_bad_input_into_a_new_index_creates_nothing(settings, tmp_path) -> None:
    path, _ = _bad_inputs(tmp_path)["duplicate ids"]
    with pytest.raises(InputError):
        ingest(settings, "fresh", path)
    assert _snapshot(settings, "fresh") == ({}, [])


def test_unknown_profile_and_unknown_index(settings, docs_file) -> None:
    with pytest.raises(UnknownProfile, match="local-minilm"):
        ingest(settings, "kb", docs_file, profile="no-such-model")
    assert _snapshot(settings, "kb") == ({}, [])
    with pytest.raises(IndexNotFound, match="embedpipe ingest"):
        Index.open("kb", str(settings.config_path))


def test_unreachable_qdrant_url_is_a_clear_error(make_settings, docs_file) -> None:
    settings = make_settings('[qdrant]\nurl = "http://127.0.0.1:9"\ntimeout_s = 1\n')
    with pytest.raises(QdrantUnavailable, match="cannot reach Qdrant at http://127.0.0.1:9"):
        ingest(settings, "kb", docs_file)
    assert CorpusStore.for_index(settings.data_dir, "kb").count() == 0


def test_interrupted_first_build_resumes_and_only_then_goes_live(settings, docs_file, monkeypatch) -> None:
    calls = {"n": 0}
    original = IndexVersions.upsert

    def dies_after_first_chunk(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 1:
            raise KeyboardInterrupt  # stands in for a killed process
        return original(self, *args, **kwargs)

    monkeypatch.setattr(IndexVersions, "upsert", dies_after_first_chunk)
    from embedpipe import pipeline

    real = pipeline.embed_and_write
    monkeypatch.setattr("embedpipe.ingest.embed_and_write",
                        lambda *a, **k: real(*a, **{**k, "window": 2, "chunk": 2}))
    with pytest.raises(KeyboardInterrupt):
        ingest(settings, "kb", docs_file)
    versions = IndexVersions.open(settings)
    assert versions.live("kb") is None  # the alias never pointed at a partial collection
    assert versions.versions("kb")[0].state == "building"
    assert CorpusStore.for_index(settings.data_dir, "kb").count() == 0
    monkeypatch.setattr(IndexVersions, "upsert", original)
    report = ingest(settings, "kb", docs_file)
    # Vectors are stored before their points, so nothing computed before the crash is lost.
    assert report.created_version is False and (report.embedded, report.reused) == (0, 4)
    assert versions.require_live("kb").collection == "kb__local-minilm__v1"
    assert versions.count("kb__local-minilm__v1") == 4


def test_dry_run_reports_and_writes_nothing(settings, tmp_path: Path) -> None:
    first = ingest(settings, "kb", write_jsonl(tmp_path / "a.jsonl", DOCS[:2]), dry_run=True)
    assert (first.added, first.embedded, first.created_version, first.dry_run) == (2, 2, True, True)
    assert _snapshot(settings, "kb") == ({}, [])
    assert not (settings.data_dir / "vectors").exists()

    ingest(settings, "kb", write_jsonl(tmp_path / "b.jsonl", DOCS[:2]))
    before = _snapshot(settings, "kb")
    changed = [DOCS[0], dict(DOCS[1], text="A different text."), DOCS[2]]
    plan = ingest(settings, "kb", write_jsonl(tmp_path / "c.jsonl", changed), dry_run=True)
    assert (plan.added, plan.updated, plan.unchanged, plan.embedded) == (1, 1, 1, 2)
    assert _snapshot(settings, "kb") == before
    real = ingest(settings, "kb", write_jsonl(tmp_path / "c.jsonl", changed))
    assert (real.added, real.updated, real.unchanged, real.embedded) == (1, 1, 1, 2)


def test_dry_run_stages_nothing_and_takes_no_lock(settings, tmp_path: Path) -> None:
    from conftest import files_under

    ingest(settings, "kb", write_jsonl(tmp_path / "a.jsonl", DOCS[:2]))
    before = files_under(settings.data_dir)
    changed = write_jsonl(tmp_path / "b.jsonl", [DOCS[0], dict(DOCS[1], text="Changed."), DOCS[2]])
    plan = ingest(settings, "kb", changed, dry_run=True)
    assert (plan.added, plan.updated, plan.embedded) == (1, 1, 2)
    fresh = ingest(settings, "other", changed, dry_run=True)  # an index that does not exist yet
    assert (fresh.added, fresh.created_version) == (3, True)
    # No staged segment, no lock file, no folder for the new index: nothing at all.
    assert files_under(settings.data_dir) == before
    assert not (settings.data_dir / "corpus" / "other").exists()


def test_empty_query_is_refused(settings, docs_file) -> None:
    ingest(settings, "kb", docs_file)
    with pytest.raises(InputError, match="query is empty"):
        Index("kb", settings).search("   ")


def test_search_follows_the_alias_to_a_new_version(settings, docs_file, static_model_dir, tmp_path) -> None:
    """After the alias moves, queries are embedded by the new version's own model."""
    from embedpipe.config import load_settings

    from conftest import static_profile_toml

    ingest(settings, "kb", docs_file)
    both = load_settings(write_config(tmp_path, static_profile_toml(static_model_dir)))
    idx = Index("kb", both, refresh_s=0)
    assert idx.search("sourdough yeast", k=1)[0].id == "bread"
    assert idx.embedder().profile.name == "local-minilm"
    # Build a second index version on the static model by hand, then cut over.
    versions = IndexVersions.open(both)
    from embedpipe.backends import build_embedder

    static = build_embedder(both.profile("static"), device="cpu")
    v2 = versions.create_version("kb", both.profile("static"), static.fingerprint)
    vecs = static.embed_documents([d["text"] for d in DOCS]).vectors
    versions.upsert(v2.collection, [d["id"] for d in DOCS], vecs, [{"id": d["id"]} for d in DOCS])
    versions.point_alias("kb", v2)
    assert idx.search("sourdough yeast", k=1)[0].id == "bread"
    assert idx.embedder().profile.name == "static"
    states = {v.collection: v.state for v in versions.versions("kb")}
    assert states == {"kb__local-minilm__v1": "standby", "kb__static__v2": "live"}


def test_a_byte_order_mark_is_accepted(settings, tmp_path: Path) -> None:
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + "".join(json.dumps(d) + "\n" for d in DOCS).encode())
    assert ingest(settings, "kb", path).added == 4
    assert "bread" in CorpusStore.for_index(settings.data_dir, "kb").known()


def test_a_resumed_build_drops_points_no_longer_in_the_input(settings, docs_file, tmp_path) -> None:
    """A build interrupted on input A and re-run on input B must hold exactly B."""
    from embedpipe.backends import build_embedder
    from embedpipe.index import point_id

    profile = settings.profile()
    versions = IndexVersions.open(settings)
    fp = build_embedder(profile).fingerprint
    stale = versions.create_version("kb", profile, fp)  # what the crashed run left
    vector = build_embedder(profile).embed_documents(["an old draft"]).vectors
    versions.upsert(stale.collection, ["draft"], vector, [{"id": "draft"}])

    report = ingest(settings, "kb", docs_file)
    assert report.created_version is False and report.collection == stale.collection
    assert versions.require_live("kb").collection == stale.collection
    assert versions.point_ids(stale.collection) == {point_id(d["id"]) for d in DOCS}


def test_a_model_that_fails_its_check_creates_no_collection(make_settings, docs_file) -> None:
    settings = make_settings("[profiles.local-minilm]\ndims = 512\n")
    from embedpipe.errors import DimensionMismatch

    with pytest.raises(DimensionMismatch, match="dims = 512 but the model outputs 384"):
        ingest(settings, "kb", docs_file)
    assert _snapshot(settings, "kb") == ({}, [])


@pytest.mark.parametrize(
    "bad, match",
    [({"topic": None}, "filter topic=None"), ({"topic": {"a": 1}}, "filter topic="),
     ({"topic": []}, "non-empty list"), ({"n": [1, "a"]}, "filter n=")],
)
def test_bad_filters_are_input_errors(settings, docs_file, bad, match) -> None:
    ingest(settings, "kb", docs_file)
    with pytest.raises(InputError, match=match):
        Index("kb", settings).search("bread", filter=bad)


def test_filters_on_numbers_booleans_and_lists(settings, tmp_path) -> None:
    docs = [dict(d, score=float(i) + 0.5, even=i % 2 == 0, rank=i) for i, d in enumerate(DOCS)]
    ingest(settings, "kb", write_jsonl(tmp_path / "n.jsonl", docs))
    idx = Index("kb", settings)
    assert [h.id for h in idx.search("anything", k=4, filter={"score": 1.5})] == ["venus"]
    assert {h.id for h in idx.search("anything", k=4, filter={"even": True})} == {"bread", "tcp"}
    assert {h.id for h in idx.search("anything", k=4, filter={"rank": [0, 3]})} == {"bread", "piano"}


@pytest.fixture
def static(make_settings, static_model_dir: Path):
    """Settings whose default profile is the fast static model."""
    return make_settings('default_profile = "static"\n' + static_profile_toml(static_model_dir))


def test_ingest_of_a_folder_skips_and_reports_links_out_of_it(static, tmp_path: Path) -> None:
    folder, private = tmp_path / "notes", tmp_path / "private"
    folder.mkdir()
    private.mkdir()
    (folder / "own.md").write_text("A note that belongs to the folder.", encoding="utf-8")
    (private / "key.txt").write_text("ssh private key material", encoding="utf-8")
    (folder / "key.txt").symlink_to(private / "key.txt")
    report = ingest(static, "kb", folder)
    assert report.added == 1 and report.failed == 0
    assert [s["path"] for s in report.skipped] == ["key.txt"]
    assert report.warnings == [f"skipped key.txt: symbolic link to {private / 'key.txt'}, outside "
                               "the source; set follow_symlinks = true in the index's settings to read it"]
    assert set(CorpusStore.for_index(static.data_dir, "kb").known()) == {"own.md"}


def test_cli_filters_match_csv_text_and_jsonl_numbers(tmp_path: Path, static_model_dir: Path,
                                                      capsys, monkeypatch) -> None:
    from conftest import cli

    config = write_config(tmp_path, 'default_profile = "static"\n' + static_profile_toml(static_model_dir))
    folder = tmp_path / "src"
    folder.mkdir()
    (folder / "a.csv").write_text("id,text,year,draft\ncsv1,Bread rises with yeast.,2024,true\n"
                                  "csv2,Tides follow the moon.,2023,false\n", encoding="utf-8")
    write_jsonl(folder / "b.jsonl", [{"id": "js1", "text": "Venus is hot.", "year": 2024, "draft": True},
                                     {"id": "js2", "text": "Pianos have keys.", "year": "2024x"}])
    assert cli(capsys, monkeypatch, "-c", str(config), "ingest", str(folder), "--index", "kb")[0] == 0

    def ids(*filters: str) -> set[str]:
        args = [a for f in filters for a in ("--filter", f)]
        code, out, err = cli(capsys, monkeypatch, "-c", str(config), "search", "anything", "--index", "kb",
                             "-k", "10", "--json", *args)
        assert code == 0, err
        return {h["id"] for h in json.loads(out)}

    assert ids("year=2024") == {"csv1", "js1"}  # the CSV text "2024" and the JSONL number
    assert ids("draft=true") == {"csv1", "js1"}
    assert ids("year=2024x") == {"js2"}
    assert ids("year=2024", "draft=false") == set()


def _with_bad_records(tmp_path: Path, rows: int = 2000) -> Path:
    """A large JSONL file with an empty text, a malformed line and a duplicate id in it."""
    lines = [json.dumps({"id": f"d{i}", "text": f"Document number {i} about topic {i % 17}."})
             for i in range(rows)]
    lines[10] = json.dumps({"id": "empty", "text": "  "})  # lines 11, rows/4 + 1, 3 rows/4 + 1
    lines[rows // 4] = '{"id": "broken", "text": '
    lines[rows * 3 // 4] = json.dumps({"id": "d3", "text": "a second d3"})
    path = tmp_path / "big.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_skip_invalid_ingests_the_rest_and_reports_each_bad_record(static, tmp_path: Path) -> None:
    path = _with_bad_records(tmp_path)
    with pytest.raises(InputError, match=":11: document 'empty' has empty text"):
        ingest(static, "kb", path)  # the default refuses the whole input
    assert _snapshot(static, "kb") == ({}, [])

    report = ingest(static, "kb", path, skip_invalid=True)
    assert report.added == 1997 and report.failed == 3
    bad = [(f["path"], f["line"], f["id"]) for f in report.failures]
    assert bad == [(str(path), 11, "empty"), (str(path), 501, None), (str(path), 1501, "d3")]
    assert "duplicate id 'd3' (first seen at" in report.failures[2]["reason"]
    assert not any(f["reason"].startswith(str(path)) for f in report.failures)  # place: path/line
    known = CorpusStore.for_index(static.data_dir, "kb").known()
    assert len(known) == 1997 and "empty" not in known and "broken" not in known
    versions = IndexVersions.open(static)
    assert versions.count(versions.live("kb").collection) == 1997


def test_on_invalid_skip_in_config_and_cli_exit_code(tmp_path: Path, static_model_dir: Path,
                                                     capsys, monkeypatch) -> None:
    from conftest import cli

    path = _with_bad_records(tmp_path, rows=80)
    base = 'default_profile = "static"\n' + static_profile_toml(static_model_dir)
    config = write_config(tmp_path, base)
    code, out, err = cli(capsys, monkeypatch, "-c", str(config), "ingest", str(path), "--index", "kb")
    assert code != 0 and code != 3 and ":11: document 'empty' has empty text" in err

    code, out, err = cli(capsys, monkeypatch, "-c", str(config), "ingest", str(path), "--index", "kb",
                         "--skip-invalid")
    assert code == 3, err  # partial: some documents are not in the index
    assert "77 added" in out and "3 failed" in out
    assert f"failed: {path}:11: empty: document 'empty' has empty text" in err

    config = write_config(tmp_path, base + '\n[indexes.kb]\non_invalid = "skip"\n')
    code, out, err = cli(capsys, monkeypatch, "-c", str(config), "ingest", str(path), "--index", "kb",
                         "--json")
    assert code == 3
    report = json.loads(out)
    assert report["unchanged"] == 77 and report["failed"] == 3
    assert [(f["line"], f["id"]) for f in report["failures"]] == [(11, "empty"), (21, None), (61, "d3")]
    code, out, err = cli(capsys, monkeypatch, "-c", str(config), "ingest", str(path), "--index", "kb",
                         "--fail-on-invalid")
    assert code not in (0, 3) and ":11: document 'empty' has empty text" in err


def test_documents_a_caller_holds_are_ingested_like_a_file(static_model_dir, make_settings) -> None:
    """``ingest_documents`` (what the server's documents endpoint calls): the records are
    checked like a file's, the batch is diffed, and a bad record anywhere writes nothing."""
    from embedpipe.ingest import ingest_documents
    from embedpipe.sources import documents_from_records

    settings = make_settings(static_profile_toml(static_model_dir))
    records = [{"id": d["id"], "text": d["text"], "metadata": {"topic": d["topic"]}} for d in DOCS]
    report = ingest_documents(settings, "api", documents_from_records(records), profile="static")
    assert (report.added, report.embedded, report.created_version) == (4, 4, True)
    hit = Index("api", settings).search("greenhouse effect on a planet", k=1)[0]
    assert hit.id == "venus" and hit.metadata == {"topic": "space"}
    assert ingest_documents(settings, "api", documents_from_records(records)).embedded == 0
    before = _snapshot(settings, "api")
    with pytest.raises(InputError, match=r"^documents\[1\]: duplicate id 'x'"):
        documents_from_records([{"id": "x", "text": "a"}, {"id": "x", "text": "b"}])

    def failing():  # a stream of documents that breaks part way
        yield from documents_from_records([{"id": "new", "text": "A new document."}])
        raise InputError("the source broke")

    with pytest.raises(InputError, match="the source broke"):
        ingest_documents(settings, "api", failing())
    assert _snapshot(settings, "api") == before


def test_settle_keeps_the_journal_when_the_model_cannot_rewrite(make_settings, openai_server, monkeypatch) -> None:
    """``settle`` rewrites documents from the corpus with stored vectors; when it must
    embed and the model fails, the journal stays (the next ingest retries), and a later
    settle completes."""
    import shutil

    import embedpipe.ingest as ingest_mod
    from conftest import hosted_profile_toml
    from embedpipe.errors import EmbedpipeError
    from embedpipe.ingest import ingest_documents, settle, unsettled
    from embedpipe.layout import Layout
    from embedpipe.sources import documents_from_records

    settings = make_settings(hosted_profile_toml(openai_server.base_url, limits="max_retries = 0"))
    records = [{"id": d["id"], "text": d["text"]} for d in DOCS]
    ingest_documents(settings, "kb", documents_from_records(records), profile="hosted")
    versions = IndexVersions.open(settings)
    live = versions.require_live("kb")
    before = versions.contents(live.collection)

    with monkeypatch.context() as patched, pytest.raises(RuntimeError):
        patched.setattr(ingest_mod, "_commit_corpus", lambda *a: (_ for _ in ()).throw(RuntimeError("killed")))
        ingest_documents(settings, "kb", documents_from_records([{"id": "bread", "text": "Rye bread is dense."}]))
    assert versions.contents(live.collection) != before  # the engine has the new text, the corpus not
    shutil.rmtree(Layout(settings.data_dir).vectors(live.fingerprint))  # so the rewrite must embed
    openai_server.configure(rate_500=1.0)
    with pytest.raises(EmbedpipeError, match="index 'kb': 1 documents an interrupted write left could not be "
                                             "rewritten from the corpus"):
        settle(settings, "kb")
    assert unsettled(settings) == ["kb"]
    openai_server.configure(rate_500=0.0)
    assert settle(settings, "kb").endswith("removed 0 the corpus never received, rewrote 1 from the corpus")
    assert versions.contents(live.collection) == before and unsettled(settings) == []
