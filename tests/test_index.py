"""IndexVersions: the cutover check on Qdrant local mode, and a misbehaving Qdrant server
whose errors come out as QdrantUnavailable."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from embedpipe.corpus import Document, record_hash
from embedpipe.errors import EmbedpipeError, QdrantUnavailable
from embedpipe.index import IndexVersions, point_id
from embedpipe.qdrant import connect


class _HalfBrokenQdrant(BaseHTTPRequestHandler):
    """Answers the health probe (GET /collections), then 503 to everything else."""

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        if self.path.startswith("/collections") and self.path.rstrip("/") == "/collections":
            self._reply(200, {"result": {"collections": []}, "status": "ok", "time": 0.0})
        else:
            self._reply(503, {"status": {"error": "service overloaded, retry later"}, "time": 0.0})

    def _reply(self, code: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def broken_qdrant_url() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _HalfBrokenQdrant)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_http_errors_from_qdrant_are_one_line_errors(make_settings, broken_qdrant_url) -> None:
    settings = make_settings(f'[qdrant]\nurl = "{broken_qdrant_url}"\ntimeout_s = 0.5\n')
    versions = IndexVersions.open(settings)
    with pytest.raises(QdrantUnavailable, match="HTTP 503 while listing aliases: .*overloaded"):
        versions.live("kb")


def _payload(doc: str, chunk: int = 0, chunks: int = 1) -> dict:
    return {"id": doc, "record_hash": f"rh-{doc}", "content_hash": f"ch-{doc}", "chunk": chunk,
            "chunks": chunks}


def test_cutover_drops_strays_and_refuses_a_version_missing_documents(settings) -> None:
    versions = IndexVersions.open(settings)
    profile = settings.profile("local-minilm")
    version = versions.create_version("kb", profile, "fp")
    legacy = Document("old", "text", metadata={"lang": "en"})  # written before record_hash
    payloads = [
        _payload("a"),
        {"id": "old", "content_hash": "ch-old", "metadata": {"lang": "en"}},
        _payload("half", chunk=0, chunks=2),  # its chunk 1 never landed
        _payload("stray"),  # deleted from the corpus while the version was building
    ]
    ids = [p["id"] for p in payloads]
    versions.upsert(version.collection, ids, np.ones((4, profile.dims), np.float32), payloads)

    with pytest.raises(EmbedpipeError, match="lacks 2 of the corpus's 4 documents; the alias was not moved"):
        versions.go_live("kb", version, {"a", "old", "half", "missing"})
    assert "kb" not in versions.aliases()
    assert versions.point_ids(version.collection) == {point_id(i) for i in ("a", "old", "half")}

    held = versions.holdings(version.collection)
    assert held["old"].record_hash == record_hash("ch-old", legacy.metadata_json)
    assert held["half"].record_hash is None and held["half"].points == (point_id("half"),)
    versions.go_live("kb", version, {"a", "old"})  # "half" was deleted meanwhile
    assert versions.aliases()["kb"] == version.collection
    assert versions.point_ids(version.collection) == {point_id("a"), point_id("old")}
