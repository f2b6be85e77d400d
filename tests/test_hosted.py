"""Hosted embeddings through the whole pipeline: the openai SDK against a real loopback
server (tests/conftest.py `openai_server`) that serves a real local model's vectors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from embedpipe.backends import build_embedder
from embedpipe.corpus import CorpusStore
from embedpipe.errors import (
    ConfigError,
    DimensionMismatch,
    ModelDeprecated,
    ProviderError,
    SovereigntyError,
)
from embedpipe.index import Index, IndexVersions, point_id
from embedpipe.ingest import ingest
from embedpipe.usage import UsageLedger, cost_summary

from conftest import EXAMPLES, LOOPBACK_KEY, hosted_profile_toml, write_jsonl

TOPICS = [
    ("bread", "Sourdough bread rises thanks to wild yeast and lactic acid bacteria."),
    ("venus", "Venus has a thick carbon dioxide atmosphere and a runaway greenhouse effect."),
    ("tcp", "TCP retransmits lost packets and uses a sliding window for flow control."),
    ("piano", "A grand piano has 88 keys and strings struck by felt hammers."),
]


def _docs(n_per_topic: int = 1) -> list[dict]:
    return [
        {"id": f"{name}-{i}", "text": f"{text} Note {i}.", "topic": name}
        for name, text in TOPICS for i in range(n_per_topic)
    ]


def _state(settings, index: str) -> tuple[int, list]:
    versions = IndexVersions.open(settings)
    corpus = CorpusStore.for_index(settings.data_dir, index).count()
    return corpus, [(v.collection, v.state, versions.count(v.collection)) for v in versions.versions(index)]


def _ledger_tokens(settings) -> int:
    return sum(r.tokens for r in UsageLedger(settings.data_dir).records())


def test_hosted_index_searches_like_the_model_itself(make_settings, openai_server, static_model_dir, tmp_path) -> None:
    from conftest import static_profile_toml

    settings = make_settings(hosted_profile_toml(openai_server.base_url) + static_profile_toml(static_model_dir))
    docs = write_jsonl(tmp_path / "d.jsonl", _docs())
    report = ingest(settings, "kb", docs, profile="hosted")
    assert (report.added, report.embedded, report.failed) == (4, 4, 0)
    idx = Index("kb", settings)
    assert idx.search("why does dough rise?", k=1)[0].id == "bread-0"
    assert idx.search("planet with a greenhouse atmosphere", k=1)[0].id == "venus-0"
    # The same texts through the local model: the server really serves that space.
    ingest(settings, "local", docs, profile="static")
    hosted_hits = idx.search("sliding window", k=4)
    local_hits = Index("local", settings).search("sliding window", k=4)
    assert [h.id for h in hosted_hits] == [h.id for h in local_hits]
    np.testing.assert_allclose([h.score for h in hosted_hits], [h.score for h in local_hits], atol=1e-5)
    # Every request the server billed is in the ledger, priced.
    counters = openai_server.counters()
    assert _ledger_tokens(settings) == counters["tokens_billed"] > 0
    rows = cost_summary(UsageLedger(settings.data_dir))
    assert [r["profile"] for r in rows] == ["hosted"]
    assert rows[0]["usd"] == pytest.approx(counters["tokens_billed"] * 0.02 / 1e6)


def test_faults_lose_nothing_and_the_ledger_matches_the_server(make_settings, openai_server, tmp_path) -> None:
    settings = make_settings(hosted_profile_toml(
        openai_server.base_url, limits="max_inputs = 5\nmax_retries = 10\n"))
    cfg = openai_server.config
    cfg.rate_429, cfg.rate_500, cfg.rate_timeout = 0.20, 0.05, 0.02
    docs = _docs(50)  # 200 documents, 40+ requests
    report = ingest(settings, "kb", write_jsonl(tmp_path / "d.jsonl", docs), profile="hosted")
    assert (report.added, report.failed) == (200, 0)
    versions = IndexVersions.open(settings)
    live = versions.require_live("kb")
    assert versions.point_ids(live.collection) == {point_id(d["id"]) for d in docs}
    assert versions.count(live.collection) == 200
    counters = openai_server.counters()
    assert counters["by_status"].get(429, 0) > 0 and counters["by_status"].get(500, 0) > 0
    assert _ledger_tokens(settings) == counters["tokens_billed"]
    assert counters["inputs_served"] == 200 + 1  # each text once, plus the probe


def test_requests_out_of_retries_fail_their_documents_and_a_rerun_completes(
    make_settings, openai_server, tmp_path
) -> None:
    settings = make_settings(hosted_profile_toml(
        openai_server.base_url, limits="max_inputs = 2\nmax_retries = 1\nconcurrency = 1\n"))
    path = write_jsonl(tmp_path / "d.jsonl", _docs(2))
    openai_server.config.faults_after_requests = 1  # the probe succeeds, then every request 500s
    openai_server.config.rate_500 = 1.0
    report = ingest(settings, "kb", path, profile="hosted")
    assert (report.documents, report.added, report.failed) == (8, 0, 8)
    assert all("gave up after 2 tries: HTTP 500" in f["reason"] for f in report.failures)
    assert CorpusStore.for_index(settings.data_dir, "kb").count() == 0  # failed docs stay out
    openai_server.config.rate_500 = 0.0
    again = ingest(settings, "kb", path, profile="hosted")
    assert (again.added, again.failed) == (8, 0)  # seen as new, so retried
    assert IndexVersions.open(settings).count("kb__hosted__v1") == 8


def test_sovereign_mode_refuses_hosted_profiles_before_sending_anything(
    make_settings, openai_server, tmp_path
) -> None:
    toml = hosted_profile_toml(openai_server.base_url)
    path = write_jsonl(tmp_path / "d.jsonl", _docs())
    ingest(make_settings(toml), "kb", path, profile="hosted")  # built before the policy
    openai_server.reset_counters()
    sovereign = make_settings("sovereign = true\n" + toml)
    with pytest.raises(SovereigntyError, match="sovereign mode is on: profile 'hosted'"):
        ingest(sovereign, "other", path, profile="hosted")
    with pytest.raises(SovereigntyError):
        Index("kb", sovereign).search("bread")
    assert openai_server.counters()["requests"] == 0
    assert _state(sovereign, "other") == (0, [])
    # A server of your own, marked self_hosted, is allowed.
    mine = make_settings("sovereign = true\n" + hosted_profile_toml(
        openai_server.base_url, name="mine", extra="self_hosted = true"))
    assert ingest(mine, "own", path, profile="mine").added == 4


@pytest.mark.parametrize("replacement", ["local-minilm", None])
def test_a_retired_model_fails_ingest_with_the_way_out_and_writes_nothing(
    make_settings, openai_server, tmp_path, replacement
) -> None:
    extra = f'[profiles.hosted.deprecation]\nreplacement = "{replacement}"\n' if replacement else ""
    settings = make_settings(hosted_profile_toml(
        openai_server.base_url, extra=extra, model="text-embedding-ada-002"))
    fix = "embedpipe migrate --to local-minilm" if replacement else "embedpipe models"
    with pytest.raises(ModelDeprecated, match=f"no longer serves model 'text-embedding-ada-002'.*{fix}"):
        ingest(settings, "kb", write_jsonl(tmp_path / "d.jsonl", _docs()), profile="hosted")
    assert _state(settings, "kb") == (0, [])
    assert not list((settings.data_dir / "vectors").glob("*/seg-*"))


def test_search_on_an_index_whose_model_was_retired_names_the_replacement(
    make_settings, openai_server, tmp_path
) -> None:
    settings = make_settings(hosted_profile_toml(
        openai_server.base_url, extra='[profiles.hosted.deprecation]\nreplacement = "local-minilm"\n'))
    ingest(settings, "kb", write_jsonl(tmp_path / "d.jsonl", _docs()), profile="hosted")
    openai_server.config.deprecated_models = ("text-embedding-3-small",)
    with pytest.raises(ModelDeprecated, match="embedpipe migrate --to local-minilm"):
        Index("kb", settings).search("bread")


def test_a_missing_key_fails_before_any_work(make_settings, openai_server, tmp_path, monkeypatch) -> None:
    monkeypatch.delenv("OPENAI_API_KEY")
    settings = make_settings(hosted_profile_toml(openai_server.base_url))
    with pytest.raises(ConfigError, match=r"needs an API key in \$OPENAI_API_KEY"):
        ingest(settings, "kb", write_jsonl(tmp_path / "d.jsonl", _docs()), profile="hosted")
    assert openai_server.counters()["requests"] == 0
    assert _state(settings, "kb") == (0, [])


def test_an_invalid_key_fails_once_without_retries(make_settings, openai_server, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-wrong-key-xyz")
    settings = make_settings(hosted_profile_toml(openai_server.base_url))
    with pytest.raises(ProviderError, match=r"refused the API key in \$OPENAI_API_KEY \(HTTP 401\)") as err:
        ingest(settings, "kb", write_jsonl(tmp_path / "d.jsonl", _docs()), profile="hosted")
    assert "sk-wrong" not in str(err.value)
    assert openai_server.counters()["requests"] == 1
    assert _state(settings, "kb") == (0, [])


def test_an_unreachable_base_url_is_a_clear_error(make_settings, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", LOOPBACK_KEY)
    settings = make_settings(hosted_profile_toml("http://127.0.0.1:9/v1"))
    with pytest.raises(ProviderError, match="did not answer a probe request .*connection failed"):
        ingest(settings, "kb", write_jsonl(tmp_path / "d.jsonl", _docs()), profile="hosted")
    assert _state(settings, "kb") == (0, [])


@pytest.mark.parametrize(
    "fault, error, match",
    [("wrong_dims", DimensionMismatch, "returned 257-dimensional vectors"),
     ("drop_one_vector", ProviderError, "returned 0 vectors for 1 inputs")],
)
def test_a_server_breaking_the_protocol_writes_nothing(
    make_settings, openai_server, tmp_path, fault, error, match
) -> None:
    setattr(openai_server.config, fault, True)
    settings = make_settings(hosted_profile_toml(openai_server.base_url))
    with pytest.raises(error, match=match):
        ingest(settings, "kb", write_jsonl(tmp_path / "d.jsonl", _docs()), profile="hosted")
    assert _state(settings, "kb") == (0, [])


def _long_doc() -> dict:
    return {"id": "long", "text": " ".join(["the wind tunnel measured lift and drag"] * 12)}


def test_over_long_inputs_are_rejected_per_config_and_reported(make_settings, openai_server, tmp_path) -> None:
    settings = make_settings(hosted_profile_toml(
        openai_server.base_url, extra='max_tokens = 40\nlong_inputs = "reject"\n'))
    report = ingest(settings, "kb", write_jsonl(tmp_path / "d.jsonl", _docs() + [_long_doc()]), profile="hosted")
    assert (report.documents, report.added, report.failed) == (5, 4, 1)
    assert report.failures[0]["id"] == "long"
    assert "over the 40-token limit" in report.failures[0]["reason"]
    assert "long" not in CorpusStore.for_index(settings.data_dir, "kb").known()
    assert IndexVersions.open(settings).count("kb__hosted__v1") == 4
    assert openai_server.counters()["by_status"].get(400, 0) == 0  # never sent


def test_over_long_inputs_are_chunked_into_a_token_weighted_mean(
    make_settings, openai_server, static_model_dir, tmp_path
) -> None:
    from sentence_transformers import SentenceTransformer

    from embedpipe.tokens import TokenCounter

    settings = make_settings(hosted_profile_toml(openai_server.base_url, extra="max_tokens = 40\n"))
    doc = _long_doc()
    report = ingest(settings, "kb", write_jsonl(tmp_path / "d.jsonl", [doc]), profile="hosted")
    assert (report.added, report.chunked, report.failed) == (1, 1, 0)
    pieces = TokenCounter().split(doc["text"], 40)
    assert len(pieces) > 1 and all(p.tokens <= 40 for p in pieces)
    model = SentenceTransformer(str(static_model_dir))
    parts = model.encode([p.text for p in pieces], normalize_embeddings=True)
    expected = np.average(parts, axis=0, weights=[p.tokens for p in pieces])
    expected /= np.linalg.norm(expected)
    stored = IndexVersions.open(settings).engine.vectors("kb__hosted__v1", [point_id("long")])
    np.testing.assert_allclose(stored[point_id("long")], expected, atol=1e-5)


def test_the_key_never_reaches_files_payloads_or_output(make_settings, openai_server, tmp_path) -> None:
    from typer.testing import CliRunner

    from embedpipe.cli import app

    config = tmp_path / "embedpipe.toml"
    config.write_text('data_dir = "data"\n' + hosted_profile_toml(openai_server.base_url), encoding="utf-8")
    write_jsonl(tmp_path / "d.jsonl", _docs())
    runner = CliRunner()
    outputs = [
        runner.invoke(app, ["ingest", "d.jsonl", "--index", "kb", "--profile", "hosted", "--json"]),
        runner.invoke(app, ["search", "bread", "--index", "kb", "--json"]),
        runner.invoke(app, ["status", "--json"]),
        runner.invoke(app, ["cost", "--json"]),
        runner.invoke(app, ["models", "--json"]),
    ]
    assert all(o.exit_code == 0 for o in outputs), [o.output for o in outputs]
    key = LOOPBACK_KEY.encode()
    for out in outputs:
        assert LOOPBACK_KEY not in out.output
    files = [p for p in (tmp_path / "data").rglob("*") if p.is_file()]
    assert files and not [p for p in files if key in p.read_bytes()]
    cost = json.loads(outputs[3].output)
    assert cost[0]["tokens"] == openai_server.counters()["tokens_billed"]


def test_a_server_without_base64_is_noticed_and_remembered(make_settings, openai_server) -> None:
    settings = make_settings(hosted_profile_toml(openai_server.base_url))
    embedder = build_embedder(settings.profile("hosted"), settings)
    first = embedder.embed_documents(["lift and drag"]).vectors
    openai_server.config.supports_base64 = False
    second = embedder.embed_documents(["lift and drag"]).vectors
    third = embedder.embed_documents(["lift and drag"]).vectors
    np.testing.assert_allclose(first, second, atol=1e-6)
    np.testing.assert_allclose(second, third, atol=1e-6)
    assert embedder._format == "float"


def test_examples_corpus_through_the_cli_exits_3_on_partial_failure(make_settings, openai_server, tmp_path) -> None:
    from typer.testing import CliRunner

    from embedpipe.cli import app

    (tmp_path / "embedpipe.toml").write_text('data_dir = "data"\n' + hosted_profile_toml(
        openai_server.base_url, extra='max_tokens = 200\nlong_inputs = "reject"\n'), encoding="utf-8")
    docs = [json.loads(line) for line in (EXAMPLES / "corpus" / "docs.jsonl").read_text().splitlines()]
    write_jsonl(tmp_path / "d.jsonl", docs + [_long_doc() | {"text": _long_doc()["text"] * 3}])
    out = CliRunner().invoke(app, ["ingest", "d.jsonl", "--index", "kb", "--profile", "hosted"])
    assert out.exit_code == 3
    from embedpipe.tokens import TokenCounter

    tokens = TokenCounter().count([_long_doc()["text"] * 3])[0]
    assert f"{len(docs) + 1} documents, {len(docs)} added" in out.output and "1 failed" in out.output
    assert f"failed: long: text has {tokens} tokens, over the 200-token limit" in out.output
    search = CliRunner().invoke(app, ["search", "wind tunnel", "--index", "kb", "--json"])
    assert "long" not in {h["id"] for h in json.loads(search.output)}


def test_dry_run_counts_tokens_and_cost_without_sending_anything(make_settings, openai_server, tmp_path) -> None:
    from embedpipe.tokens import TokenCounter

    settings = make_settings(hosted_profile_toml(openai_server.base_url))
    docs = _docs(3)
    path = write_jsonl(tmp_path / "d.jsonl", docs)
    report = ingest(settings, "kb", path, profile="hosted", dry_run=True)
    expected = sum(TokenCounter().count([d["text"] for d in docs]))
    assert (report.embedded, report.tokens) == (12, expected)
    assert report.estimated_usd == pytest.approx(expected * 0.02 / 1e6)
    assert openai_server.counters()["requests"] == 0
    assert _state(settings, "kb") == (0, [])


def test_one_refused_text_does_not_fail_the_texts_packed_with_it(make_settings, openai_server, tmp_path) -> None:
    # The profile believes 9,000 tokens fit; the server allows 8,192 and answers 400.
    settings = make_settings(hosted_profile_toml(openai_server.base_url, extra="max_tokens = 9000\n"))
    docs = _docs(5) + [{"id": "huge", "text": "lift " * 8600}]
    report = ingest(settings, "kb", write_jsonl(tmp_path / "d.jsonl", docs), profile="hosted")
    assert (report.added, report.failed) == (20, 1)
    assert report.failures[0]["id"] == "huge" and "HTTP 400" in report.failures[0]["reason"]
    assert IndexVersions.open(settings).count("kb__hosted__v1") == 20


def test_a_429_asking_for_hours_fails_fast_instead_of_hanging(make_settings, openai_server, tmp_path) -> None:
    settings = make_settings(hosted_profile_toml(openai_server.base_url, limits="max_wait_s = 60\n"))
    cfg = openai_server.config
    cfg.faults_after_requests, cfg.rate_429, cfg.retry_after_s = 1, 1.0, 3600.0
    report = ingest(settings, "kb", write_jsonl(tmp_path / "d.jsonl", _docs()), profile="hosted")
    assert report.failed == 4
    assert "told to wait 3,600 s, over max_wait_s = 60" in report.failures[0]["reason"]


def test_malformed_bodies_are_retried(make_settings, openai_server, tmp_path) -> None:
    settings = make_settings(hosted_profile_toml(
        openai_server.base_url, limits="max_inputs = 2\nmax_retries = 10\n"))
    openai_server.config.faults_after_requests = 1
    openai_server.config.rate_malformed = 0.3
    report = ingest(settings, "kb", write_jsonl(tmp_path / "d.jsonl", _docs(5)), profile="hosted")
    assert (report.added, report.failed) == (20, 0)
    assert openai_server.counters()["faults"].get("malformed", 0) > 0


# --- responses checked in full (issue 17 item 7) -------------------------------------------


@pytest.mark.parametrize("corrupt", ["duplicate_index", "index_out_of_range"])
def test_vectors_are_placed_only_by_indices_0_to_n_minus_1(
    make_settings, openai_server, tmp_path, corrupt
) -> None:
    settings = make_settings(hosted_profile_toml(openai_server.base_url))
    openai_server.config.faults_after_requests = 1  # the probe is answered correctly
    openai_server.config.corrupt = corrupt
    with pytest.raises(ProviderError, match=r"indices \[0, 1, 2, (0|4)\] for 4 inputs; each of 0..3"):
        ingest(settings, "kb", write_jsonl(tmp_path / "d.jsonl", _docs()), profile="hosted")
    assert not list((settings.data_dir / "vectors").glob("*/seg-*"))  # no vector reached the cache
    assert CorpusStore.for_index(settings.data_dir, "kb").count() == 0


@pytest.mark.parametrize("corrupt", ["nan", "inf"])
def test_a_vector_with_non_finite_values_fails_only_its_text(
    make_settings, openai_server, tmp_path, corrupt
) -> None:
    settings = make_settings(hosted_profile_toml(openai_server.base_url))
    openai_server.config.faults_after_requests = 1
    openai_server.config.corrupt = corrupt  # the first vector of every answer
    report = ingest(settings, "kb", write_jsonl(tmp_path / "d.jsonl", _docs()), profile="hosted")
    assert (report.added, report.failed) == (0, 4)  # halved down to each text alone
    assert all("NaN or infinite values" in f["reason"] for f in report.failures)
    assert not list((settings.data_dir / "vectors").glob("*/seg-*"))


def test_a_malformed_rate_limit_header_is_ignored(make_settings, openai_server, tmp_path) -> None:
    settings = make_settings(hosted_profile_toml(openai_server.base_url))
    openai_server.config.reply_headers = {"x-ratelimit-remaining-tokens": "inf",
                                          "x-ratelimit-reset-tokens": "1s"}
    report = ingest(settings, "kb", write_jsonl(tmp_path / "d.jsonl", _docs()), profile="hosted")
    assert (report.added, report.failed) == (4, 0)


# --- wall-clock deadlines (item 10) -------------------------------------------------------


def test_a_trickled_embedding_answer_times_out_at_timeout_s(make_settings, openai_server) -> None:
    import time

    settings = make_settings(hosted_profile_toml(openai_server.base_url, limits="max_retries = 0\n"))
    embedder = build_embedder(settings.profile("hosted"), settings)
    openai_server.config.trickle_s = 0.05  # a ~1,500-byte answer: over a minute
    started = time.perf_counter()
    with pytest.raises(ProviderError, match=r"timed out \(timeout_s = 0.5\)"):
        embedder.embed_queries(["lift and drag"])
    assert time.perf_counter() - started < 5


# --- the key rule (item 2) -------------------------------------------------------------------


def test_a_base_url_gets_no_key_unless_api_key_env_names_one(make_settings, openai_server, monkeypatch) -> None:
    from embedpipe.testing.openai_server import key_id

    openai_server.config.api_key = None  # a server that takes no key
    body = hosted_profile_toml(openai_server.base_url).replace('api_key_env = "OPENAI_API_KEY"\n', "")
    assert "api_key_env" not in body
    embedder = build_embedder(make_settings(body).profile("hosted"))
    embedder.embed_queries(["lift"])
    assert openai_server.counters()["auth_requests"] == 0  # $OPENAI_API_KEY is set, not sent
    monkeypatch.setenv("TEI_KEY", "sk-tei-own-key")
    named = body.replace("[profiles.hosted.limits]", 'api_key_env = "TEI_KEY"\n[profiles.hosted.limits]')
    build_embedder(make_settings(named).profile("hosted")).embed_queries(["lift"])
    assert openai_server.counters()["auth_keys"] == {key_id("sk-tei-own-key"): 1}


@pytest.mark.parametrize("where", ["profile", "replica"])
def test_a_key_over_plain_http_to_another_host_is_refused_before_sending(
    make_settings, openai_server, where
) -> None:
    remote = "http://10.9.8.7:8080/v1"
    if where == "profile":
        body = hosted_profile_toml(remote)
        fix = r"allow_insecure_key = true under \[profiles.hosted\]"
    else:
        body = hosted_profile_toml(openai_server.base_url, extra=(
            f'replicas = [{{ base_url = "{remote}", api_key_env = "OPENAI_API_KEY" }}]'))
        fix = r"allow_insecure_key = true under that replica in \[profiles.hosted\] replicas"
    with pytest.raises(ConfigError, match=f"in clear text to {remote}.*{fix}"):
        build_embedder(make_settings(body).profile("hosted"))
    assert openai_server.counters()["requests"] == 0
    opted_in = body.replace("10.9.8.7:8080/v1\"", "10.9.8.7:8080/v1\", allow_insecure_key = true") \
        if where == "replica" else body.replace("[profiles.hosted.limits]",
                                                "allow_insecure_key = true\n[profiles.hosted.limits]")
    build_embedder(make_settings(opted_in).profile("hosted"))  # said so: allowed
