"""The Parquet vector store: computed vectors keyed by (content hash, fingerprint).

It is both a cache (the same text is never embedded twice in one space, across
ingests, indexes and migrations) and a vendor-neutral export: any index can be
rebuilt from the corpus plus these files without calling the model again.

Layout: ``<data>/vectors/<fingerprint[:16]>/seg-*.parquet`` with columns
``content_hash`` and ``vector`` (fixed-size list of float32), plus ``space.json``
recording the full fingerprint, profile and dimension.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa

from embedpipe._segments import SegmentFolder
from embedpipe.errors import StoreError

__all__ = ["VectorStore"]


def _schema(dims: int) -> pa.Schema:
    return pa.schema(
        [
            pa.field("content_hash", pa.string(), nullable=False),
            pa.field("vector", pa.list_(pa.float32(), dims), nullable=False),
        ]
    )


class VectorStore:
    """Vectors of one embedding space, looked up by content hash."""

    def __init__(self, data_dir: Path, fingerprint: str, dims: int, profile: str = "") -> None:
        self.fingerprint = fingerprint
        self.dims = dims
        self.folder = SegmentFolder(data_dir / "vectors" / fingerprint[:16], _schema(dims))
        self._index: dict[str, tuple[int, int]] | None = None
        self._check_space(profile)

    @classmethod
    def existing(cls, data_dir: Path, fingerprint: str, dims: int) -> VectorStore | None:
        """The store for a space if it exists, without creating anything (for dry runs)."""
        if not (data_dir / "vectors" / fingerprint[:16] / "space.json").is_file():
            return None
        return cls(data_dir, fingerprint, dims)

    def _check_space(self, profile: str) -> None:
        space = self.folder.root / "space.json"
        if space.is_file():
            try:
                recorded = json.loads(space.read_text())
            except (OSError, ValueError) as exc:
                raise StoreError(f"{space} is unreadable ({exc}); move that folder away") from None
            if not isinstance(recorded, dict) or recorded.get("fingerprint") != self.fingerprint or recorded.get("dims") != self.dims:
                raise StoreError(
                    f"{space} records another embedding space than {self.fingerprint[:12]}; "
                    "move that folder away"
                )
            return
        self.folder.root.mkdir(parents=True, exist_ok=True)
        tmp = space.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(
            json.dumps({"fingerprint": self.fingerprint, "dims": self.dims, "profile": profile})
        )
        os.replace(tmp, space)

    def _hash_index(self) -> dict[str, tuple[int, int]]:
        if self._index is None:
            index: dict[str, tuple[int, int]] = {}
            for s, path in enumerate(self.folder.segments()):
                col = self.folder.read_columns(path, ["content_hash"]).column("content_hash")
                for r, h in enumerate(col.to_pylist()):
                    index[h] = (s, r)
            self._index = index
        return self._index

    def __contains__(self, content_hash: str) -> bool:
        return content_hash in self._hash_index()

    def __len__(self) -> int:
        return len(self._hash_index())

    def count_present(self, hashes: Iterable[str]) -> int:
        index = self._hash_index()
        return sum(1 for h in hashes if h in index)

    def lookup(self, hashes: Sequence[str]) -> dict[str, np.ndarray]:
        """Vectors for the hashes that are stored (missing ones are simply absent)."""
        index = self._hash_index()
        by_segment: dict[int, list[tuple[int, str]]] = {}
        for h in set(hashes):
            if h in index:
                s, r = index[h]
                by_segment.setdefault(s, []).append((r, h))
        if not by_segment:
            return {}
        segments = self.folder.segments()
        out: dict[str, np.ndarray] = {}
        for s, wanted in by_segment.items():
            table = self.folder.read_columns(segments[s], ["vector"])
            rows = pa.array([r for r, _ in wanted], pa.int64())
            flat = table.column("vector").take(rows).combine_chunks().flatten()
            matrix = flat.to_numpy(zero_copy_only=False).reshape(len(wanted), self.dims)
            for (_, h), vec in zip(wanted, matrix):
                out[h] = vec
        return out

    def add(self, hashes: Sequence[str], vectors: np.ndarray) -> int:
        """Store vectors for hashes not yet present. Returns how many were new."""
        index = self._hash_index()
        fresh = [i for i, h in enumerate(hashes) if h not in index]
        fresh = list({hashes[i]: i for i in fresh}.values())  # one row per hash
        if not fresh:
            return 0
        vectors = np.asarray(vectors, dtype=np.float32)
        flat = pa.array(vectors[fresh].reshape(-1), pa.float32())
        table = pa.table(
            {
                "content_hash": [hashes[i] for i in fresh],
                "vector": pa.FixedSizeListArray.from_arrays(flat, self.dims),
            },
            schema=self.folder.schema,
        )
        with self.folder.lock:
            path = self.folder.write(table)
            segments = self.folder.segments()
        s = segments.index(path) if path in segments else len(segments) - 1
        for r, i in enumerate(fresh):
            index[hashes[i]] = (s, r)
        return len(fresh)
