"""The loopback server's Files and Batch APIs, driven by the real openai SDK."""

from __future__ import annotations

import dataclasses
import io
import json
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import openai
import pytest

from embedpipe.testing.openai_server import LoopbackOpenAI, ServerConfig

KEY = "sk-test"
EMBED = "text-embedding-3-small"


@pytest.fixture(scope="module")
def server(static_model_dir: Path) -> Iterator[LoopbackOpenAI]:
    with LoopbackOpenAI(ServerConfig(model_path=static_model_dir, api_key=KEY)) as srv:
        srv.load_model()
        yield srv


@pytest.fixture(autouse=True)
def _fresh(server: LoopbackOpenAI) -> Iterator[None]:
    defaults = dataclasses.asdict(server.config)
    server.reset_counters()
    yield
    server.configure(**defaults)


@pytest.fixture
def client(server: LoopbackOpenAI) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key=KEY, max_retries=0, timeout=10)


def line(custom_id: str, texts: list[str], **overrides) -> dict:
    body = {"model": EMBED, "input": texts, "encoding_format": "float"}
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/embeddings", "body": body} | overrides


def jsonl(lines: list[dict]) -> bytes:
    return "".join(json.dumps(x) + "\n" for x in lines).encode()


def submit(client: openai.OpenAI, lines: list[dict] | bytes):
    raw = lines if isinstance(lines, bytes) else jsonl(lines)
    f = client.files.create(file=("in.jsonl", io.BytesIO(raw)), purpose="batch")
    return client.batches.create(input_file_id=f.id, endpoint="/v1/embeddings", completion_window="24h")


def wait(client: openai.OpenAI, batch_id: str, seen: list[str] | None = None):
    for _ in range(2000):
        b = client.batches.retrieve(batch_id)
        if seen is not None and (not seen or seen[-1] != b.status):
            seen.append(b.status)
        if b.status in ("completed", "failed", "expired", "cancelled"):
            return b
        time.sleep(0.01)
    raise AssertionError("the batch never finished")


def read_lines(client: openai.OpenAI, file_id: str | None) -> list[dict]:
    if file_id is None:
        return []
    return [json.loads(x) for x in client.files.content(file_id).text.splitlines()]


def test_a_batch_goes_through_its_states_and_serves_the_synchronous_vectors(server, client) -> None:
    server.configure(batch_delay_s=0.2)
    texts = [["Supersonic flow over a wedge.", "heat transfer"], ["Boundary layer transition"]]
    batch = submit(client, [line("r0", texts[0]), line("r1", texts[1])])
    assert batch.status == "validating" and batch.endpoint == "/v1/embeddings"
    assert batch.completion_window == "24h" and batch.expires_at == batch.created_at + 86400
    seen: list[str] = []
    done = wait(client, batch.id, seen)
    assert seen == ["in_progress", "finalizing", "completed"]
    assert done.request_counts.total == 2 and done.request_counts.completed == 2
    assert done.request_counts.failed == 0 and done.error_file_id is None
    out = {x["custom_id"]: x for x in read_lines(client, done.output_file_id)}
    assert set(out) == {"r0", "r1"}
    for cid, group in zip(("r0", "r1"), texts):
        resp = out[cid]["response"]
        assert resp["status_code"] == 200 and resp["request_id"] and out[cid]["error"] is None
        sync = client.embeddings.create(model=EMBED, input=group)
        got = np.array([d["embedding"] for d in resp["body"]["data"]], dtype=np.float32)
        np.testing.assert_allclose(got, np.array([d.embedding for d in sync.data], dtype=np.float32), atol=1e-6)
        assert resp["body"]["usage"]["prompt_tokens"] == sync.usage.prompt_tokens
    counters = server.counters()
    assert (counters["files_uploaded"], counters["batches_created"]) == (1, 1)
    assert counters["batch_inputs_billed"] == 3
    assert counters["batch_tokens_billed"] == sum(
        x["response"]["body"]["usage"]["prompt_tokens"] for x in out.values())


def test_files_can_be_read_back_and_deleted(server, client) -> None:
    raw = jsonl([line("a", ["x"])])
    f = client.files.create(file=("in.jsonl", io.BytesIO(raw)), purpose="batch")
    assert (f.object, f.purpose, f.bytes, f.filename) == ("file", "batch", len(raw), "in.jsonl")
    assert client.files.retrieve(f.id).id == f.id
    assert client.files.content(f.id).content == raw
    assert client.files.delete(f.id).deleted is True
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(f.id)
    assert server.counters()["files_deleted"] == 1


@pytest.mark.parametrize(("content", "code"), [
    (b'{"custom_id": "a", "method": "POST", "url": "/v1/embeddings", "body": {"model": "m", "input": ["x"]}}\n{not json\n',
     "invalid_json_line"),
    (jsonl([line("a", ["x"], url="/v1/chat/completions")]), "mismatched_endpoint"),
    (jsonl([line("a", ["x"]), line("a", ["y"])]), "duplicate_custom_id"),
    (jsonl([line(f"r{i}", ["x"]) for i in range(4)]), "too_many_requests"),
    (jsonl([line("a", ["x", "y", "z"]), line("b", ["w", "v"])]), "too_many_inputs"),
])
def test_an_invalid_input_file_fails_the_batch_with_errors(server, client, content, code) -> None:
    server.configure(batch_max_requests=3, batch_max_inputs=4)
    done = wait(client, submit(client, content).id)
    assert done.status == "failed" and done.output_file_id is None
    assert code in [e.code for e in done.errors.data]
    assert server.counters()["batch_tokens_billed"] == 0


def test_a_file_over_the_size_limit_is_refused_at_upload(server, client) -> None:
    server.configure(batch_max_file_bytes=100)
    with pytest.raises(openai.BadRequestError, match="too large"):
        client.files.create(file=("in.jsonl", io.BytesIO(b"x" * 101)), purpose="batch")
    assert server.counters()["files_uploaded"] == 0


def test_failed_lines_go_to_the_error_file_and_are_not_billed(server, client) -> None:
    server.configure(batch_fail_ids=("r1",), batch_faulty_batches=1)
    done = wait(client, submit(client, [line("r0", ["a b"]), line("r1", ["c d e"])]).id)
    assert done.status == "completed"
    assert (done.request_counts.completed, done.request_counts.failed) == (1, 1)
    [err] = read_lines(client, done.error_file_id)
    assert err["custom_id"] == "r1" and err["response"]["status_code"] == 500
    assert server.counters()["batch_inputs_billed"] == 1
    # Only the first batch after the setting was faulty: the same line now passes.
    again = wait(client, submit(client, [line("r1", ["c d e"])]).id)
    assert again.request_counts.completed == 1 and again.error_file_id is None


def test_a_line_the_embeddings_endpoint_refuses_fails_alone(server, client) -> None:
    done = wait(client, submit(client, [line("ok", ["fine"]), line("bad", ["x"], body={"model": EMBED, "input": []})]).id)
    [err] = read_lines(client, done.error_file_id)
    assert err["custom_id"] == "bad" and err["response"]["status_code"] == 400
    assert [x["custom_id"] for x in read_lines(client, done.output_file_id)] == ["ok"]


@pytest.mark.parametrize(("knob", "status", "code"), [
    ("batch_expire_after_s", "expired", "batch_expired"),
    ("batch_cancel_after_s", "cancelled", "batch_cancelled"),
])
def test_an_expired_or_cancelled_batch_keeps_what_completed(server, client, knob, status, code) -> None:
    server.configure(batch_delay_s=0.4, **{knob: 0.2})  # half the lines done by then
    done = wait(client, submit(client, [line(f"r{i}", [f"text {i}"]) for i in range(4)]).id)
    assert done.status == status
    assert [x["custom_id"] for x in read_lines(client, done.output_file_id)] == ["r0", "r1"]
    errors = read_lines(client, done.error_file_id)
    assert [(x["custom_id"], x["error"]["code"], x["response"]) for x in errors] == [
        ("r2", code, None), ("r3", code, None)]
    assert server.counters()["batch_inputs_billed"] == 2


def test_the_client_can_cancel_a_batch(server, client) -> None:
    server.configure(batch_delay_s=30.0)
    batch = submit(client, [line("r0", ["a"])])
    assert client.batches.cancel(batch.id).status == "cancelling"
    done = wait(client, batch.id)
    assert done.status == "cancelled" and done.cancelled_at is not None
    assert server.counters()["batch_inputs_billed"] == 0
    assert [b.id for b in client.batches.list().data][0] == batch.id
