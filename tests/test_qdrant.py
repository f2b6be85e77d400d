"""The server engine on qdrant-client's local mode (the stand-in for a Qdrant server in
tests, and what earlier releases kept under <data>/qdrant): collections' SQLite files are
put in write-ahead-log mode, and points written through it survive reopening."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import numpy as np
import pytest

from embedpipe.engine.server import ServerEngine
from embedpipe.index import IndexVersions
from embedpipe.qdrant import close_all, connect, prefer_wal


def _local_mode(settings) -> IndexVersions:
    return IndexVersions(ServerEngine(connect(settings), settings), settings)


def _journal_mode(settings, collection: str) -> str:
    path = Path(settings.qdrant_path) / "collection" / collection / "storage.sqlite"
    con = sqlite3.connect(path)
    try:
        return con.execute("PRAGMA journal_mode").fetchone()[0]
    finally:
        con.close()


def test_a_new_version_is_written_through_a_write_ahead_log_and_survives_reopening(settings) -> None:
    versions = _local_mode(settings)
    profile = settings.profile("local-minilm")
    version = versions.create_version("kb", profile, "fp")
    ids = [f"doc-{i}" for i in range(5)]
    payloads = [{"id": i, "content_hash": f"ch-{i}"} for i in ids]
    versions.upsert(version.collection, ids, np.ones((5, profile.dims), np.float32), payloads)
    folder = Path(settings.qdrant_path) / "collection" / version.collection
    assert (folder / "storage.sqlite-wal").exists()  # Qdrant's own connection follows the mode
    close_all()

    assert _journal_mode(settings, version.collection) == "wal"
    reopened = _local_mode(settings)
    assert reopened.count(version.collection) == 5


def test_a_collection_made_by_another_tool_is_switched_when_opened(settings) -> None:
    from qdrant_client import QdrantClient, models

    settings.qdrant_path.mkdir(parents=True)
    plain = QdrantClient(path=str(settings.qdrant_path))
    plain.create_collection("theirs", vectors_config=models.VectorParams(
        size=4, distance=models.Distance.COSINE))
    plain.upsert("theirs", points=[models.PointStruct(id=1, vector=[1.0, 0, 0, 0])])
    plain.close()
    assert _journal_mode(settings, "theirs") == "delete"  # SQLite's default

    assert connect(settings).count("theirs").count == 1
    assert _journal_mode(settings, "theirs") == "wal"


def test_a_busy_storage_file_is_left_as_it_is(settings) -> None:
    folder = Path(settings.qdrant_path) / "collection" / "busy"
    folder.mkdir(parents=True)
    holder = sqlite3.connect(folder / "storage.sqlite", isolation_level=None)
    holder.execute("CREATE TABLE points (id TEXT PRIMARY KEY, point BLOB)")
    holder.execute("BEGIN EXCLUSIVE")
    try:
        prefer_wal(settings, "busy")  # an optimisation: a locked file is no error
    finally:
        holder.execute("ROLLBACK")
    assert holder.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
    holder.close()


@pytest.mark.filterwarnings("ignore:Api key is used with an insecure connection")
def test_the_qdrant_key_never_crosses_plain_http_to_another_host(tmp_path, monkeypatch) -> None:

    from conftest import write_config
    from embedpipe.config import load_settings
    from embedpipe.errors import ConfigError, QdrantUnavailable

    monkeypatch.setenv("QDRANT_API_KEY", "qd-secret-key")
    remote = '[qdrant]\nurl = "http://qdrant.invalid:6333"\ntimeout_s = 1\n'
    with pytest.raises(ConfigError, match=r"in clear text to http://qdrant.invalid:6333.*"
                                          r"allow_insecure_key = true under \[qdrant\]") as err:
        connect(load_settings(write_config(tmp_path, remote)))
    assert "qd-secret-key" not in str(err.value)
    # Said so, or https, or this machine: a connection is attempted (none listens here).
    for body in (remote + "allow_insecure_key = true\n", remote.replace("http:", "https:"),
                 '[qdrant]\nurl = "http://127.0.0.1:9"\ntimeout_s = 1\n'):
        with pytest.raises(QdrantUnavailable):
            connect(load_settings(write_config(tmp_path, body)))
