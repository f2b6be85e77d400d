"""The engine is a rebuildable cache of the Parquet files: a deleted or damaged shard
names `embedpipe rebuild`, which restores it embedding nothing; a data directory made by
an earlier release (qdrant-client local mode) is converted on first use, from the
Parquet files, and its old folder stays until `embedpipe retire`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from embedpipe.engine import close_all
from embedpipe.index import Index

from conftest import EXAMPLES, cli, static_profile_toml, write_config

QUERIES = ["which planet has a runaway greenhouse effect?", "how do vaccines train immunity?"]


@pytest.fixture
def built(tmp_path: Path, static_model_dir: Path, capsys, monkeypatch) -> Path:
    config = write_config(tmp_path, 'default_profile = "static"\n' + static_profile_toml(static_model_dir)
                          + "\n[indexes.kb]\nchunk_tokens = 24\nchunk_overlap = 4\n")
    code, out, err = cli(capsys, monkeypatch, "-c", str(config), "ingest",
                         str(EXAMPLES / "corpus" / "docs.jsonl"), "--index", "kb")
    assert code == 0, err
    return config


def _results(config: Path) -> list[list[tuple[str, str | None]]]:
    from embedpipe.config import load_settings

    index = Index("kb", load_settings(config))
    out = [[(h.id, h.chunk_id) for h in index.search(q, k=5)] for q in QUERIES]
    close_all()
    return out


def _embedding_forbidden(monkeypatch) -> None:
    from embedpipe.backends.local import LocalEmbedder

    def refuse(self, texts):
        raise AssertionError(f"embedded {len(texts)} texts")

    monkeypatch.setattr(LocalEmbedder, "embed_documents", refuse)


def test_a_deleted_shard_names_rebuild_which_restores_it_embedding_nothing(built, capsys, monkeypatch) -> None:
    before = _results(built)
    shard = built.parent / "data" / "engine" / "kb__static__v1"
    points = json.loads(cli(capsys, monkeypatch, "-c", str(built), "status", "--json")[1])[0]["versions"][0]["points"]
    close_all()  # as a new process finds it
    shutil.rmtree(shard)

    code, out, err = cli(capsys, monkeypatch, "-c", str(built), "search", QUERIES[0], "--index", "kb")
    assert code == 66 and err.count("\n") == 1
    assert "missing" in err and "embedpipe rebuild --index kb" in err
    code, out, err = cli(capsys, monkeypatch, "-c", str(built), "status", "--json")
    assert code == 0 and "embedpipe rebuild" in json.loads(out)[0]["versions"][0]["error"]

    _embedding_forbidden(monkeypatch)
    code, out, err = cli(capsys, monkeypatch, "-c", str(built), "rebuild", "--index", "kb", "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["embedded"] == 0 and report["failed"] == 0
    assert report["points"] == points and report["reused"] == points
    assert report["versions"] == ["kb__static__v1"] and report["seconds"] >= 0
    assert _results(built) == before


def test_a_damaged_shard_is_one_line_naming_rebuild(built, capsys, monkeypatch) -> None:
    close_all()
    (built.parent / "data" / "engine" / "kb__static__v1" / "edge_config.json").write_text("{")
    code, out, err = cli(capsys, monkeypatch, "-c", str(built), "search", QUERIES[0], "--index", "kb")
    assert code == 66 and err.count("\n") == 1 and "cannot be loaded" in err
    assert "embedpipe rebuild --index kb" in err


def test_an_interrupted_rebuild_is_refused_by_search_until_finished(built, capsys, monkeypatch) -> None:
    import embedpipe.rebuild as rebuild

    from embedpipe.config import load_settings

    def dies(*args, **kwargs):
        raise RuntimeError("the process died here")

    monkeypatch.setattr(rebuild, "sync_version", dies)
    with pytest.raises(RuntimeError, match="died here"):
        rebuild.rebuild(load_settings(built), "kb")
    monkeypatch.undo()
    close_all()
    code, out, err = cli(capsys, monkeypatch, "-c", str(built), "search", QUERIES[0], "--index", "kb")
    assert code == 66 and "rebuild was interrupted" in err
    code, out, err = cli(capsys, monkeypatch, "-c", str(built), "rebuild", "--index", "kb", "--json")
    assert code == 0 and json.loads(out)["failed"] == 0
    assert cli(capsys, monkeypatch, "-c", str(built), "search", QUERIES[0], "--index", "kb")[0] == 0


def make_earlier_release_data_dir(config: Path, monkeypatch) -> None:
    """Build the index as releases before the engine layer did: qdrant-client local mode
    under <data>/qdrant (the server engine over it), and no <data>/engine."""
    import embedpipe.engine as engine
    from embedpipe.config import load_settings
    from embedpipe.engine.server import ServerEngine
    from embedpipe.ingest import ingest
    from embedpipe.qdrant import connect

    with monkeypatch.context() as patch:
        patch.setattr(engine, "_open", lambda settings: ServerEngine(connect(settings), settings))
        settings = load_settings(config)
        ingest(settings, "kb", EXAMPLES / "corpus" / "docs.jsonl")
        ingest(settings, "kb", EXAMPLES / "notes")
    close_all()
    shutil.rmtree(config.parent / "data" / "engine", ignore_errors=True)


def test_an_earlier_release_data_directory_is_converted_without_embedding(
        tmp_path: Path, static_model_dir: Path, capsys, monkeypatch) -> None:
    config = write_config(tmp_path, 'default_profile = "static"\n' + static_profile_toml(static_model_dir))
    make_earlier_release_data_dir(config, monkeypatch)
    data = tmp_path / "data"
    assert (data / "qdrant" / "meta.json").is_file() and not (data / "engine").exists()
    from embedpipe.config import load_settings
    from embedpipe.engine.server import ServerEngine
    from embedpipe.index import IndexVersions
    from embedpipe.qdrant import connect

    settings = load_settings(config)
    old = IndexVersions(ServerEngine(connect(settings), settings), settings)
    old_points = old.count("kb__static__v1")
    old_results = [[h.id for h in old.search("kb__static__v1", Index("kb", settings).embedder().embed_query(q), 5)]
                   for q in QUERIES]
    close_all()

    _embedding_forbidden(monkeypatch)
    code, out, err = cli(capsys, monkeypatch, "-c", str(config), "status", "--json")
    assert code == 0, err
    status = json.loads(out)[0]
    assert status["alias"] == "kb__static__v1" and status["versions"][0]["points"] == old_points
    assert (data / "engine" / "converted-from-local-mode.json").is_file()
    assert (data / "qdrant" / "meta.json").is_file()  # left for retire
    monkeypatch.undo()
    close_all()
    assert [[i for i, _ in r] for r in _results(config)] == old_results

    code, out, err = cli(capsys, monkeypatch, "-c", str(config), "retire", "--index", "kb", "--yes")
    assert code == 0, err
    assert "converted to the engine" in out and not (data / "qdrant").exists()
