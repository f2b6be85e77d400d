"""Embedding replicas and their circuit breakers, against two real loopback servers: a
probe of a half-open breaker always ends in a verdict (issue 17 item 9), whatever the
endpoint answered."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from embedpipe.backends import build_embedder
from embedpipe.errors import DimensionMismatch

from conftest import write_config

COOLDOWN_S = 0.3


@pytest.fixture
def endpoints(static_model_dir) -> Iterator[tuple]:
    from embedpipe.testing.openai_server import LoopbackOpenAI, ServerConfig

    def server() -> LoopbackOpenAI:
        return LoopbackOpenAI(ServerConfig(model_path=static_model_dir, api_key=None))

    with server() as primary, server() as replica:
        yield primary, replica


@pytest.fixture
def embedder(endpoints, tmp_path, monkeypatch):
    from embedpipe.config import load_settings

    monkeypatch.setenv("OPENAI_API_KEY", "sk-openai-not-for-these-servers")
    primary, replica = endpoints
    body = (
        f'[profiles.tei]\nprovider = "openai"\nmodel = "text-embedding-3-small"\ndims = 256\n'
        f'base_url = "{primary.base_url}"\nself_hosted = true\nmax_tokens = 9000\n'
        f'replicas = [{{ base_url = "{replica.base_url}" }}]\n'
        f'[profiles.tei.limits]\nmax_retries = 0\ntimeout_s = 5\nbreaker_failures = 1\n'
        f'breaker_cooldown_s = {COOLDOWN_S}\nconcurrency = 1\n'
    )
    return build_embedder(load_settings(write_config(tmp_path, body)).profile("tei"))


def _half_open(embedder, primary) -> None:
    """Fail the primary once (its breaker opens), then wait out the cooldown: the next
    request is the probe."""
    primary.config.rate_500 = 1.0
    assert not embedder.embed_documents(["wing"]).failed  # the replica answered it
    assert embedder.endpoints[0].breaker.state == "open"
    primary.config.rate_500 = 0.0
    time.sleep(COOLDOWN_S + 0.05)


def _probe_refused(embedder, primary) -> None:  # a 400 for its content (8,600 > 8,192 tokens)
    batch = embedder.embed_documents(["lift " * 8600])
    assert "HTTP 400" in batch.failed[0]


def _probe_wrong_dims(embedder, primary) -> None:
    primary.config.wrong_dims = True
    with pytest.raises(DimensionMismatch):
        embedder.embed_documents(["wing"])
    primary.config.wrong_dims = False


def _probe_refusing_base64(embedder, primary) -> None:
    primary.config.refuse_base64 = True  # answered again in floats, by the same endpoint
    ok = primary.counters()["embedding_ok"]
    assert not embedder.embed_documents(["wing"]).failed
    assert primary.counters()["embedding_ok"] == ok + 1


@pytest.mark.parametrize("probe", [_probe_refused, _probe_wrong_dims, _probe_refusing_base64])
def test_a_probe_ends_in_a_verdict_whatever_the_primary_answers(embedder, endpoints, probe) -> None:
    primary, replica = endpoints
    _half_open(embedder, primary)
    probe(embedder, primary)
    time.sleep(COOLDOWN_S + 0.05)  # in case the verdict was "no verdict": probe again
    ok = primary.counters()["embedding_ok"]
    served = replica.counters()["embedding_ok"]
    assert not embedder.embed_documents(["drag"]).failed
    assert primary.counters()["embedding_ok"] == ok + 1  # the primary is back in the route
    assert replica.counters()["embedding_ok"] == served
    assert embedder.endpoints[0].breaker.state == "closed"


def test_no_endpoint_gets_a_key_it_was_not_given(embedder, endpoints) -> None:
    primary, replica = endpoints  # neither names api_key_env; $OPENAI_API_KEY is set
    primary.config.rate_500 = 1.0
    assert not embedder.embed_documents(["wing"]).failed
    assert replica.counters()["embedding_ok"] == 1
    assert primary.counters()["auth_requests"] == replica.counters()["auth_requests"] == 0
