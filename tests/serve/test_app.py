"""The server's own endpoints, through httpx against a real ``embedpipe serve``: health,
indexes, search, documents, deletes, limits, errors, and a search that goes on while a
documents batch is being written."""

from __future__ import annotations

import json
import threading

import httpx
import numpy as np
import pytest

from .conftest import DOCS, MAX_BATCH, MAX_BODY, MAX_K


def _error(answer: httpx.Response, status: int, type_: str) -> dict:
    """The one error body: status, type, a one-line message, never a traceback."""
    assert answer.status_code == status, answer.text
    body = answer.json()
    assert set(body) == {"error"} and set(body["error"]) == {"type", "message", "param"}
    assert body["error"]["type"] == type_, body
    assert "Traceback" not in answer.text and "\n" not in body["error"]["message"]
    return body["error"]


def test_healthz(http, served) -> None:
    body = http.get("/healthz").json()
    assert body["status"] == "ok" and body["pid"] == served.proc.pid
    assert body["data_dir"] == str(served.data_dir) and body["writing"] is False


def test_indexes_are_what_status_says(http, kb) -> None:
    listed = http.get("/v1/indexes").json()
    entry = next(e for e in listed if e["index"] == kb)
    assert entry["documents"] == len(DOCS) and entry["alias"] == "kb__static__v1"
    (version,) = entry["versions"]
    assert version["live"] and version["profile"] == "static" and version["points"] == len(DOCS)
    assert http.get(f"/v1/indexes/{kb}").json() == entry
    _error(http.get("/v1/indexes/nope"), 404, "IndexNotFound")
    _error(http.get("/v1/indexes/a__b"), 400, "ConfigError")


def test_search_embeds_the_query_with_the_index_model(http, kb) -> None:
    answer = http.post(f"/v1/indexes/{kb}/search", json={"query": "how are fjords formed?", "k": 2})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["collection"] == "kb__static__v1" and body["profile"] == "static"
    assert [h["id"] for h in body["hits"]][0] == "fjord"
    assert body["hits"][0]["text"] == DOCS[0]["text"] and body["hits"][0]["metadata"] == DOCS[0]["metadata"]
    status = http.get(f"/v1/indexes/{kb}").json()
    assert body["fingerprint"] == status["versions"][0]["fingerprint"]


def test_search_by_vector_finds_what_the_query_finds(http, kb) -> None:
    by_text = http.post(f"/v1/indexes/{kb}/search", json={"query": "molten lava", "k": 3}).json()
    vector = http.post("/v1/embeddings", json={"model": f"index:{kb}", "input": "molten lava",
                                               "input_type": "query"}).json()
    by_vector = http.post(f"/v1/indexes/{kb}/search", json={
        "vector": vector["data"][0]["embedding"], "fingerprint": vector["fingerprint"], "k": 3}).json()
    assert [h["id"] for h in by_vector["hits"]] == [h["id"] for h in by_text["hits"]]
    assert np.allclose([h["score"] for h in by_vector["hits"]], [h["score"] for h in by_text["hits"]],
                       atol=1e-5)


def test_a_vector_of_another_space_is_refused(http, kb) -> None:
    err = _error(http.post(f"/v1/indexes/{kb}/search", json={"vector": [0.1] * 384}), 400, "InputError")
    assert "256" in err["message"] and "384" in err["message"]
    err = _error(http.post(f"/v1/indexes/{kb}/search", json={"vector": [0.1] * 256, "fingerprint": "ab" * 32}),
                 409, "FingerprintMismatch")
    assert "index:kb" in err["message"]


def test_filters_and_group_by(http, kb) -> None:
    hits = http.post(f"/v1/indexes/{kb}/search", json={"query": "rocks", "k": 10, "filter": {"kind": "cs"}}).json()["hits"]
    assert {h["id"] for h in hits} == {"compiler", "notes/cache.md"}
    hits = http.post(f"/v1/indexes/{kb}/search", json={"query": "rocks", "k": 10, "filter": {"year": [2021, 2024]}}).json()["hits"]
    assert {h["id"] for h in hits} == {"fjord", "notes/cache.md"}
    grouped = http.post(f"/v1/indexes/{kb}/search", json={"query": "rocks", "k": 2, "group_by_doc": True})
    assert grouped.status_code == 200 and len(grouped.json()["hits"]) == 2
    err = _error(http.post(f"/v1/indexes/{kb}/search", json={"query": "x", "filter": {"kind": {"a": 1}}}),
                 400, "InputError")
    assert err["message"].startswith("filter kind=")


@pytest.mark.parametrize(("body", "param"), [
    ({"query": "x", "k": 0}, "k"),
    ({"query": "x", "kk": 3}, "kk"),
    ({"query": "x", "vector": [0.1]}, None),
    ({}, None),
    ({"query": "x", "k": "many"}, "k"),
])
def test_a_bad_search_is_400_naming_the_field(http, kb, body, param) -> None:
    err = _error(http.post(f"/v1/indexes/{kb}/search", json=body), 400, "InvalidRequest")
    assert err["param"] == param
    assert err["message"].startswith(f"{param}: " if param else "body: ")


def test_errors_of_the_request_itself(http, kb) -> None:
    _error(http.post(f"/v1/indexes/{kb}/search", json={"query": "   "}), 400, "InputError")
    _error(http.post("/v1/indexes/nope/search", json={"query": "x"}), 404, "IndexNotFound")
    bad_json = http.post(f"/v1/indexes/{kb}/search", content=b"{not json",
                         headers={"content-type": "application/json"})
    assert "not valid JSON" in _error(bad_json, 400, "InvalidRequest")["message"]
    _error(http.get("/v1/nothing-here"), 404, "NotFound")
    _error(http.put(f"/v1/indexes/{kb}/search", json={}), 405, "MethodNotAllowed")


def test_limits_answer_413(http, kb) -> None:
    err = _error(http.post(f"/v1/indexes/{kb}/search", json={"query": "x", "k": MAX_K + 1}),
                 413, "RequestTooLarge")
    assert "max_k" in err["message"]
    many = [{"id": f"d{i}", "text": f"text {i}"} for i in range(MAX_BATCH + 1)]
    err = _error(http.post("/v1/indexes/limits/documents", json={"documents": many}), 413, "RequestTooLarge")
    assert "max_batch" in err["message"]
    huge = {"documents": [{"id": "big", "text": "word " * (MAX_BODY // 4)}]}
    err = _error(http.post("/v1/indexes/limits/documents", json=huge), 413, "RequestTooLarge")
    assert "max_body_bytes" in err["message"]

    def chunked():  # no Content-Length: counted as it arrives
        yield b'{"documents": [{"id": "big", "text": "'
        for _ in range(MAX_BODY // 1024 + 1):
            yield b"x" * 1024
        yield b'"}]}'

    answer = http.post("/v1/indexes/limits/documents", content=chunked(),
                       headers={"content-type": "application/json"})
    _error(answer, 413, "RequestTooLarge")
    _error(http.get("/v1/indexes/limits"), 404, "IndexNotFound")  # nothing was written


def _count(http: httpx.Client, index: str) -> int:
    return http.get(f"/v1/indexes/{index}").json()["documents"]


def test_documents_write_like_ingest(http) -> None:
    docs = [{"id": "a", "text": "Tides follow the moon.", "metadata": {"n": 1}},
            {"id": 7, "text": "Seven is a prime number."}]
    first = http.post("/v1/indexes/crud/documents", json={"documents": docs, "profile": "static"}).json()
    assert (first["added"], first["embedded"], first["created_version"]) == (2, 2, True)
    again = http.post("/v1/indexes/crud/documents", json={"documents": docs}).json()
    assert (again["unchanged"], again["embedded"]) == (2, 0)  # unchanged: not re-embedded
    docs[0] = {"id": "a", "text": "Tides follow the moon and the sun.", "metadata": {"n": 1}}
    changed = http.post("/v1/indexes/crud/documents", json={"documents": docs}).json()
    assert (changed["updated"], changed["unchanged"], changed["embedded"]) == (1, 1, 1)
    hits = http.post("/v1/indexes/crud/search", json={"query": "sun and moon", "k": 1}).json()["hits"]
    assert hits[0]["id"] == "a" and hits[0]["text"] == docs[0]["text"]
    dry = http.post("/v1/indexes/crud/documents", json={"documents": [{"id": "z", "text": "new"}],
                                                        "dry_run": True}).json()
    assert dry["dry_run"] and dry["added"] == 1 and _count(http, "crud") == 2
    err = _error(http.post("/v1/indexes/crud/documents", json={"documents": docs, "profile": "hosted"}),
                 400, "ConfigError")
    assert "embedpipe migrate --to hosted" in err["message"]


@pytest.mark.parametrize(("documents", "where", "says"), [
    ([{"id": "ok", "text": "fine"}, {"id": "x", "text": "   "}], "documents[1]", "empty text"),
    ([{"id": "x", "text": "one"}, {"id": "x", "text": "two"}], "documents[1]", "duplicate id 'x'"),
    ([{"id": "x", "text": "t", "metadata": {"v": float("inf")}}], "documents[0]", "not a finite number"),
    ([{"id": " ", "text": "t"}], "documents[0]", "'id' is empty"),
])
def test_a_bad_document_refuses_the_whole_batch(http, kb, documents, where, says) -> None:
    def post(index: str, body: dict) -> httpx.Response:  # json.dumps writes Infinity, as some clients do
        return http.post(f"/v1/indexes/{index}/documents", content=json.dumps(body),
                         headers={"content-type": "application/json"})

    err = _error(post("valid", {"documents": documents, "profile": "static"}), 400, "InputError")
    assert err["message"].startswith(f"{where}: ") and says in err["message"]
    _error(http.get("/v1/indexes/valid"), 404, "IndexNotFound")  # nothing was written
    fresh = {"id": "fresh", "text": "A valid document in a batch with a bad one."}
    _error(post(kb, {"documents": [fresh, *documents]}), 400, "InputError")
    assert _count(http, kb) == len(DOCS)  # the valid one was not written either


@pytest.mark.parametrize(("document", "param"), [
    ({"text": "no id"}, "documents[0].id"),
    ({"id": True, "text": "a boolean id"}, "documents[0].id"),
    ({"id": "x", "text": 5}, "documents[0].text"),
    ({"id": "x", "text": "t", "extra": 1}, "documents[0].extra"),
])
def test_a_malformed_document_is_400_naming_it(http, document, param) -> None:
    err = _error(http.post("/v1/indexes/valid/documents", json={"documents": [document]}), 400, "InvalidRequest")
    assert err["param"] == param


def test_delete_a_document(http) -> None:
    docs = [{"id": "keep", "text": "Rivers run to the sea."},
            {"id": "dir/gone.md", "text": "Deserts receive little rain."}]
    assert http.post("/v1/indexes/del/documents", json={"documents": docs, "profile": "static"}).status_code == 200
    answer = http.delete("/v1/indexes/del/documents/dir/gone.md")
    assert answer.status_code == 200 and answer.json() == {"index": "del", "id": "dir/gone.md", "deleted": True}
    hits = http.post("/v1/indexes/del/search", json={"query": "rain in the desert", "k": 5}).json()["hits"]
    assert [h["id"] for h in hits] == ["keep"]
    assert _count(http, "del") == 1
    _error(http.delete("/v1/indexes/del/documents/dir/gone.md"), 404, "DocumentNotFound")
    _error(http.delete("/v1/indexes/nope/documents/x"), 404, "IndexNotFound")


def test_a_search_answers_while_a_documents_batch_is_written(http, kb, loopback, served) -> None:
    """The write is held inside its embedding request (the hosted upstream hangs until the
    test lets it go), so everything below happens while it holds the write turn."""
    from embedpipe.backends import build_embedder
    from embedpipe.config import load_settings

    seed = [{"id": "h1", "text": "Hosted vectors of a held upstream."}]
    assert http.post("/v1/indexes/hkb/documents", json={"documents": seed, "profile": "hosted"}).status_code == 200
    before = loopback.counters()["embedding_requests"]
    loopback.configure(hold=True)
    results: dict[str, httpx.Response] = {}
    batch = [{"id": f"n{i}", "text": f"New document number {i} about ocean tides."} for i in range(20)]
    writer = threading.Thread(target=lambda: results.setdefault(
        "write", http.post("/v1/indexes/hkb/documents", json={"documents": batch})))
    writer.start()
    try:
        while loopback.counters()["embedding_requests"] == before:
            assert writer.is_alive(), results["write"].text
            threading.Event().wait(0.01)
        assert http.get("/healthz").json()["writing"] is True
        found = http.post(f"/v1/indexes/{kb}/search", json={"query": "glaciers", "k": 1})
        assert found.status_code == 200 and found.json()["hits"][0]["id"] == "fjord"
        settings = load_settings(served.config)
        vector = build_embedder(settings.profile("static"), settings).embed_query("held upstream")
        by_vector = http.post("/v1/indexes/hkb/search", json={"vector": vector.tolist(), "k": 1})
        assert by_vector.status_code == 200 and by_vector.json()["hits"][0]["id"] == "h1"
        _error(http.post(f"/v1/indexes/{kb}/documents", json={"documents": DOCS}), 409, "IndexBusy")
        _error(http.delete(f"/v1/indexes/{kb}/documents/fjord"), 409, "IndexBusy")
        assert writer.is_alive() and "write" not in results  # all of it while the write ran
    finally:
        loopback.configure(hold=False)
        writer.join(timeout=120)
    assert results["write"].status_code == 200, results["write"].text
    assert results["write"].json()["added"] == 20
    assert _count(http, "hkb") == 21 and _count(http, kb) == len(DOCS)


def test_many_clients_search_at_once(served, kb) -> None:
    """Eight clients, each its own connection, searching and embedding at the same time:
    every answer is a 200 and the same as when asked alone."""
    queries = {"how are fjords formed?": "fjord", "molten rock": "volcano",
               "machine instructions": "compiler", "processor cache": "notes/cache.md"}
    failures: list[str] = []

    def client_thread(offset: int) -> None:
        with served.client() as own:
            for n in range(12):
                query = list(queries)[(offset + n) % len(queries)]
                answer = own.post(f"/v1/indexes/{kb}/search", json={"query": query, "k": 1})
                if answer.status_code != 200 or answer.json()["hits"][0]["id"] != queries[query]:
                    failures.append(answer.text)
                vectors = own.post("/v1/embeddings", json={"model": "static", "input": [query] * (n + 1)})
                if vectors.status_code != 200 or len(vectors.json()["data"]) != n + 1:
                    failures.append(vectors.text)

    threads = [threading.Thread(target=client_thread, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not failures, failures[:3]


def test_docs_and_openapi(http) -> None:
    page = http.get("/docs")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert "swagger-ui" in page.text and "/openapi.json" in page.text
    spec = http.get("/openapi.json").json()
    routes = {(path, method) for path, ops in spec["paths"].items() for method in ops}
    assert {
        ("/healthz", "get"), ("/v1/indexes", "get"), ("/v1/indexes/{name}", "get"),
        ("/v1/indexes/{name}/search", "post"), ("/v1/indexes/{name}/documents", "post"),
        ("/v1/indexes/{name}/documents/{doc_id}", "delete"), ("/v1/embeddings", "post"),
        ("/v1/chat/completions", "post"), ("/v1/models", "get"),
    } <= routes
    assert "SearchRequest" in spec["components"]["schemas"]
