"""Token-aware chunking with real tokenizers: MiniLM's WordPiece and OpenAI's cl100k."""

from __future__ import annotations

import pytest

from embedpipe.backends import build_embedder
from embedpipe.chunking import Chunker, ChunkSpec, chunk_limit, split
from embedpipe.errors import ConfigError
from embedpipe.tokens import TokenCounter

SENTENCES = " ".join(
    f"Sentence {n} describes wing number {n} and its measured lift coefficient." for n in range(60)
)


@pytest.fixture(scope="module")
def minilm():
    from embedpipe.config import load_settings

    embedder = build_embedder(load_settings().profile("local-minilm"))
    embedder.check()
    return embedder


def _tokens(embedder, text: str) -> int:
    return len(embedder.token_spans(text))


def test_a_text_that_fits_is_one_chunk_unchanged(minilm) -> None:
    text = "  Short text, kept exactly as it is.\n"
    chunks = Chunker(ChunkSpec(64, 8), minilm).split(text)
    assert [(c.n, c.start, c.end, c.text) for c in chunks] == [(0, 0, len(text), text)]


def test_chunks_fit_overlap_and_cover_the_text(minilm) -> None:
    spec = ChunkSpec(48, 12)
    chunks = Chunker(spec, minilm).split(SENTENCES)
    assert len(chunks) > 5 and [c.n for c in chunks] == list(range(len(chunks)))
    assert all(_tokens(minilm, c.text) <= spec.max_tokens for c in chunks)
    assert all(SENTENCES[c.start:c.end] == c.text for c in chunks)
    assert chunks[0].start == 0 and chunks[-1].end == len(SENTENCES)
    for a, b in zip(chunks, chunks[1:]):
        assert b.start < a.end  # overlapping: no text falls between two chunks
        assert a.start < b.start
        assert SENTENCES[b.start - 1] == " "  # a chunk starts at a word, not mid-word
    # cuts fall at sentence ends where one is near the limit
    assert sum(c.text.endswith(".") for c in chunks[:-1]) >= len(chunks) // 2
    assert Chunker(spec, minilm).split(SENTENCES) == chunks  # the same on every run


def test_overlap_zero_and_a_single_overlong_word(minilm) -> None:
    word = "x" * 3000  # one "word" of many word pieces: cut mid-word, nothing lost
    chunks = Chunker(ChunkSpec(32, 0), minilm).split(word)
    assert "".join(c.text for c in chunks) == word
    assert all(_tokens(minilm, c.text) <= 32 for c in chunks)


def test_hosted_tokenizer_spans_mark_word_boundaries() -> None:
    counter = TokenCounter()
    text = "The quick brown fox jumps over the lazy dog. " * 30
    spans = counter.spans(text)
    assert len(spans) == counter.count([text])[0]
    assert all(not text[s:e][:1].isspace() for s, e in spans if e > s)
    chunks = split(text, spans, ChunkSpec(40, 5))
    assert all(counter.count([c.text])[0] <= 41 for c in chunks)  # a cut may re-tokenize by one
    assert all(c.text.endswith(".") for c in chunks[:-1])


def test_chunk_size_must_fit_the_model(minilm) -> None:
    limit = chunk_limit(minilm)
    assert limit == 254  # 256 less [CLS] and [SEP]
    with pytest.raises(ConfigError, match="chunk_tokens = 300 exceeds .*local-minilm.*254"):
        Chunker(ChunkSpec(300), minilm)
    with pytest.raises(ConfigError, match="chunk_overlap = 40 must be between 0 and half"):
        ChunkSpec(64, 40)


def test_bad_chunking_in_the_config_fails_at_load(make_settings) -> None:
    with pytest.raises(ConfigError, match="chunk_overlap"):
        make_settings('[indexes.kb]\nchunk_tokens = 16\nchunk_overlap = 15\n')
    with pytest.raises(ConfigError, match="indexes.kb.chunk_token"):
        make_settings('[indexes.kb]\nchunk_token = 16\n')  # a typo is named, not ignored
