"""The embed-and-write engine, with a fake embedder that counts what it is asked."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from embedpipe.backends.base import EmbedBatch
from embedpipe.corpus import content_hash
from embedpipe.pipeline import Work, embed_and_write, plan_chunks
from embedpipe.profiles import Profile
from embedpipe.vectors import VectorStore


class CountingEmbedder:
    """A deterministic fake: the vector of a text is derived from its length."""

    def __init__(self) -> None:
        self.profile = Profile(name="fake", provider="sentence-transformers", model="fake", dims=3)
        self.calls: list[list[str]] = []

    @property
    def fingerprint(self) -> str:
        return "f" * 64

    def embed_documents(self, texts: Sequence[str]) -> EmbedBatch:
        self.calls.append(list(texts))
        return EmbedBatch(np.array([[len(t), 1.0, 0.0] for t in texts], np.float32))

    def embed_query(self, text: str) -> np.ndarray:
        return self.embed_documents([text]).vectors[0]


def _work(texts: list[str]) -> list[Work]:
    return [Work(f"d{i}", t, content_hash(t), {"id": f"d{i}"}) for i, t in enumerate(texts)]


@pytest.mark.parametrize(
    "lengths, chunk, expected",
    [
        ([1, 5, 3], 2, [[1, 2], [0]]),
        ([], 4, []),
        ([2, 2, 2], 5, [[0, 1, 2]]),
    ],
)
def test_plan_chunks_sorts_longest_first(lengths, chunk, expected) -> None:
    assert plan_chunks(lengths, chunk) == expected


def test_every_item_is_written_once_with_its_own_vector() -> None:
    embedder = CountingEmbedder()
    written: dict[str, np.ndarray] = {}

    def write(ids, vectors, payloads):
        for i, v in zip(ids, vectors):
            assert i not in written
            written[i] = v

    texts = ["a", "bbbb", "cc", "a", "dddddd"]
    stats = embed_and_write(_work(texts), embedder, write, window=3, chunk=2)
    assert set(written) == {f"d{i}" for i in range(5)}
    for i, t in enumerate(texts):
        assert written[f"d{i}"][0] == len(t)
    assert stats.documents == 5 and stats.embedded == 5


def test_identical_texts_in_a_window_embed_once() -> None:
    embedder = CountingEmbedder()
    stats = embed_and_write(_work(["same"] * 4), embedder, lambda *a: None, window=10, chunk=10)
    assert stats.embedded == 1 and sum(len(c) for c in embedder.calls) == 1


def test_stored_vectors_are_reused(tmp_path: Path) -> None:
    store = VectorStore(tmp_path, "f" * 64, 3)
    first = CountingEmbedder()
    embed_and_write(_work(["x", "yy"]), first, lambda *a: None, store)
    again = CountingEmbedder()
    stats = embed_and_write(_work(["x", "yy", "zzz"]), again, lambda *a: None, store)
    assert (stats.embedded, stats.reused) == (1, 2)
    assert again.calls == [["zzz"]]


def test_write_errors_surface_in_the_caller() -> None:
    def broken(ids, vectors, payloads):
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        embed_and_write(_work(["a", "b", "c"]), CountingEmbedder(), broken, window=1, chunk=1)
