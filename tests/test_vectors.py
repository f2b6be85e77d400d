"""The Parquet vector store: keyed by content hash within one fingerprint."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from embedpipe.errors import StoreError
from embedpipe.vectors import VectorStore


def test_round_trip_and_one_row_per_hash(tmp_path: Path) -> None:
    store = VectorStore(tmp_path, "f" * 64, 4)
    vecs = np.arange(12, dtype=np.float32).reshape(3, 4)
    assert store.add(["h1", "h2", "h1"], vecs) == 2
    assert store.add(["h2"], vecs[:1]) == 0
    reopened = VectorStore(tmp_path, "f" * 64, 4)
    got = reopened.lookup(["h1", "h2", "missing"])
    assert set(got) == {"h1", "h2"}
    np.testing.assert_array_equal(got["h2"], vecs[1])
    assert len(reopened) == 2


def test_spaces_do_not_mix(tmp_path: Path) -> None:
    VectorStore(tmp_path, "a" * 64, 4).add(["h"], np.ones((1, 4), np.float32))
    assert VectorStore(tmp_path, "b" * 64, 4).lookup(["h"]) == {}
    with pytest.raises(StoreError, match="another embedding space"):
        VectorStore(tmp_path, "a" * 16 + "c" * 48, 4)  # same folder prefix, other space
