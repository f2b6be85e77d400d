"""API keys against a real ``embedpipe serve`` with keys: 401 without or with a wrong key,
403 for a scope or index the key lacks, what each scope allows, the openai SDK with
``api_key``, 429 with ``Retry-After`` past a per-key limit, keys added and revoked while
it runs, a non-loopback address served once there are keys, and no key in any file or
in the server's log.

The server has keys from both sources: the key file (``embedpipe keys add``'s hashes)
and ``$EMBEDPIPE_SERVER_KEYS`` (the keys themselves, never in a file)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from conftest import write_config
from embedpipe.serve.keys import add_key, remove_key

from .conftest import DOCS, MAX_BODY, Served, package_config, refused, serve_command, start_server

FAQ = [{"id": "refund", "text": "Refunds are paid within fourteen days.", "metadata": {}},
       {"id": "hours", "text": "The office opens at nine in the morning.", "metadata": {}}]
LIMIT = 3  # requests per minute of the key "limited": a 4th at once is over it, whatever the clock


class Keyed:
    """The keyed server, its keys by name and the folder it all lives in."""

    def __init__(self, server: Served, keys: dict[str, str], folder: Path) -> None:
        self.server, self.keys, self.folder = server, keys, folder

    def client(self, name: str | None = None, key: str | None = None) -> httpx.Client:
        key = self.keys[name] if name else key
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.server.url, headers=headers, timeout=120)


@pytest.fixture(scope="module")
def keyed(tmp_path_factory: pytest.TempPathFactory, static_model_dir: Path, loopback) -> Iterator[Keyed]:
    folder = tmp_path_factory.mktemp("keyed")
    config = package_config(folder, static_model_dir, loopback.base_url,  # type: ignore[attr-defined]
                            server=f"rate_limits = {{ limited = {LIMIT} }}\n")
    key_file = folder / "data" / "keys.toml"
    keys = {name: add_key(key_file, name, indexes, scopes)[0] for name, indexes, scopes in [
        ("admin", ["*"], ["read", "write", "chat"]),
        ("reader", ["*"], ["read"]),
        ("docs-writer", ["docs"], ["write"]),
        ("limited", ["*"], ["read"]),
    ]}
    keys["docs-reader"] = "ep_env-docs-reader-0123456789abcdef"
    keys["chatter"] = "ep_env-chatter-0123456789abcdef"
    variable = f"docs-reader:read:docs:{keys['docs-reader']};chatter:chat:*:{keys['chatter']}"
    server = start_server(config, folder / "data", env={"EMBEDPIPE_SERVER_KEYS": variable})
    setup = Keyed(server, keys, folder)
    with setup.client("admin") as admin:
        for index, docs in (("docs", DOCS), ("faq", FAQ)):
            answer = admin.post(f"/v1/indexes/{index}/documents", json={"documents": docs, "profile": "static"})
            assert answer.status_code == 200, answer.text
    yield setup
    loopback.configure(hold=False)  # type: ignore[attr-defined]
    assert server.stop() == 0, server.log_text()


def _error(answer: httpx.Response, status: int, type_: str) -> str:
    assert answer.status_code == status, answer.text
    body = answer.json()
    assert set(body) == {"error"} and body["error"]["type"] == type_, body
    assert "\n" not in body["error"]["message"]
    return body["error"]["message"]


def _documents(keyed: Keyed, index: str) -> int:
    with keyed.client("admin") as admin:
        return admin.get(f"/v1/indexes/{index}").json()["documents"]  # type: ignore[no-any-return]


SEARCH = {"query": "how are fjords formed?", "k": 2}
CHAT = {"model": "any", "messages": [{"role": "user", "content": "Say hello"}]}
ROUTES = [
    ("GET", "/v1/indexes", None), ("GET", "/v1/indexes/docs", None),
    ("POST", "/v1/indexes/docs/search", SEARCH),
    ("POST", "/v1/indexes/docs/documents", {"documents": [{"id": "x", "text": "y"}]}),
    ("DELETE", "/v1/indexes/docs/documents/fjord", None),
    ("POST", "/v1/embeddings", {"model": "index:docs", "input": "hi"}),
    ("POST", "/v1/chat/completions", CHAT), ("GET", "/v1/models", None), ("GET", "/no/such/path", None),
]


@pytest.mark.parametrize("method, path, body", ROUTES, ids=[f"{m} {p}" for m, p, _ in ROUTES])
@pytest.mark.parametrize("header", [None, "Bearer ep_wrong-key-0123456789abcdef", "Basic YWRtaW46YWRtaW4=",
                                    "Bearer"], ids=["no key", "wrong key", "basic", "bearer without a key"])
def test_without_a_known_key_every_route_is_401(keyed, method, path, body, header) -> None:
    headers = {"Authorization": header} if header is not None else {}
    answer = httpx.request(method, f"{keyed.server.url}{path}", json=body, headers=headers, timeout=120)
    message = _error(answer, 401, "AuthenticationRequired")
    assert answer.headers["www-authenticate"] == 'Bearer realm="embedpipe"'
    assert "Bearer <key>" in message or "unknown API key" in message
    assert _documents(keyed, "docs") == len(DOCS)  # nothing was done


def test_a_large_body_without_a_key_gets_its_401_not_a_reset(keyed) -> None:
    documents = [{"id": f"d{i}", "text": "word " * 400} for i in range(MAX_BODY // 2100)]
    answer = httpx.post(f"{keyed.server.url}/v1/indexes/docs/documents", json={"documents": documents}, timeout=120)
    _error(answer, 401, "AuthenticationRequired")


def test_healthz_and_the_docs_need_no_key(keyed) -> None:
    assert httpx.get(f"{keyed.server.url}/healthz", timeout=60).json() == {"status": "ok"}
    wrong = httpx.get(f"{keyed.server.url}/healthz", headers={"Authorization": "Bearer nope"}, timeout=60)
    assert wrong.json() == {"status": "ok"}
    with keyed.client("chatter") as client:  # any valid key sees the details
        assert client.get("/healthz").json()["pid"] == keyed.server.proc.pid
    assert httpx.get(f"{keyed.server.url}/docs", timeout=60).status_code == 200
    schema = httpx.get(f"{keyed.server.url}/openapi.json", timeout=60).json()
    assert schema["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    assert {"HTTPBearer": []} in schema["paths"]["/v1/indexes/{name}/search"]["post"]["security"]


def test_a_read_key_searches_and_embeds_but_may_not_write_or_chat(keyed) -> None:
    with keyed.client("reader") as reader:
        hits = reader.post("/v1/indexes/docs/search", json=SEARCH)
        assert hits.status_code == 200 and hits.json()["hits"][0]["id"] == "fjord"
        assert {e["index"] for e in reader.get("/v1/indexes").json()} == {"docs", "faq"}
        assert reader.post("/v1/embeddings", json={"model": "static", "input": "hi"}).status_code == 200
        message = _error(reader.post("/v1/indexes/docs/documents", json={"documents": [
            {"id": "new", "text": "Written by a reader."}]}), 403, "AccessDenied")
        assert message.startswith("API key 'reader' lacks the write scope (documents); it has read")
        _error(reader.post("/v1/indexes/docs/documents", json={"documents": [{"id": "new", "text": "x"}],
                                                                "dry_run": True}), 403, "AccessDenied")
        message = _error(reader.delete("/v1/indexes/docs/documents/fjord"), 403, "AccessDenied")
        assert "lacks the write scope" in message
        message = _error(reader.post("/v1/chat/completions", json=CHAT), 403, "AccessDenied")
        assert message.startswith("API key 'reader' lacks the chat scope")
    assert _documents(keyed, "docs") == len(DOCS)
    assert keyed.keys["reader"] not in message


def test_an_index_scoped_key_is_kept_to_its_index(keyed) -> None:
    with keyed.client("docs-reader") as client:
        assert client.post("/v1/indexes/docs/search", json=SEARCH).status_code == 200
        message = _error(client.post("/v1/indexes/faq/search", json=SEARCH), 403, "AccessDenied")
        assert message.startswith("API key 'docs-reader' may not use index 'faq' (search); it may use docs")
        # an index that does not exist is refused the same way: the key cannot probe for others
        assert "may not use index 'nope'" in _error(client.get("/v1/indexes/nope"), 403, "AccessDenied")
        _error(client.get("/v1/indexes/faq"), 403, "AccessDenied")
        assert [e["index"] for e in client.get("/v1/indexes").json()] == ["docs"]
        assert client.post("/v1/embeddings", json={"model": "index:docs", "input": "hi"}).status_code == 200
        _error(client.post("/v1/embeddings", json={"model": "index:faq", "input": "hi"}), 403, "AccessDenied")
        message = _error(client.post("/v1/embeddings", json={"model": "static", "input": "hi"}), 403, "AccessDenied")
        assert "needs a key for every index" in message and "'index:docs'" in message
        ids = {m["id"] for m in client.get("/v1/models").json()["data"]}
        assert "index:docs" in ids and "index:faq" not in ids


def test_a_write_key_writes_and_deletes_its_index_only(keyed) -> None:
    with keyed.client("docs-writer") as writer:
        answer = writer.post("/v1/indexes/docs/documents", json={"documents": [
            {"id": "glacier", "text": "Glaciers are rivers of ice.", "metadata": {}}]})
        assert answer.status_code == 200 and answer.json()["added"] == 1, answer.text
        assert _documents(keyed, "docs") == len(DOCS) + 1
        assert writer.delete("/v1/indexes/docs/documents/glacier").json()["deleted"] is True
        assert _documents(keyed, "docs") == len(DOCS)
        _error(writer.post("/v1/indexes/faq/documents", json={"documents": [{"id": "x", "text": "y"}]}),
               403, "AccessDenied")
        _error(writer.delete("/v1/indexes/faq/documents/refund"), 403, "AccessDenied")
        assert "lacks the read scope" in _error(writer.post("/v1/indexes/docs/search", json=SEARCH), 403,
                                                "AccessDenied")
    assert _documents(keyed, "faq") == len(FAQ)


def test_a_chat_key_chats_and_lists_models_only(keyed) -> None:
    with keyed.client("chatter") as client:
        answer = client.post("/v1/chat/completions", json=CHAT)
        assert answer.status_code == 200, answer.text
        assert answer.json()["choices"][0]["message"]["content"]
        models = client.get("/v1/models").json()["data"]
        assert any(m["embedpipe"]["kind"] == "chat" for m in models)
        assert not any(m["id"].startswith("index:") for m in models)  # it may read no index
        message = _error(client.post("/v1/indexes/docs/search", json=SEARCH), 403, "AccessDenied")
        assert message.startswith("API key 'chatter' lacks the read scope (search); it has chat")
        _error(client.post("/v1/embeddings", json={"model": "index:docs", "input": "hi"}), 403, "AccessDenied")


def test_the_openai_sdk_sends_its_api_key(keyed) -> None:
    def sdk(key: str) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{keyed.server.url}/v1", api_key=key, max_retries=0, timeout=120)

    reply = sdk(keyed.keys["docs-reader"]).embeddings.create(model="index:docs", input=["fjords", "lava"],
                                                             encoding_format="float")
    assert len(reply.data) == 2 and len(reply.data[0].embedding) == 256
    with pytest.raises(openai.AuthenticationError, match="unknown API key"):
        sdk("ep_wrong-key-0123456789abcdef").embeddings.create(model="index:docs", input="fjords")
    with pytest.raises(openai.PermissionDeniedError, match="may not use index 'faq'"):
        sdk(keyed.keys["docs-reader"]).embeddings.create(model="index:faq", input="fjords")
    chat = sdk(keyed.keys["chatter"]).chat.completions.create(model="any", messages=CHAT["messages"])
    assert chat.choices[0].message.content


def test_a_key_over_its_rate_limit_gets_429_with_retry_after(keyed) -> None:
    with keyed.client("limited") as limited, keyed.client("reader") as other:
        for _ in range(LIMIT):  # a whole minute's budget at once
            assert limited.get("/v1/models").status_code == 200
        over = limited.get("/v1/models")
        message = _error(over, 429, "RateLimited")
        assert 1 <= int(over.headers["retry-after"]) <= 60 / LIMIT
        assert message.startswith(f"API key 'limited' is over its {LIMIT} requests per minute")
        _error(limited.post("/v1/indexes/docs/search", json=SEARCH), 429, "RateLimited")
        assert other.get("/v1/models").status_code == 200  # the limit is the key's, not the server's
        assert httpx.get(f"{keyed.server.url}/healthz", timeout=60).status_code == 200


def test_keys_added_and_revoked_while_it_runs(keyed) -> None:
    key_file = keyed.folder / "data" / "keys.toml"
    key, _ = add_key(key_file, "late", ["faq"], ["read"])
    with keyed.client(key=key) as late:
        assert late.post("/v1/indexes/faq/search", json=SEARCH).status_code == 200
        remove_key(key_file, "late")
        _error(late.post("/v1/indexes/faq/search", json=SEARCH), 401, "AuthenticationRequired")


def test_a_broken_key_file_refuses_its_keys_until_fixed(keyed) -> None:
    key_file = keyed.folder / "data" / "keys.toml"
    good = key_file.read_text()
    try:
        key_file.write_text(good + "[[keys]]\nname = 'half-written'\n")
        with keyed.client("reader") as reader, keyed.client("docs-reader") as from_env:
            message = _error(reader.get("/v1/indexes"), 503, "KeyFileInvalid")
            assert str(key_file) not in message  # the path and the problem are in the log only
            assert from_env.get("/v1/indexes").status_code == 200  # the variable's keys are not the file's
            key_file.write_text(good)
            assert reader.get("/v1/indexes").status_code == 200
    finally:
        key_file.write_text(good)
    assert "half-written" in keyed.server.log_text()


def test_no_key_is_in_any_file_or_the_log(keyed) -> None:
    """Runs last in this module: after every key has been used, refused and rate-limited."""
    log = keyed.server.log_text()
    assert "refused (sha256 " in log and "refused an unknown API key (sha256 " in log
    written = {p: p.read_bytes() for p in keyed.folder.rglob("*") if p.is_file()}
    assert keyed.folder / "data" / "keys.toml" in written and any(p.suffix == ".log" for p in written)
    for name, key in keyed.keys.items():
        assert all(key.encode() not in data for data in written.values()), name
        digest = hashlib.sha256(key.encode()).hexdigest()
        in_file = digest.encode() in written[keyed.folder / "data" / "keys.toml"]
        assert key not in log and in_file == (not key.startswith("ep_env-")), name  # env keys: no file


def test_a_non_loopback_address_is_served_once_there_are_keys(tmp_path) -> None:
    config = write_config(tmp_path)
    code, err = refused(serve_command(config, "--host", "0.0.0.0"), tmp_path)
    assert code == 2 and "needs API keys" in err
    key, _ = add_key(tmp_path / "data" / "keys.toml", "remote", ["*"], ["read"])
    server = start_server(config, tmp_path / "data", "--host", "0.0.0.0")
    try:
        assert json.loads((tmp_path / "data" / "server.json").read_text())["url"].startswith("http://127.0.0.1:")
        _error(httpx.get(f"{server.url}/v1/indexes", timeout=60), 401, "AuthenticationRequired")
        authed = httpx.get(f"{server.url}/v1/indexes", headers={"Authorization": f"Bearer {key}"}, timeout=60)
        assert authed.status_code == 200 and authed.json() == []
        assert "plain HTTP, so API keys cross the network in clear" in server.log_text()
    finally:
        assert server.stop() == 0


def test_a_key_problem_stops_the_server_in_one_line(tmp_path) -> None:
    config = write_config(tmp_path)
    code, err = refused(serve_command(config), tmp_path,
                        env={"EMBEDPIPE_SERVER_KEYS": "app:read:docs:ep_secret-0123456789abcdef;broken"})
    assert code == 2 and "$EMBEDPIPE_SERVER_KEYS entry 2 is not NAME:SCOPES:INDEXES:KEY" in err
    assert "ep_secret" not in err
    config = write_config(tmp_path, '[server]\nkey_file = "missing.toml"\n')
    code, err = refused(serve_command(config), tmp_path)
    assert code == 2 and f"key file {tmp_path / 'missing.toml'} does not exist" in err
    assert not (tmp_path / "data" / "server.json").exists()


# -- clients of a keyed server: the CLI and Index.open ------------------------------------------


def test_the_cli_and_index_open_send_the_key_from_the_environment(keyed: Keyed, tmp_path: Path) -> None:
    from embedpipe.errors import AccessDenied, AuthenticationRequired
    from embedpipe.index import Index

    from .conftest import cli

    served = keyed.server
    anonymous = cli(served, "search", "refunds", "--index", "faq", check=False)
    assert anonymous.returncode == 77 and anonymous.stderr.startswith("error: ")
    assert anonymous.stderr.count("\n") == 1 and "key" in anonymous.stderr
    as_reader = {"EMBEDPIPE_API_KEY": keyed.keys["reader"]}
    hits = json.loads(cli(served, "search", "refunds", "--index", "faq", "--json", env=as_reader).stdout)
    assert hits[0]["id"] == "refund"
    assert {e["index"] for e in json.loads(cli(served, "status", "--json", env=as_reader).stdout)} >= {"docs", "faq"}

    # a read key starts no job; a key for docs writes docs only; nothing is run for a refusal
    path = tmp_path / "more.jsonl"
    path.write_text(json.dumps({"id": "late", "text": "Late refunds need a manager."}) + "\n", encoding="utf-8")
    refused_read = cli(served, "ingest", str(path), "--index", "faq", env=as_reader, check=False)
    assert refused_read.returncode == 77 and "lacks the write scope" in refused_read.stderr
    as_docs_writer = {"EMBEDPIPE_API_KEY": keyed.keys["docs-writer"]}
    refused_index = cli(served, "ingest", str(path), "--index", "faq", env=as_docs_writer, check=False)
    assert refused_index.returncode == 77 and "may not use index 'faq'" in refused_index.stderr
    with keyed.client("admin") as admin:
        assert admin.get("/v1/jobs", params={"index": "faq"}).json() == []
        cli(served, "ingest", str(path), "--index", "docs", env=as_docs_writer)
        assert [j["kind"] for j in admin.get("/v1/jobs", params={"index": "docs"}).json()] == ["ingest"]
    with keyed.client("docs-reader") as docs_reader:  # a key sees the jobs of its indexes only
        assert {j["index"] for j in docs_reader.get("/v1/jobs").json()} == {"docs"}

    with pytest.raises(AuthenticationRequired):
        Index.open("faq", url=served.url)
    index = Index.open("docs", url=served.url, api_key=keyed.keys["docs-reader"])
    assert index.search("late refunds", k=1)[0].id == "late"
    with pytest.raises(AccessDenied):
        Index.open("faq", url=served.url, api_key=keyed.keys["docs-reader"])
