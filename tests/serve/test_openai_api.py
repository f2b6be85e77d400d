"""The OpenAI protocol of ``embedpipe serve``, driven by the official ``openai`` SDK:
embeddings of a profile and of an index's own model (float and base64), chat through
the gateway (streamed and not, with its fallback, policy and audit), the model list."""

from __future__ import annotations

import base64
import json

import numpy as np
import openai
import pytest

from conftest import LOOPBACK_KEY

from .conftest import MAX_BATCH, DOCS

TEXTS = ["Glaciers carve U-shaped valleys and fjords.", "How are fjords formed?"]
HELLO = [{"role": "user", "content": "Say hello"}]


@pytest.fixture(scope="module")
def client(served) -> openai.OpenAI:
    # The SDK insists on a key; the server takes none (loopback only) and must not need one.
    return openai.OpenAI(base_url=f"{served.url}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def static(served):
    from embedpipe.backends import build_embedder
    from embedpipe.config import load_settings

    settings = load_settings(served.config)
    return build_embedder(settings.profile("static"), settings)


@pytest.mark.parametrize("encoding", ["float", "base64", None])
def test_index_embeddings_are_the_index_models_vectors(client, kb, static, encoding) -> None:
    """None: the SDK's default, which asks for base64 and decodes it itself; asked for
    base64 explicitly, it hands over the string (little-endian float32 bytes)."""
    extra = {"encoding_format": encoding} if encoding else {}
    raw = client.embeddings.with_raw_response.create(model=f"index:{kb}", input=TEXTS, **extra)
    reply = raw.parse()
    expected = static.embed_documents(TEXTS).vectors
    rows = [d.embedding for d in sorted(reply.data, key=lambda d: d.index)]
    if encoding == "base64":
        rows = [np.frombuffer(base64.b64decode(r), dtype="<f4") for r in rows]
    got = np.array(rows, dtype=np.float32)
    assert got.shape == (2, 256)
    np.testing.assert_array_equal(got, expected)  # float32 round-trips exactly, either way
    assert raw.headers["x-embedpipe-fingerprint"] == reply.fingerprint == static.fingerprint
    assert reply.model == f"index:{kb}" and reply.profile == "static"
    assert reply.usage.prompt_tokens == reply.usage.total_tokens >= 0


def test_a_profile_name_and_the_index_share_a_space(client, kb, static) -> None:
    by_profile = client.embeddings.create(model="static", input=TEXTS[1], encoding_format="float")
    by_index = client.embeddings.create(model=f"index:{kb}", input=TEXTS[1], encoding_format="float")
    assert by_profile.fingerprint == by_index.fingerprint
    assert by_profile.data[0].embedding == by_index.data[0].embedding
    query = client.embeddings.create(model="static", input=TEXTS[1], encoding_format="float",
                                     extra_body={"input_type": "query"})
    np.testing.assert_array_equal(np.array(query.data[0].embedding, dtype=np.float32),
                                  static.embed_query(TEXTS[1]))


def test_embedding_errors(client, kb) -> None:
    with pytest.raises(openai.NotFoundError, match="unknown profile 'nope'; known profiles: .*static"):
        client.embeddings.create(model="nope", input="x")
    with pytest.raises(openai.NotFoundError, match="index 'missing'"):
        client.embeddings.create(model="index:missing", input="x")
    with pytest.raises(openai.BadRequestError, match=r"input\[1\]: empty text"):
        client.embeddings.create(model="static", input=["fine", "  "])
    with pytest.raises(openai.BadRequestError, match="token arrays are not accepted"):
        client.embeddings.create(model="static", input=[[1, 2, 3]])
    with pytest.raises(openai.BadRequestError, match="dimensions: static makes 256-dimensional"):
        client.embeddings.create(model="static", input="x", dimensions=128)
    with pytest.raises(openai.APIStatusError, match="max_batch") as caught:
        client.embeddings.create(model="static", input=["x"] * (MAX_BATCH + 1))
    assert caught.value.status_code == 413


def _audit(served) -> list[dict]:
    path = served.data_dir / "gateway" / "audit.jsonl"
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_chat_goes_through_the_gateway(client, served, loopback) -> None:
    before = loopback.counters()["chat_ok"]
    raw = client.chat.completions.with_raw_response.create(model="anything", messages=HELLO, max_tokens=50)
    reply = raw.parse()
    assert reply.choices[0].message.content == "loopback reply to: Say hello"
    assert reply.choices[0].finish_reason == "stop" and reply.model == "loopback-chat"
    assert raw.headers["x-embedpipe-backend"] == "loop"
    assert reply.usage.completion_tokens > 0
    extension = reply.model_extra["embedpipe"]
    assert extension["backend"] == "loop"
    assert [f["backend"] for f in extension["fallbacks"]] == ["dead"]  # fell back past it
    assert loopback.counters()["chat_ok"] == before + 1
    last = _audit(served)[-1]
    assert last["id"] == extension["request_id"]
    assert last["outcome"] == "ok" and last["served_by"] == "loop"
    assert "Say hello" not in json.dumps(last)  # the audit holds no content


def test_chat_streams_server_sent_events(client, served, loopback) -> None:
    stream = client.chat.completions.create(model="anything", messages=HELLO, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "loopback reply to: Say hello"
    assert chunks[0].choices[0].delta.role == "assistant"
    finish = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish[-1].choices[0].finish_reason == "stop"
    assert finish[-1].model_extra["embedpipe"]["backend"] == "loop"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0
    assert _audit(served)[-1]["kind"] == "stream" and _audit(served)[-1]["outcome"] == "ok"


def test_sse_framing(served) -> None:
    import httpx

    with httpx.stream("POST", f"{served.url}/v1/chat/completions", timeout=120,
                      json={"model": "m", "messages": HELLO, "stream": True}) as answer:
        assert answer.headers["content-type"].startswith("text/event-stream")
        body = answer.read().decode()
    events = body.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    assert all(e.startswith("data: ") for e in events[:-1])


@pytest.mark.parametrize("stream", [False, True])
def test_no_backend_can_answer_is_503(client, served, loopback, stream) -> None:
    """Sensitive: the hosted backend is left out by policy, the self-hosted one is down."""
    before = loopback.counters()["chat_requests"]
    with pytest.raises(openai.APIStatusError, match="no chat backend answered") as caught:
        reply = client.chat.completions.create(model="m", messages=HELLO, stream=stream,
                                               extra_body={"sensitive": True})
        list(reply) if stream else None
    assert caught.value.status_code == 503
    assert caught.value.body["type"] == "NoBackendAvailable"
    assert loopback.counters()["chat_requests"] == before  # nothing went to the hosted one
    assert _audit(served)[-1]["outcome"] == "failed"


def test_chat_request_errors(client) -> None:
    with pytest.raises(openai.BadRequestError, match="tools"):
        client.chat.completions.create(model="m", messages=HELLO,
                                       tools=[{"type": "function", "function": {"name": "f"}}])
    with pytest.raises(openai.BadRequestError, match="messages"):
        client.chat.completions.create(model="m", messages=[])
    with pytest.raises(openai.BadRequestError, match="n: "):
        client.chat.completions.create(model="m", messages=HELLO, n=2)


def test_models_lists_profiles_indexes_and_chat_backends(client, kb, static) -> None:
    cards = {m.id: m.model_extra["embedpipe"] for m in client.models.list()}
    assert cards["static"]["kind"] == "embedding" and cards["static"]["dims"] == 256
    assert cards["local-minilm"]["kind"] == "embedding"
    assert cards[f"index:{kb}"] == {"kind": "embedding", "profile": "static", "dims": 256,
                                     "fingerprint": static.fingerprint}
    assert cards["dead"] == {"kind": "chat", "model": "llama-local", "hosted": False}
    assert cards["loop"] == {"kind": "chat", "model": "loopback-chat", "hosted": True}


def test_the_server_log_holds_no_key_and_no_document_text(client, served, http) -> None:
    secret = "Zanzibar-sentinel text that must never reach a log line"
    http.post("/v1/indexes/logged/documents", json={"documents": [{"id": "s", "text": secret}],
                                                   "profile": "static"})
    http.post("/v1/indexes/logged/documents", json={"documents": [{"id": "s2", "text": secret, "x": 1}]})
    client.embeddings.create(model="static", input=secret)
    client.chat.completions.create(model="m", messages=[{"role": "user", "content": secret}])
    http.post("/v1/indexes/logged/search", json={"query": secret, "vector": [1.0]})
    log = served.log_text()
    assert "POST /v1/indexes/logged/documents" in log  # the access log is there...
    assert "Zanzibar" not in log and LOOPBACK_KEY not in log  # ...without bodies or keys
    assert all(d["text"][:20] not in log for d in DOCS)
