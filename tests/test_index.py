"""IndexVersions against a Qdrant server that misbehaves: errors come out as QdrantUnavailable."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from embedpipe.errors import QdrantUnavailable
from embedpipe.index import IndexVersions
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
    versions = IndexVersions(connect(settings), settings)
    with pytest.raises(QdrantUnavailable, match="HTTP 503 while listing aliases: .*overloaded"):
        versions.live("kb")
