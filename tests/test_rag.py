"""Grounded answers (`embedpipe.rag`): a sensitive question reaches no hosted endpoint,
the embedding API included."""

from __future__ import annotations

import pytest

from conftest import EXAMPLES, LOOPBACK_KEY, cli, hosted_profile_toml
from embedpipe.errors import SovereigntyError


@pytest.fixture
def chat_server(static_model_dir):
    from embedpipe.testing.openai_server import LoopbackOpenAI, ServerConfig

    with LoopbackOpenAI(ServerConfig(model_path=static_model_dir, api_key=None,
                                     chat_models=("llama-local",))) as server:
        yield server


def _config(embeddings, chat) -> str:
    return (
        'default_profile = "hosted"\n'
        + hosted_profile_toml(embeddings.base_url, extra='api_key_env = "OPENAI_API_KEY"')
        + '[chat]\nroute = ["local"]\n'
        f'[chat.backends.local]\nbase_url = "{chat.base_url}"\nmodel = "llama-local"\n'
        'hosted = false\napi_key_env = ""\n'
    )


def test_a_sensitive_question_is_not_embedded_by_a_hosted_model(
    make_settings, openai_server, chat_server, capsys, monkeypatch
) -> None:
    from embedpipe.index import Index
    from embedpipe.ingest import ingest
    from embedpipe.engine import close_all

    settings = make_settings(_config(openai_server, chat_server))
    ingest(settings, "kb", EXAMPLES / "corpus" / "docs.jsonl")
    before = openai_server.counters()["embedding_requests"]
    index = Index("kb", settings)
    question = "Which planet has a runaway greenhouse effect?"
    with pytest.raises(SovereigntyError, match="sensitive.*hosted"):
        index.answer(question, sensitive=True)
    with pytest.raises(SovereigntyError, match="sensitive"):
        index.search(question, sensitive=True)
    assert openai_server.counters()["embedding_requests"] == before
    assert chat_server.counters()["chat_requests"] == 0
    close_all()

    code, out, err = cli(capsys, monkeypatch, "-c", str(settings.config_path), "ask", question,
                         "--index", "kb", "--sensitive")
    assert code == 2 and out == "" and err.startswith("error: ") and err.count("\n") == 1
    assert openai_server.counters()["embedding_requests"] == before
    assert chat_server.counters()["chat_requests"] == 0

    # The same question, not sensitive: embedded by the index's hosted model, answered.
    answer = Index("kb", settings).answer(question)
    assert answer.backend == "local" and answer.sources
    assert openai_server.counters()["embedding_requests"] == before + 1
    assert LOOPBACK_KEY not in str(answer.to_dict())
