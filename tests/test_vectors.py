"""The Parquet vector store: keyed by content hash within one fingerprint."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from embedpipe import vectors
from embedpipe.corpus import content_hash
from embedpipe.errors import StoreError
from embedpipe.vectors import VectorStore

H1, H2, H3, MISSING = (content_hash(t) for t in ("one", "two", "three", "never stored"))


def test_round_trip_and_one_row_per_hash(tmp_path: Path) -> None:
    store = VectorStore(tmp_path, "f" * 64, 4)
    vecs = np.arange(12, dtype=np.float32).reshape(3, 4)
    assert store.add([H1, H2, H1], vecs) == 2
    assert store.add([H2], vecs[:1]) == 0
    reopened = VectorStore(tmp_path, "f" * 64, 4)
    got = reopened.lookup([H1, H2, MISSING])
    assert set(got) == {H1, H2}
    np.testing.assert_array_equal(got[H2], vecs[1])
    assert len(reopened) == 2
    assert reopened.present([H1, MISSING, H2, H1]) == {H1, H2}
    assert H1 in reopened and MISSING not in reopened


def test_lookups_agree_before_and_after_the_index_merges(tmp_path: Path, monkeypatch) -> None:
    """Hashes added since the last merge (the recent list) and merged ones (the sorted
    arrays) are found alike, across many segments, in a fresh store and a reopened one."""
    monkeypatch.setattr(vectors._HashIndex, "MERGE_AT", 3)  # merge every few adds
    store = VectorStore(tmp_path, "f" * 64, 2)
    texts = [f"text {i}" for i in range(40)]
    hashes = [content_hash(t) for t in texts]
    vecs = np.arange(80, dtype=np.float32).reshape(40, 2)
    for start in range(0, 40, 2):  # 20 segments of 2 rows
        assert store.add(hashes[start:start + 2], vecs[start:start + 2]) == 2
    for s in (store, VectorStore(tmp_path, "f" * 64, 2)):
        got = s.lookup(hashes + [MISSING])
        assert set(got) == set(hashes) and len(s) == 40
        for h, v in zip(hashes, vecs):
            np.testing.assert_array_equal(got[h], v)


def test_a_hash_stored_twice_resolves_to_its_newest_row(tmp_path: Path) -> None:
    """Two processes may both store one hash (each checked before the other wrote); the
    reopened index must point at one real row, the newer."""
    first = VectorStore(tmp_path, "f" * 64, 2)
    second = VectorStore(tmp_path, "f" * 64, 2)
    assert len(second) == 0  # its index is read now, before the first one writes
    assert first.add([H1], np.full((1, 2), 1, np.float32)) == 1
    assert second.add([H2, H1], np.array([[2, 2], [3, 3]], np.float32)) == 2  # did not see H1
    got = VectorStore(tmp_path, "f" * 64, 2).lookup([H1, H2])
    np.testing.assert_array_equal(got[H1], [3, 3])
    np.testing.assert_array_equal(got[H2], [2, 2])


def test_a_key_that_is_not_a_content_hash_is_refused_before_writing(tmp_path: Path) -> None:
    store = VectorStore(tmp_path, "f" * 64, 2)
    with pytest.raises(StoreError, match="not a SHA-256 content hash"):
        store.add([H1, "h2"], np.ones((2, 2), np.float32))
    with pytest.raises(StoreError, match="not hexadecimal"):
        store.add(["z" * 64], np.ones((1, 2), np.float32))
    assert len(VectorStore(tmp_path, "f" * 64, 2)) == 0 and store.folder.segments() == []


def test_a_segment_with_a_foreign_key_is_named_when_the_index_loads(tmp_path: Path) -> None:
    store = VectorStore(tmp_path, "f" * 64, 2)
    store.add([H1], np.ones((1, 2), np.float32))
    table = pa.table({"content_hash": ["not-a-hash"],
                      "vector": pa.FixedSizeListArray.from_arrays(pa.array([1.0, 2.0], pa.float32()), 2)},
                     schema=store.folder.schema)
    bad = store.folder.write(table)
    with pytest.raises(StoreError, match=f"{bad.name}.*not a SHA-256 content hash.*move that file"):
        VectorStore(tmp_path, "f" * 64, 2).lookup([H1])


def test_spaces_do_not_mix(tmp_path: Path) -> None:
    VectorStore(tmp_path, "a" * 64, 4).add([H1], np.ones((1, 4), np.float32))
    assert VectorStore(tmp_path, "b" * 64, 4).lookup([H1]) == {}
    with pytest.raises(StoreError, match="another embedding space"):
        VectorStore(tmp_path, "a" * 16 + "c" * 48, 4)  # same folder prefix, other space
