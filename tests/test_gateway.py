"""The chat gateway against two real OpenAI-protocol servers on 127.0.0.1: one plays
the self-hosted model ("local"), the other the hosted API ("hosted")."""

from __future__ import annotations

import time

import pytest

from embedpipe.errors import ChatRequestRejected, NoBackendAvailable, StreamInterrupted
from embedpipe.gateway import Gateway, log_stats

from conftest import LOOPBACK_KEY, cli

HELLO = [{"role": "user", "content": "Say hello"}]


@pytest.fixture
def servers(static_model_dir, monkeypatch):
    from embedpipe.testing.openai_server import LoopbackOpenAI, ServerConfig

    monkeypatch.setenv("OPENAI_API_KEY", LOOPBACK_KEY)
    local = LoopbackOpenAI(ServerConfig(model_path=static_model_dir, api_key=None,
                                        chat_models=("llama-local",), retry_after_s=0.01))
    hosted = LoopbackOpenAI(ServerConfig(model_path=static_model_dir, api_key=LOOPBACK_KEY,
                                         chat_models=("gpt-hosted",), retry_after_s=0.01))
    with local, hosted:
        yield local, hosted


def _config(local, hosted, local_extra: str = "", top: str = "") -> str:
    return (
        top + '[chat]\nroute = ["local", "hosted"]\nbreaker_failures = 2\nbreaker_cooldown_s = 0.5\n'
        f'[chat.backends.local]\nbase_url = "{local.base_url}"\nmodel = "llama-local"\n'
        f'hosted = false\napi_key_env = ""\ntimeout_s = 0.5\nconnect_timeout_s = 0.5\n{local_extra}'
        f'[chat.backends.hosted]\nbase_url = "{hosted.base_url}"\nmodel = "gpt-hosted"\n'
        'api_key_env = "OPENAI_API_KEY"\n'
        'timeout_s = 5\nprice_input_per_million = 0.15\nprice_output_per_million = 0.60\n'
    )


@pytest.fixture
def gateway(make_settings, servers):
    local, hosted = servers
    return Gateway.from_settings(make_settings(_config(local, hosted))), local, hosted


def test_the_local_backend_answers_first(gateway) -> None:
    gw, local, hosted = gateway
    result = gw.chat(HELLO)
    assert (result.backend, result.content) == ("local", "loopback reply to: Say hello")
    assert result.output_tokens > 0 and result.input_tokens > 0 and result.cost_usd == 0.0
    assert local.counters()["chat_ok"] == 1 and hosted.counters()["chat_requests"] == 0


def test_a_slow_primary_falls_back_within_its_timeout(gateway) -> None:
    gw, local, hosted = gateway
    local.config.latency_s = 3.0  # far beyond timeout_s = 0.5
    started = time.perf_counter()
    result = gw.chat(HELLO)
    elapsed = time.perf_counter() - started
    assert result.backend == "hosted" and elapsed < 0.5 + 1.0  # the timeout plus a margin
    assert result.fallbacks[0]["backend"] == "local" and result.fallbacks[0]["kind"] == "timeout"
    assert result.cost_usd == pytest.approx(
        (result.input_tokens * 0.15 + result.output_tokens * 0.60) / 1e6)


def test_the_breaker_opens_then_a_probe_closes_it(gateway) -> None:
    gw, local, hosted = gateway
    local.config.rate_500 = 1.0  # the primary is down
    for _ in range(2):
        assert gw.chat(HELLO).backend == "hosted"
    assert gw.stats()["local"]["breaker"]["state"] == "open"
    before = local.counters()["chat_requests"]
    assert gw.chat(HELLO).backend == "hosted"
    assert local.counters()["chat_requests"] == before  # skipped while open
    assert gw.chat(HELLO).fallbacks[0]["kind"] == "breaker_open"
    local.config.rate_500 = 0.0  # it recovers
    time.sleep(0.6)  # the cooldown
    assert gw.chat(HELLO).backend == "local"  # the probe went through and closed it
    assert gw.stats()["local"]["breaker"]["state"] == "closed"


def test_a_refused_request_is_not_sent_elsewhere(gateway) -> None:
    gw, local, hosted = gateway
    with pytest.raises(ChatRequestRejected, match="refused the request"):
        gw.chat([{"role": "user", "content": "x"}], max_tokens=-5)
    assert hosted.counters()["chat_requests"] == 0


def test_stream_falls_back_before_the_first_token_only(gateway) -> None:
    gw, local, hosted = gateway
    local.config.stream_cut_after = 1  # dies before its first token
    stream = gw.stream(HELLO)
    assert stream.text() == "loopback reply to: Say hello"
    assert stream.result.backend == "hosted" and stream.result.ttft_s is not None
    assert stream.result.fallbacks[0]["kind"] == "cut"

    local.config.stream_cut_after = 3  # dies after two tokens reached the caller
    received = []
    with pytest.raises(StreamInterrupted, match="after the first token"):
        for piece in gw.stream(HELLO):
            received.append(piece)
    assert received and "".join(received) != "loopback reply to: Say hello"
    assert hosted.counters()["chat_requests"] == 1  # the interrupted stream was not replayed


def test_sovereign_and_sensitive_requests_never_reach_the_hosted_server(make_settings, servers) -> None:
    local, hosted = servers
    local.config.rate_500 = 1.0
    sensitive = Gateway.from_settings(make_settings(_config(local, hosted)))
    with pytest.raises(NoBackendAvailable, match="local: HTTP 500"):
        sensitive.chat(HELLO, sensitive=True)
    sovereign = Gateway.from_settings(make_settings(_config(local, hosted, top="sovereign = true\n")))
    with pytest.raises(NoBackendAvailable):
        sovereign.chat(HELLO)
    with pytest.raises(NoBackendAvailable):
        sovereign.stream(HELLO).text()
    assert hosted.counters()["chat_requests"] == 0
    only_hosted = make_settings('sovereign = true\n[chat]\nroute = ["hosted"]\n[chat.backends.hosted]\n'
                                f'base_url = "{hosted.base_url}"\nmodel = "gpt-hosted"\n')
    with pytest.raises(NoBackendAvailable, match="sovereign mode is on.*hosted = false"):
        Gateway.from_settings(only_hosted).chat(HELLO)
    assert hosted.counters()["chat_requests"] == 0


def test_stats_and_audit_log_match_the_servers(gateway, tmp_path) -> None:
    gw, local, hosted = gateway
    for n in range(6):
        local.config.rate_500 = 1.0 if n % 3 == 0 else 0.0
        gw.chat(HELLO)
    list(gw.stream(HELLO))
    stats = gw.stats()
    assert stats["local"]["requests"] == local.counters()["chat_requests"] == 7
    assert stats["local"]["errors"] == local.counters()["by_status"].get(500, 0) == 2
    assert stats["hosted"]["requests"] == hosted.counters()["chat_requests"] == 2
    assert stats["local"]["p50_latency_s"] > 0 and stats["local"]["p50_ttft_s"] is not None
    records = gw.audit.read()
    assert len(records) == 7 and all(r["outcome"] == "ok" for r in records)
    assert [r["served_by"] for r in records].count("hosted") == 2
    text = gw.audit.path.read_text()
    assert "Say hello" not in text and LOOPBACK_KEY not in text  # no content, no key
    from_log = log_stats(gw.audit.path.parent.parent)
    assert {k: from_log["local"][k] for k in ("requests", "errors")} == {"requests": 7, "errors": 2}


def test_cli_chat_stream_and_stats(make_settings, servers, capsys, monkeypatch) -> None:
    import json

    local, hosted = servers
    cfg = str(make_settings(_config(local, hosted)).config_path)
    code, out, _ = cli(capsys, monkeypatch, "-c", cfg, "chat", "Say hello", "--json")
    reply = json.loads(out)
    assert code == 0 and reply["backend"] == "local" and reply["content"].endswith("Say hello")
    assert reply["latency_s"] > 0
    local.config.latency_s = 3.0
    code, out, err = cli(capsys, monkeypatch, "-c", cfg, "chat", "Say hello", "--stream")
    assert code == 0 and out == "loopback reply to: Say hello\n"
    assert "[hosted (gpt-hosted)" in err and "local timeout" in err
    code, out, _ = cli(capsys, monkeypatch, "-c", cfg, "gateway", "stats", "--json")
    stats = json.loads(out)
    assert stats["local"]["requests"] == 2 and stats["local"]["errors"] == 1
    assert stats["hosted"]["requests"] == 1 and stats["hosted"]["p50_ttft_s"] is not None
    code, _, err = cli(capsys, monkeypatch, "-c", cfg, "chat", "Say hello", "--sensitive")
    assert code == 69 and err.startswith("error: no chat backend answered (local: timed out")
    assert hosted.counters()["chat_requests"] == 1


def test_ask_answers_with_citations_of_retrieved_documents(
    make_settings, servers, static_model_dir, capsys, monkeypatch
) -> None:
    import json

    from conftest import EXAMPLES, static_profile_toml
    from embedpipe.index import Index
    from embedpipe.ingest import ingest
    from embedpipe.engine import close_all

    local, hosted = servers
    settings = make_settings('default_profile = "static"\n' + static_profile_toml(static_model_dir)
                             + _config(local, hosted))
    ingest(settings, "kb", EXAMPLES / "corpus" / "docs.jsonl")
    answer = Index("kb", settings).answer("Which planet has a runaway greenhouse effect?", k=3)
    retrieved = [s["id"] for s in answer.sources]
    assert len(retrieved) == 3 and answer.backend == "local"
    # the loopback model echoes the start of its prompt: the first source, cited as [id]
    assert answer.citations == [retrieved[0]]
    close_all()
    code, out, _ = cli(capsys, monkeypatch, "-c", str(settings.config_path), "ask",
                        "Which planet has a runaway greenhouse effect?", "--index", "kb", "--json")
    data = json.loads(out)
    assert code == 0 and data["citations"] and set(data["citations"]) <= {s["id"] for s in data["sources"]}
    assert data["backend"] == "local" and data["answer"]


def test_embedding_replicas_fail_over_within_one_space(make_settings, servers, tmp_path) -> None:
    from conftest import write_jsonl
    from embedpipe.index import Index, IndexVersions
    from embedpipe.ingest import ingest
    from embedpipe.profiles import fingerprint
    from embedpipe.qdrant import connect

    local, hosted = servers  # both serve the same static model: two replicas of one space
    body = (
        'default_profile = "tei"\n[profiles.tei]\nprovider = "openai"\nmodel = "text-embedding-3-small"\n'
        f'base_url = "{local.base_url}"\napi_key_env = ""\nself_hosted = true\ndims = 256\n'
        f'replicas = [{{ base_url = "{hosted.base_url}", api_key_env = "OPENAI_API_KEY" }}]\n'
        '[profiles.tei.limits]\ntimeout_s = 0.5\nbreaker_failures = 2\nbreaker_cooldown_s = 60\n'
        'backoff_base_s = 0.01\nmax_inputs = 4\nconcurrency = 1\n'
    )
    settings = make_settings(body)
    alone = settings.profile("tei").model_copy(update={"replicas": []})
    assert fingerprint(settings.profile("tei")) == fingerprint(alone)  # endpoints are not the space
    local.config.faults_after_requests = 1  # the probe passes, then the primary is down
    local.config.rate_500 = 1.0
    docs = [{"id": f"d{i}", "text": f"Document {i} about wing number {i} and its lift."} for i in range(40)]
    report = ingest(settings, "kb", write_jsonl(tmp_path / "d.jsonl", docs))
    assert (report.added, report.failed) == (40, 0)
    assert local.counters()["by_status"].get(500) == 2  # then its breaker opened: skipped
    assert hosted.counters()["embedding_ok"] >= 10
    versions = IndexVersions.open(settings)
    assert versions.count(versions.require_live("kb").collection) == 40
    assert Index("kb", settings).search(docs[7]["text"], k=1)[0].id == "d7"


def test_a_replica_of_another_model_is_rejected_at_load(make_settings) -> None:
    from embedpipe.errors import ConfigError

    with pytest.raises(ConfigError, match="model would put another embedding space .*fingerprint"):
        make_settings('[profiles.tei]\nprovider = "openai"\nmodel = "bge"\nbase_url = "http://a/v1"\n'
                      'dims = 384\nreplicas = [{ base_url = "http://b/v1", model = "e5" }]\n')
    with pytest.raises(ConfigError, match="replicas are endpoints of an OpenAI-protocol model"):
        make_settings('[profiles.local-minilm]\nreplicas = [{ base_url = "http://b/v1" }]\n')


def test_429_and_a_dead_port_move_to_the_next_backend(make_settings, servers) -> None:
    local, hosted = servers
    local.config.rate_429 = 1.0
    gw = Gateway.from_settings(make_settings(_config(local, hosted)))
    assert gw.chat(HELLO).fallbacks[0]["kind"] == "http_429"
    dead = _config(local, hosted).replace(local.base_url, "http://127.0.0.1:9/v1")
    result = Gateway.from_settings(make_settings(dead)).chat(HELLO)
    assert result.backend == "hosted" and result.fallbacks[0]["kind"] == "connection"
    assert [r["attempts"][0]["kind"] for r in gw.audit.read()][-1] == "connection"


# --- the key rule (issue 17 item 2) -----------------------------------------------------


def test_a_server_of_your_own_never_receives_the_openai_key(make_settings, servers) -> None:
    from embedpipe.testing.openai_server import key_id

    local, hosted = servers  # $OPENAI_API_KEY is set (the fixture)
    no_key_env = _config(local, hosted).replace('api_key_env = ""\n', "")  # the key rule's default
    for body in (no_key_env, _config(local, hosted)):
        assert Gateway.from_settings(make_settings(body)).chat(HELLO).backend == "local"
    assert local.counters()["auth_requests"] == 0  # no Authorization header at all
    local.config.rate_500 = 1.0
    assert Gateway.from_settings(make_settings(no_key_env)).chat(HELLO).backend == "hosted"
    assert hosted.counters()["auth_keys"] == {key_id(LOOPBACK_KEY): 1}  # it names its key


@pytest.mark.parametrize("url", ["http://10.1.2.3:8000/v1", "http://gpu-box.internal/v1"])
def test_a_key_is_never_sent_in_clear_to_another_machine(make_settings, url) -> None:
    from embedpipe.errors import ConfigError

    body = ('[chat]\nroute = ["remote"]\n[chat.backends.remote]\n'
            f'base_url = "{url}"\nmodel = "m"\napi_key_env = "OPENAI_API_KEY"\n')
    with pytest.raises(ConfigError, match=r"in clear text to .*allow_insecure_key = true under "
                                          r"\[chat.backends.remote\]"):
        Gateway.from_settings(make_settings(body))
    Gateway.from_settings(make_settings(body + "allow_insecure_key = true\n"))  # said so: allowed
    https = body.replace("http://", "https://")
    Gateway.from_settings(make_settings(https))


# --- a malformed 200, the breaker's probe (item 9) ---------------------------------------


def test_a_reply_without_choices_falls_back_and_is_audited(gateway) -> None:
    gw, local, hosted = gateway
    local.config.corrupt = "empty_choices"
    result = gw.chat(HELLO)
    assert result.backend == "hosted" and result.fallbacks[0]["kind"] == "malformed"
    [record] = gw.audit.read()
    assert record["outcome"] == "ok" and record["attempts"][0]["kind"] == "malformed"


def _open_breaker(gw, local) -> None:
    """Fail the local backend until its breaker opens, then wait out the cooldown."""
    local.config.rate_500 = 1.0
    for _ in range(2):
        gw.chat(HELLO)
    assert gw.stats()["local"]["breaker"]["state"] == "open"
    local.config.rate_500 = 0.0
    time.sleep(0.6)  # breaker_cooldown_s = 0.5: the next request is the probe


def test_a_malformed_probe_reopens_the_breaker_instead_of_jamming_it(gateway) -> None:
    gw, local, hosted = gateway
    _open_breaker(gw, local)
    local.config.corrupt = "empty_choices"
    assert gw.chat(HELLO).backend == "hosted"  # the probe's answer was malformed
    assert gw.stats()["local"]["breaker"]["state"] == "open"  # a verdict, not a pending probe
    local.config.corrupt = None
    time.sleep(0.6)
    assert gw.chat(HELLO).backend == "local"
    assert gw.stats()["local"]["breaker"]["state"] == "closed"


def test_a_stream_abandoned_during_the_probe_leaves_the_breaker_usable(gateway) -> None:
    gw, local, hosted = gateway
    _open_breaker(gw, local)
    pieces = iter(gw.stream(HELLO))
    assert next(pieces) == "loopback "  # the probe's first token: the backend is alive
    pieces.close()  # the caller walks away
    assert gw.stats()["local"]["breaker"]["state"] == "closed"
    before = local.counters()["chat_ok"]
    assert gw.chat(HELLO).backend == "local"
    assert local.counters()["chat_ok"] == before + 1
    assert [r["outcome"] for r in gw.audit.read()][-2:] == ["abandoned", "ok"]


# --- wall-clock deadlines (item 10) -------------------------------------------------------


def test_a_trickling_backend_is_cut_at_its_deadline(gateway) -> None:
    gw, local, hosted = gateway
    local.config.trickle_s = 0.05  # a ~400-byte body: about 20 s, each read quick
    started = time.perf_counter()
    result = gw.chat(HELLO)
    assert result.backend == "hosted" and result.fallbacks[0]["kind"] == "timeout"
    assert time.perf_counter() - started < 5  # timeout_s = 0.5, with a wide margin


def test_keep_alive_comments_do_not_stretch_the_first_token_deadline(make_settings, servers) -> None:
    local, hosted = servers
    body = _config(local, hosted).replace(
        "timeout_s = 0.5\nconnect", "timeout_s = 30\nfirst_token_timeout_s = 1.0\nconnect")
    gw = Gateway.from_settings(make_settings(body))
    local.config.first_token_delay_s, local.config.keepalive_s = 8.0, 0.05
    started = time.perf_counter()
    stream = gw.stream(HELLO)
    assert stream.text() == "loopback reply to: Say hello"  # a fallback, not StreamInterrupted
    assert time.perf_counter() - started < 5
    assert stream.result.backend == "hosted"
    assert stream.result.fallbacks[0]["kind"] == "timeout"
    assert "first_token_timeout_s = 1" in stream.result.fallbacks[0]["reason"]


def test_a_silent_stream_is_cut_at_the_first_token_deadline(make_settings, servers) -> None:
    local, hosted = servers  # headers at once, then silence: only the deadline's watchdog ends it
    body = _config(local, hosted).replace(
        "timeout_s = 0.5\nconnect", "timeout_s = 30\nfirst_token_timeout_s = 1.0\nconnect")
    gw = Gateway.from_settings(make_settings(body))
    local.config.first_token_delay_s = 8.0
    started = time.perf_counter()
    stream = gw.stream(HELLO)
    assert stream.text() == "loopback reply to: Say hello" and stream.result.backend == "hosted"
    assert time.perf_counter() - started < 5
    local.config.first_token_delay_s = 0.0
    assert gw.stream(HELLO).text() and gw.stats()["local"]["requests"] == 2  # the pool still works
