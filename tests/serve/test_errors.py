"""embedpipe's errors as HTTP answers, on the real application served by uvicorn in a
thread, with a few routes added that raise on purpose: every error class has its
status and the one body, and a bug is a 500 that leaves the connection open."""

from __future__ import annotations

import http.client
import json
import socket
import threading
from collections.abc import Iterator

import pytest

from embedpipe import errors as e
from embedpipe.serve.errors import STATUS

EXPECTED = {
    e.RequestTooLarge: 413, e.IndexNotFound: 404, e.DocumentNotFound: 404, e.SovereigntyError: 403,
    e.ConfigError: 400, e.InputError: 400, e.SourceUnavailable: 400, e.ChatRequestRejected: 400,
    e.IndexBusy: 409, e.FingerprintMismatch: 409, e.ValidationFailed: 409, e.NoBackendAvailable: 503,
    e.StreamInterrupted: 502, e.ModelDeprecated: 410, e.ProviderError: 502, e.WeightsNotFound: 500,
    e.ShardUnreadable: 503, e.QdrantUnavailable: 503, e.DiskFull: 507, e.DataDirReadOnly: 507,
    e.StoreError: 500, e.EngineError: 500, e.EmbedpipeError: 500,
    e.AuthenticationRequired: 401, e.AccessDenied: 403, e.RateLimited: 429, e.KeyFileInvalid: 503,
}
HEADERS = {  # what a status calls for
    e.AuthenticationRequired: ("www-authenticate", 'Bearer realm="embedpipe"'),
    e.RateLimited: ("retry-after", "3"),  # 2.2 s, rounded up to whole seconds
}


@pytest.fixture(scope="module")
def app_url(tmp_path_factory) -> Iterator[str]:
    import uvicorn
    from fastapi.responses import StreamingResponse

    from conftest import write_config
    from embedpipe.config import load_settings
    from embedpipe.serve.app import create_app

    folder = tmp_path_factory.mktemp("errors")
    app = create_app(load_settings(write_config(folder)))

    @app.get("/raise/{name}")
    def raise_(name: str) -> None:
        cls = getattr(e, name)
        if cls is e.UnknownProfile:
            raise cls("nope", ["a"])
        if cls is e.RateLimited:
            raise cls("over the limit", retry_after_s=2.2)
        raise cls("unknown profile")

    @app.get("/bug")
    def bug() -> None:
        raise RuntimeError("a bug with a secret in its message")

    @app.get("/broken-stream")
    def broken_stream() -> StreamingResponse:
        def chunks() -> Iterator[bytes]:
            yield b"data: first\n\n"
            raise RuntimeError("broke after the first byte")

        return StreamingResponse(chunks(), media_type="text/event-stream")

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="critical"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        threading.Event().wait(0.01)
    yield f"127.0.0.1:{sock.getsockname()[1]}"
    server.should_exit = True
    thread.join(timeout=30)


def test_the_table_covers_every_error_class() -> None:
    classes = {getattr(e, n) for n in e.__all__}
    for cls in classes:
        assert any(issubclass(cls, base) for base, _ in STATUS), cls
    assert set(EXPECTED) | {e.UnknownProfile} <= classes


@pytest.mark.parametrize("cls", sorted({*EXPECTED, e.UnknownProfile}, key=lambda c: c.__name__),
                         ids=lambda c: c.__name__)
def test_each_error_has_its_status_and_the_one_body(app_url, cls) -> None:
    conn = http.client.HTTPConnection(app_url, timeout=30)
    conn.request("GET", f"/raise/{cls.__name__}")
    answer = conn.getresponse()
    body = json.loads(answer.read())
    assert answer.status == EXPECTED.get(cls, 404)
    assert body == {"error": {"type": cls.__name__, "message": body["error"]["message"], "param": None}}
    assert body["error"]["message"]
    if cls in HEADERS:
        name, value = HEADERS[cls]
        assert answer.getheader(name) == value


def test_a_bug_is_a_500_without_detail_and_the_connection_stays_open(app_url) -> None:
    conn = http.client.HTTPConnection(app_url, timeout=30)
    conn.request("GET", "/bug")
    answer = conn.getresponse()
    text = answer.read().decode()
    assert answer.status == 500
    assert json.loads(text)["error"]["type"] == "InternalError"
    assert "secret" not in text and "Traceback" not in text
    conn.request("GET", "/healthz")  # the same connection, kept alive
    assert conn.getresponse().status == 200


def test_a_stream_that_breaks_is_cut_not_dressed_as_a_200(app_url) -> None:
    conn = http.client.HTTPConnection(app_url, timeout=30)
    conn.request("GET", "/broken-stream")
    answer = conn.getresponse()
    assert answer.status == 200  # the head went out before the failure
    with pytest.raises(http.client.IncompleteRead):
        answer.read()  # the chunked body never ends properly: the client knows it broke
